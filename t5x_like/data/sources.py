"""Readers for the raw data the tasks are built from (plain Python, no TensorFlow).

* BEIR directories: ``corpus.jsonl`` (``_id``, ``title``, ``text``),
  ``queries.jsonl`` (``_id``, ``text``), ``qrels/<split>.tsv``.
* JSONL pairs / triples: ``{"query", "positive", "negatives": [...],
  "instruction"?, "scores"?}``.
* Plain text: files or directories of ``.txt`` (Gutenberg books stripped of
  their header and licence).
* Instruction examples (``t5x_like.synthesis`` output): JSONL ``{"id"?,
  "input", "target", ...}``, trained with the loss on ``target`` only.

Every malformed record is an error naming file and line, or, with
``on_bad_record="skip"``, skipped and counted in one warning per file.
An empty text is not malformed: real BEIR corpora hold documents whose title
and text are both empty, and BEIR's loader and pytrec_eval keep them. They are
kept here too (embedded as the empty string, kept in BM25) and counted in one
log line per file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path
from typing import Any, Iterator

from t5x_like.data import text as text_lib

log = logging.getLogger(__name__)
ON_BAD_RECORD = ("error", "skip")


class BadRecord(ValueError):
    """A malformed input record; the message names file and line."""


class _Skipper:
    """Raises or counts bad records, warning once per file with the count."""

    def __init__(self, path: Path, on_bad_record: str):
        if on_bad_record not in ON_BAD_RECORD:
            raise ValueError(f"on_bad_record={on_bad_record!r} must be one of {ON_BAD_RECORD}")
        self.path = path
        self.mode = on_bad_record
        self.skipped = 0
        self.first: str | None = None

    def bad(self, line: int, why: str) -> None:
        message = f"{self.path}:{line}: {why}"
        if self.mode == "error":
            raise BadRecord(message)
        self.skipped += 1
        self.first = self.first or message

    def report(self) -> None:
        if self.skipped:
            log.warning("%s: skipped %d bad records (first: %s)", self.path, self.skipped, self.first)


def _json_lines(path: Path, skipper: _Skipper) -> Iterator[tuple[int, dict]]:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                skipper.bad(number, f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(record, dict):
                skipper.bad(number, f"expected a JSON object, got {type(record).__name__}")
                continue
            yield number, record


def _nonempty_str(record: dict, key: str) -> bool:
    return isinstance(record.get(key), str) and bool(record[key].strip())


def _report_empty(path: Path, count: int, what: str) -> None:
    if count:
        log.warning("%s: %d %s with an empty text, kept (BEIR keeps them too)", path, count, what)


# ------------------------------------------------------------------------- BEIR


@dataclasses.dataclass
class BeirData:
    corpus: dict[str, dict[str, str]]  # id -> {"title", "text"}
    queries: dict[str, str]  # id -> text
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: grade}
    path: Path

    def passage(self, doc_id: str) -> str:
        """Title and text joined as BEIR's dense models read them."""
        doc = self.corpus[doc_id]
        return f"{doc['title']} {doc['text']}".strip() if doc["title"] else doc["text"]

    def subset(self, max_queries: int, extra_documents: int | None = None,
               seed: int = 0) -> "BeirData":
        """The first ``max_queries`` judged queries (sorted by id). ``extra_documents``
        None keeps the whole corpus; a number keeps those queries' judged documents plus
        that many others drawn at random (quick checks: scores are not the full task's)."""
        query_ids = sorted(self.qrels)[:max_queries]
        qrels = {q: self.qrels[q] for q in query_ids}
        corpus = self.corpus
        if extra_documents is not None:
            judged = sorted({d for q in query_ids for d in qrels[q]})
            others = sorted(set(self.corpus) - set(judged))
            random.Random(seed).shuffle(others)
            corpus = {d: self.corpus[d] for d in judged + others[:extra_documents]}
        queries = {q: self.queries[q] for q in query_ids}
        return dataclasses.replace(self, corpus=corpus, queries=queries, qrels=qrels)


