"""Long-context examples from a short-context LM, a retriever and a document collection.

Multi-document examples (``kind = "multi_doc"``), per example:

  (a) a random passage of the collection seeds the LM, which writes an
      instruction that needs several documents;
  (b) the retriever returns the top ``docs_per_example`` documents for it
      (more or fewer to land the input in ``[min_input_tokens, max_input_tokens]``
      with ``length_policy="adjust"``; out of range examples are dropped and counted);
  (c) the documents are cut into chunks that fit the LM's window;
  (d) each chunk gets a summary focused on the instruction; while the summaries
      together do not fit the answer prompt, groups of them are summarised again;
  (e) the LM answers the instruction from the summaries;
  (f) the example is the instruction plus the *raw* documents (the long input)
      and the answer (the target): the LM never saw the long input, yet the
      answer depends on all of it.

Long-output examples (``kind = "long_output"``): a span of the collection of a
random length in ``[long_output_min_tokens, long_output_max_tokens]`` is the
target, and the LM writes the instruction that would produce it (from the text,
or from its recursive summary when the text does not fit the window).

Examples go through the LM in batches of ``batch_size`` (one ``complete`` call a
step for the whole batch), and every batch is appended to the output before the
next starts. Ids are deterministic (``multi_doc-000012``) and every random choice
is seeded by ``(seed, id)``, so a re-run skips what is written and redoes the rest.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import random
from pathlib import Path
from typing import Sequence

from t5x_like.synthesis import chunks, io, prompts
from t5x_like.synthesis.lm import LanguageModel
from t5x_like.synthesis.retrieval import Retriever

log = logging.getLogger(__name__)
LENGTH_POLICIES = ("adjust", "drop")
KINDS = ("multi_doc", "long_output")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Counts and token budgets (tokens of the synthesis LM's tokenizer)."""

    num_multi_doc: int = 100
    num_long_output: int = 20
    docs_per_example: int = 5
    max_docs_per_example: int = 20  # candidates "adjust" may add to reach min_input_tokens
    min_input_tokens: int = 8192
    max_input_tokens: int = 32768
    length_policy: str = "adjust"  # adjust (add / remove documents) | drop
    chunk_tokens: int = 0  # 0: as much as the summary prompt leaves in the window
    max_summary_tokens: int = 256
    max_summary_levels: int = 8
    max_instruction_tokens: int = 128
    max_answer_tokens: int = 1024
    seed_passage_tokens: int = 256
    long_output_min_tokens: int = 2048
    long_output_max_tokens: int = 32768
    batch_size: int = 8  # examples whose LM calls are batched together
    max_attempts: int = 3  # ids tried per example wanted (dropped ones do not count)
    seed: int = 0

    def __post_init__(self):
        if self.length_policy not in LENGTH_POLICIES:
            raise ValueError(f"length_policy={self.length_policy!r} is not one of {LENGTH_POLICIES}")
        for name in ("docs_per_example", "max_summary_tokens", "max_instruction_tokens",
                     "max_answer_tokens", "seed_passage_tokens", "batch_size", "max_attempts",
                     "max_summary_levels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.min_input_tokens <= self.max_input_tokens:
            raise ValueError(f"need 0 <= min_input_tokens ({self.min_input_tokens}) <= "
                             f"max_input_tokens ({self.max_input_tokens})")
        if not 1 <= self.long_output_min_tokens <= self.long_output_max_tokens:
            raise ValueError(f"need 1 <= long_output_min_tokens ({self.long_output_min_tokens}) "
                             f"<= long_output_max_tokens ({self.long_output_max_tokens})")


# ------------------------------------------------------------------------ budgets


@dataclasses.dataclass(frozen=True)
class Budget:
    """Token budgets derived from the window; ``check_budget`` builds and validates them."""

    chunk: int  # text of one summary prompt
    seed: int  # the seed passage of the instruction prompt
    notes: int  # summaries in the answer prompt
    backtranslate: int  # text of the back-translation prompt


def _template_tokens(lm: LanguageModel, template: str, **fields) -> int:
    """Tokens of a template's fixed text (fields given as None are left empty)."""
    return lm.count_tokens(template.format(**{k: "" if v is None else v for k, v in fields.items()}))


def check_budget(settings: Settings, lm: LanguageModel) -> Budget:
    """Fails early, naming the settings, when the window cannot hold the prompts."""
    s, window = settings, lm.window
    words = _words(s.max_summary_tokens)
    summary = _template_tokens(lm, prompts.SUMMARY, instruction=None, text=None, words=words)
    chunk_room = window - summary - s.max_instruction_tokens - s.max_summary_tokens
    chunk = s.chunk_tokens or chunk_room
    if chunk > chunk_room:
        raise ValueError(f"chunk_tokens={s.chunk_tokens} + max_instruction_tokens="
                         f"{s.max_instruction_tokens} + max_summary_tokens={s.max_summary_tokens} "
                         f"+ the summary prompt ({summary}) exceed the LM window {window}")
    if chunk < 2 * s.max_summary_tokens:
        raise ValueError(f"chunk size {chunk} < 2 * max_summary_tokens={s.max_summary_tokens}: "
                         "summaries of summaries could not shrink; lower max_summary_tokens, "
                         "max_instruction_tokens or use a model with a longer window")
    seed = window - _template_tokens(lm, prompts.INSTRUCTION, text=None) - s.max_instruction_tokens
    if seed < s.seed_passage_tokens:
        raise ValueError(f"seed_passage_tokens={s.seed_passage_tokens} + max_instruction_tokens="
                         f"{s.max_instruction_tokens} + the instruction prompt exceed the window "
                         f"{window}")
    answer = _template_tokens(lm, prompts.ANSWER, instruction=None, summaries=None)
    notes = window - answer - s.max_instruction_tokens - s.max_answer_tokens
    if notes < s.max_summary_tokens:
        raise ValueError(f"max_answer_tokens={s.max_answer_tokens} + max_instruction_tokens="
                         f"{s.max_instruction_tokens} leave {notes} tokens for the notes, fewer "
                         f"than one summary (max_summary_tokens={s.max_summary_tokens})")
    back = window - s.max_instruction_tokens - _template_tokens(
        lm, prompts.BACKTRANSLATE, what=prompts.BACKTRANSLATE_WHAT_NOTES, text=None, words="100000")
    return Budget(chunk=chunk, seed=min(seed, s.seed_passage_tokens), notes=notes,
                  backtranslate=back)


def _words(tokens: int) -> int:
    """A word count to ask for that stays within ``tokens`` for English text."""
    return max(1, int(tokens * 0.6))


# --------------------------------------------------------------- the workflow


class Workflow:
    """Steps (a)-(f) and long-output examples over one LM, retriever and collection."""

    def __init__(self, lm: LanguageModel, retriever: Retriever | None, documents: dict[str, str],
                 settings: Settings):
        if not documents:
            raise ValueError("no documents")
        self.lm, self.retriever, self.settings = lm, retriever, settings
        self.documents = documents
        self.doc_ids = list(documents)
        self.budget = check_budget(settings, lm)
        self.stats: collections.Counter = collections.Counter()

    def count(self, text: str) -> int:
        return self.lm.count_tokens(text)

    # ------------------------------------------------------------ (a) instruction

    def seed_passage(self, rng: random.Random) -> str:
        """A random stretch of a random document, at most ``seed_passage_tokens``."""
        text = self.documents[self.doc_ids[rng.randrange(len(self.doc_ids))]]
        pieces = chunks.words(text)
        start = rng.randrange(max(1, len(pieces) - 8)) if len(pieces) > 8 else 0
        return chunks.fit("".join(pieces[start:]), self.budget.seed, self.count)

    def instructions(self, seeds: Sequence[str]) -> list[str]:
        outs = self.lm.complete([prompts.INSTRUCTION.format(text=s) for s in seeds],
                                self.settings.max_instruction_tokens)
        return [_clean(o) for o in outs]

    # ------------------------------------------------------------ (b) documents

    def long_input(self, instruction: str, doc_ids: Sequence[str]) -> str:
        docs = prompts.DOCUMENT_SEPARATOR.join(
            prompts.DOCUMENT.format(number=i + 1, text=self.documents[d]) for i, d in enumerate(doc_ids))
        return prompts.INPUT.format(documents=docs, instruction=instruction)

    def choose_documents(self, instruction: str, ranked: list[str]) -> list[str] | None:
        """The top documents, adjusted (or not) into the input length range; None: dropped."""
        s = self.settings
        docs = ranked[:s.docs_per_example]
        length = self.count(self.long_input(instruction, docs))
        if s.length_policy == "adjust":
            extra = ranked[len(docs):]
            while length < s.min_input_tokens and extra:
                docs.append(extra.pop(0))
                length = self.count(self.long_input(instruction, docs))
            while length > s.max_input_tokens and len(docs) > 1:
                docs.pop()
                length = self.count(self.long_input(instruction, docs))
        if not s.min_input_tokens <= length <= s.max_input_tokens:
            self.stats["dropped_input_length"] += 1
            return None
        return docs

    # ------------------------------------------------------- (c), (d) summaries

    def summarize(self, jobs: list[tuple[str, list[str]]]) -> list[tuple[str, list[int]]]:
        """Recursive query-focused summaries for many ``(focus, texts)`` jobs at once.

        Returns per job the joined notes (fitting the answer prompt) and its trace:
        the number of summaries made at each level (level 0: one per chunk, then one
        per group of summaries while they do not fit together).
        """
        s, sep, budget = self.settings, prompts.SUMMARY_SEPARATOR, self.budget
        pending: dict[int, list[str]] = {}
        for j, (_, texts) in enumerate(jobs):
            self.stats["documents_split"] += sum(1 for t in texts if self.count(t) > budget.chunk)
            pending[j] = [c for t in texts for c in chunks.split(t, budget.chunk, self.count)]
            self.stats["chunks"] += len(pending[j])
        notes = {j: "" for j in range(len(jobs))}
        traces: list[list[int]] = [[] for _ in jobs]
        level = 0
        while any(pending.values()):
            flat = [(j, chunks.fit(t, budget.chunk, self.count))
                    for j, texts in pending.items() for t in texts]
            outs = self.lm.complete([self._summary_prompt(jobs[j][0], t) for j, t in flat],
                                    s.max_summary_tokens)
            self.stats["summary_calls"] += len(outs)
            made: dict[int, list[str]] = collections.defaultdict(list)
            for (j, _), out in zip(flat, outs):
                made[j].append(_clean(out, first_paragraph=False) or "(nothing relevant)")
            level += 1
            pending = {}
            for j, summaries in made.items():
                traces[j].append(len(summaries))
                joined = sep.join(summaries)
                if len(summaries) > 1 and self.count(joined) > budget.notes:
                    if level < s.max_summary_levels:
                        pending[j] = [sep.join(g) for g in
                                      chunks.group(summaries, budget.chunk, self.count, sep)]
                        continue
                    self.stats["notes_truncated"] += 1
                notes[j] = chunks.fit(joined, budget.notes, self.count)
        self.stats["max_summary_level"] = max(self.stats["max_summary_level"], level)
        return [(notes[j], traces[j]) for j in range(len(jobs))]

    def _summary_prompt(self, focus: str, text: str) -> str:
        focus = chunks.fit(focus, self.settings.max_instruction_tokens, self.count)
        return prompts.SUMMARY.format(instruction=focus, text=text,
                                      words=_words(self.settings.max_summary_tokens))

    # ------------------------------------------------------------------ (e) answer

    def answers(self, instructions: Sequence[str], notes: Sequence[str]) -> list[str]:
        limit = self.settings.max_instruction_tokens
        outs = self.lm.complete(
            [prompts.ANSWER.format(instruction=chunks.fit(i, limit, self.count), summaries=n)
             for i, n in zip(instructions, notes)], self.settings.max_answer_tokens)
        return [o.strip() for o in outs]

    # ------------------------------------------------------------ (f) examples

    def multi_doc_batch(self, ids: Sequence[str]) -> list[dict]:
        rngs = [random.Random(f"{self.settings.seed}:{i}") for i in ids]
        instructions = self.instructions([self.seed_passage(r) for r in rngs])
        kept = [(i, ins) for i, ins in zip(ids, instructions) if ins]
        self.stats["dropped_empty_instruction"] += len(ids) - len(kept)
        depth = max(self.settings.docs_per_example, self.settings.max_docs_per_example)
        ranked = self.retriever.retrieve([ins for _, ins in kept], depth) if kept else []
        chosen = []
        for (i, ins), hits in zip(kept, ranked):
            docs = self.choose_documents(ins, list(hits))
            if docs is not None:
                chosen.append((i, ins, docs))
        notes = self.summarize([(ins, [self.documents[d] for d in docs]) for _, ins, docs in chosen])
        answers = self.answers([ins for _, ins, _ in chosen], [n for n, _ in notes])
        out = []
        for (i, ins, docs), (_, trace), answer in zip(chosen, notes, answers):
            if not answer:
                self.stats["dropped_empty_answer"] += 1
                continue
            out.append(self.example(i, "multi_doc", ins, docs, self.long_input(ins, docs), answer,
                                    {"summary_levels": trace}))
        return out

    def example(self, id_: str, kind: str, instruction: str, doc_ids: Sequence[str], input_: str,
                target: str, meta: dict) -> dict:
        return {"id": id_, "kind": kind, "instruction": instruction,
                "documents": [{"id": d, "text": self.documents[d]} for d in doc_ids],
                "input": input_, "target": target, "input_tokens": self.count(input_),
                "target_tokens": self.count(target), "meta": meta}

    # ----------------------------------------------------------------- long output

    def long_output_text(self, rng: random.Random) -> tuple[str, list[str]]:
        """A span of consecutive documents of about a random target length, and their ids."""
        s = self.settings
        goal = rng.randint(s.long_output_min_tokens, s.long_output_max_tokens)
        index = rng.randrange(len(self.doc_ids))
        paragraphs = self.documents[self.doc_ids[index]].split("\n\n")
        start = rng.randrange(len(paragraphs))
        parts, sources = ["\n\n".join(paragraphs[start:])], [self.doc_ids[index]]
        used = self.count(parts[0])
        while used < goal and len(sources) < len(self.doc_ids):
            index = (index + 1) % len(self.doc_ids)
            parts.append(self.documents[self.doc_ids[index]])
            sources.append(self.doc_ids[index])
            used += self.count(parts[-1])
        return _end_at_sentence(chunks.fit("\n\n".join(parts).strip(), goal, self.count),
                                s.long_output_min_tokens, self.count), sources

    def long_output_batch(self, ids: Sequence[str]) -> list[dict]:
        s = self.settings
        spans = [self.long_output_text(random.Random(f"{s.seed}:{i}")) for i in ids]
        lengths = [self.count(text) for text, _ in spans]
        keep = [k for k, n in enumerate(lengths)
                if s.long_output_min_tokens <= n <= s.long_output_max_tokens]
        self.stats["dropped_output_length"] += len(ids) - len(keep)
        fits = [k for k in keep if lengths[k] <= self.budget.backtranslate]
        long = [k for k in keep if lengths[k] > self.budget.backtranslate]
        shown = {k: (prompts.BACKTRANSLATE_WHAT_TEXT, spans[k][0]) for k in fits}
        notes = self.summarize([(prompts.LONG_OUTPUT_FOCUS, [spans[k][0]]) for k in long])
        traces = {k: trace for k, (_, trace) in zip(long, notes)}
        shown.update({k: (prompts.BACKTRANSLATE_WHAT_NOTES, n) for k, (n, _) in zip(long, notes)})
        order = sorted(shown)
        outs = self.lm.complete([self._backtranslate_prompt(*shown[k], lengths[k]) for k in order],
                                s.max_instruction_tokens)
        out = []
        for k, instruction in zip(order, outs):
            instruction = _clean(instruction)
            if not instruction:
                self.stats["dropped_empty_instruction"] += 1
                continue
            text, sources = spans[k]
            out.append(self.example(ids[k], "long_output", instruction, [],
                                    prompts.INPUT.format(documents="", instruction=instruction).lstrip(),
                                    text, {"sources": sources, "summary_levels": traces.get(k, [])}))
        return out

    def _backtranslate_prompt(self, what: str, text: str, tokens: int) -> str:
        text = chunks.fit(text, self.budget.backtranslate, self.count)
        return prompts.BACKTRANSLATE.format(what=what, text=text, words=round(tokens * 0.75))

    # ----------------------------------------------------------------------- run

    def run(self, output: str | Path, *, progress: bool = True) -> collections.Counter:
        """Writes the configured number of examples of each kind to ``output`` (resuming)."""
        from tqdm.auto import tqdm

        s = self.settings
        done, writer = io.open_output(output)
        wanted = {"multi_doc": s.num_multi_doc, "long_output": s.num_long_output}
        with writer, tqdm(total=sum(wanted.values()), desc="synthesis", unit="example",
                          disable=not progress) as bar:
            for kind, n in wanted.items():
                batch_fn = self.multi_doc_batch if kind == "multi_doc" else self.long_output_batch
                self._run_kind(kind, n, batch_fn, done, writer, bar)
        return self.stats

    def _run_kind(self, kind, wanted, batch_fn, done, writer, bar) -> None:
        ids = [f"{kind}-{i:06d}" for i in range(wanted * self.settings.max_attempts)]
        have = sum(1 for i in ids if i in done)
        self.stats[f"{kind}_existing"] += have
        bar.update(min(have, wanted))
        todo = [i for i in ids if i not in done]
        while have < wanted and todo:
            size = min(self.settings.batch_size, wanted - have)
            batch, todo = todo[:size], todo[size:]
            written = writer.write(batch_fn(batch))
            have += written
            self.stats[f"{kind}_written"] += written
            bar.update(written)
        if have < wanted:
            log.warning("%s: %d of %d examples after %d attempts; see the dropped_* counts",
                        kind, have, wanted, len(ids))


def _clean(text: str, first_paragraph: bool = True) -> str:
    """An LM's reply without a repeated label; instructions keep their first paragraph only
    (chatty models append explanations after a blank line)."""
    text = text.strip()
    for label in ("Instruction:", "Summary:"):
        if text.startswith(label):
            text = text[len(label):].strip()
    return text.split("\n\n")[0].strip() if first_paragraph else text


def _end_at_sentence(text: str, min_tokens: int, count) -> str:
    """Cuts ``text`` after its last sentence end when that keeps ``min_tokens``."""
    for mark in (".\n", ". ", "\n\n", "."):
        end = text.rfind(mark)
        if end > 0 and count(text[:end + 1]) >= min_tokens:
            return text[:end + 1]
    return text


__all__ = ["Budget", "KINDS", "LENGTH_POLICIES", "Settings", "Workflow", "check_budget"]