def read_corpus(path: Path, on_bad_record: str = "error") -> dict[str, dict[str, str]]:
    skipper = _Skipper(path, on_bad_record)
    corpus: dict[str, dict[str, str]] = {}
    empty = 0
    for number, record in _json_lines(path, skipper):
        doc_id = record.get("_id")
        if not isinstance(doc_id, (str, int)) or str(doc_id) == "":
            skipper.bad(number, "missing '_id'")
            continue
        title, text = record.get("title"), record.get("text")
        if not isinstance(title, (str, type(None))) or not isinstance(text, (str, type(None))):
            skipper.bad(number, f"document {doc_id!r}: 'title' and 'text' must be strings")
            continue
        if str(doc_id) in corpus:
            skipper.bad(number, f"duplicate document id {doc_id!r}")
            continue
        corpus[str(doc_id)] = {"title": title or "", "text": text or ""}
        empty += not (title or "").strip() and not (text or "").strip()
    skipper.report()
    _report_empty(path, empty, "documents")
    return corpus


def read_queries(path: Path, on_bad_record: str = "error") -> dict[str, str]:
    skipper = _Skipper(path, on_bad_record)
    queries: dict[str, str] = {}
    empty = 0
    for number, record in _json_lines(path, skipper):
        if record.get("_id") in (None, ""):
            skipper.bad(number, "missing '_id'")
        elif not isinstance(record.get("text"), str):
            skipper.bad(number, f"query {record['_id']!r}: 'text' is missing or not a string")
        elif str(record["_id"]) in queries:
            skipper.bad(number, f"duplicate query id {record['_id']!r}")
        else:
            queries[str(record["_id"])] = record["text"]
            empty += not record["text"].strip()
    skipper.report()
    _report_empty(path, empty, "queries")
    return queries


def read_qrels(path: Path, on_bad_record: str = "error") -> dict[str, dict[str, int]]:
    """``query-id  corpus-id  score`` (tab separated, header line, CRLF tolerated)."""
    return _read_qrels(path, on_bad_record)[0]


def _read_qrels(path: Path, on_bad_record: str):
    """Qrels and the file line of each judged ``(query, doc)`` pair (for later errors)."""
    skipper = _Skipper(path, on_bad_record)
    line_of: dict[tuple[str, str], int] = {}
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.rstrip("\r\n").split("\t")
            if number == 1 and fields[0] == "query-id":
                continue
            if fields == [""]:
                continue
            if len(fields) != 3:
                skipper.bad(number, f"expected 3 tab-separated fields, got {len(fields)}")
                continue
            try:
                grade = int(float(fields[2]))
            except ValueError:
                skipper.bad(number, f"score {fields[2]!r} is not a number")
                continue
            qrels.setdefault(fields[0], {})[fields[1]] = grade
            line_of[(fields[0], fields[1])] = number
    skipper.report()
    return qrels, line_of


def read_beir(path: str | Path, split: str = "test", on_bad_record: str = "error") -> BeirData:
    """A BEIR directory; every judged query and document must exist."""
    path = Path(path)
    qrels_path = path / "qrels" / f"{split}.tsv"
    if not qrels_path.exists():
        have = sorted(p.stem for p in (path / "qrels").glob("*.tsv"))
        raise FileNotFoundError(f"{qrels_path} does not exist (splits here: {have})")
    corpus = read_corpus(path / "corpus.jsonl", on_bad_record)
    queries = read_queries(path / "queries.jsonl", on_bad_record)
    qrels, line_of = _read_qrels(qrels_path, on_bad_record)
    _check_qrels_ids(qrels_path, qrels, line_of, queries, corpus, on_bad_record)
    return BeirData(corpus, queries, qrels, path)


def _check_qrels_ids(path, qrels, line_of, queries, corpus, on_bad_record) -> None:
    """A judged id missing from corpus or queries is an error naming its qrels line."""
    skipper = _Skipper(path, on_bad_record)
    for qid in list(qrels):
        if qid not in queries:
            skipper.bad(line_of.get((qid, next(iter(qrels[qid]))), 0),
                        f"query id {qid!r} is not in queries.jsonl")
            del qrels[qid]
            continue
        for doc_id in list(qrels[qid]):
            if doc_id not in corpus:
                skipper.bad(line_of.get((qid, doc_id), 0), f"document id {doc_id!r} is not in corpus.jsonl")
                del qrels[qid][doc_id]
        if not qrels[qid]:
            del qrels[qid]
    skipper.report()


# --------------------------------------------------------------- JSONL pairs


def read_pairs(path: str | Path, on_bad_record: str = "error") -> list[dict[str, Any]]:
    """Contrastive examples: ``query``, ``positive``, optional ``negatives`` (list of
    texts), ``instruction`` and teacher ``scores`` (one per passage: positive first,
    then the negatives)."""
    path = Path(path)
    skipper = _Skipper(path, on_bad_record)
    out = []
    empty = 0
    for number, record in _json_lines(path, skipper):
        why = _pair_problem(record)
        if why:
            skipper.bad(number, why)
            continue
        texts = [record["query"], record["positive"], *(record.get("negatives") or [])]
        empty += not all(t.strip() for t in texts)
        example = {"query": record["query"], "positive": record["positive"],
                   "negatives": list(record.get("negatives") or []),
                   "instruction": record.get("instruction") or ""}
        if "scores" in record:
            example["scores"] = [float(s) for s in record["scores"]]
        out.append(example)
    skipper.report()
    _report_empty(path, empty, "records")
    if not out:
        raise BadRecord(f"{path}: no usable records")
    return out


def _pair_problem(record: dict) -> str | None:
    for key in ("query", "positive"):
        if key not in record:
            return f"missing field {key!r}"
        if not isinstance(record[key], str):
            return f"field {key!r} is not a string"
    negatives = record.get("negatives", [])
    if not isinstance(negatives, list) or not all(isinstance(n, str) for n in negatives):
        return "'negatives' must be a list of strings"
    if "instruction" in record and not isinstance(record["instruction"], str):
        return "'instruction' must be a string"
    if "scores" in record:
        scores = record["scores"]
        if not isinstance(scores, list) or len(scores) != 1 + len(negatives):
            return f"'scores' must list 1 + len(negatives) = {1 + len(negatives)} numbers"
        if not all(isinstance(s, (int, float)) for s in scores):
            return "'scores' must be numbers"
    return None


# ------------------------------------------------------------------ plain text


def read_text_documents(path: str | Path, gutenberg: bool | None = None) -> list[tuple[str, str]]:
    """``(name, text)`` for a ``.txt`` file or every ``.txt`` in a directory (sorted).

    ``gutenberg=None`` strips the Project Gutenberg header and licence when the
    markers are present; ``True`` requires them.
    """
    path = Path(path)
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files or not files[0].exists():
        raise FileNotFoundError(f"{path}: no .txt files")
    out = []
    for f in files:
        raw = f.read_text(encoding="utf-8-sig")
        if gutenberg or (gutenberg is None and "*** START OF" in raw):
            raw = text_lib.strip_gutenberg(raw, str(f))
        out.append((f.name, raw))
    # An empty book is a document with no tokens: it trains nothing, but it is not an error.
    _report_empty(path, sum(not raw.strip() for _, raw in out), "files")
    return out


# --------------------------------------------------------- instruction examples


def read_instruction_examples(path: str | Path, on_bad_record: str = "error") -> list[dict[str, str]]:
    """``{"id", "input", "target"}`` per line of a JSONL file (other fields ignored).

    ``input`` is what the model reads (it may be empty: a long-output example's
    instruction can be all of it); ``target`` must be non-empty, since it is the
    only part the loss sees. A missing ``id`` becomes ``"line-N"``.
    """
    path = Path(path)
    skipper = _Skipper(path, on_bad_record)
    out = []
    for number, record in _json_lines(path, skipper):
        if not isinstance(record.get("input"), str):
            skipper.bad(number, "missing string field 'input'")
        elif not _nonempty_str(record, "target"):
            skipper.bad(number, "field 'target' is missing, empty or not a string")
        else:
            out.append({"id": str(record.get("id", f"line-{number}")), "input": record["input"],
                        "target": record["target"]})
    skipper.report()
    if not out:
        raise BadRecord(f"{path}: no usable records")
    return out


# -------------------------------------------------------------------- run files


def read_trec_run(path: str | Path) -> dict[str, dict[str, float]]:
    """A TREC run file back into ``{qid: {docid: score}}``; errors name file and line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"run file {path} does not exist")
    run: dict[str, dict[str, float]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 6:
                raise BadRecord(f"{path}:{number}: expected 6 fields (qid Q0 docid rank score tag), "
                                 f"got {len(fields)}")
            qid, _, doc, _, score, _ = fields
            try:
                value = float(score)
            except ValueError:
                raise BadRecord(f"{path}:{number}: score {score!r} is not a number") from None
            if doc in run.setdefault(qid, {}):
                raise BadRecord(f"{path}:{number}: document {doc!r} listed twice for query {qid!r}")
            run[qid][doc] = value
    return run
