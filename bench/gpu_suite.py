"""The GPU suite: decoder MFU, E5-base contrastive throughput against sentence-transformers, and
the longest row a ~1B decoder trains at. Written to run unchanged on one H100 / H200.

    python bench/gpu_suite.py                         # every part (several minutes on an H100)
    python bench/gpu_suite.py --parts mfu --lengths 4096,32768 --attention pallas,cudnn,xla
    python bench/gpu_suite.py --parts contrastive     # E5-base (BERT-base) ours vs CachedMNRL
    python bench/gpu_suite.py --parts longest         # double the row until out of memory
    python bench/gpu_suite.py --smoke                 # tiny sizes: runs end to end on a CPU
    python bench/gpu_suite.py --record --json $OUT/gpu_suite.json

Where one command may run 10 minutes at most, run the parts (and the mfu lengths) one by one:
``--parts mfu --lengths 4096``, ``--parts mfu --lengths 32768``, ``--parts contrastive``,
``--parts longest``; each takes a few minutes on an H100 (a 1B step compiles in about a
minute). JAX gets 90% of the GPU's memory (``XLA_PYTHON_CLIENT_MEM_FRACTION``, unless set).

Needs jax and t5x_like only (no TensorFlow, seqio, ml-collections or network: every batch is
synthetic numpy); sentence-transformers (with torch) for the peer in ``contrastive``, which
is skipped with a note where it is missing.

* ``mfu``: one training step (forward, backward, AdamW) of a Llama-3.2-1B-shaped decoder
  (``bench/long_context_memory.py --preset 1b``: 16 x 2048, GQA 32:8, 128K vocab, tied) in
  bf16 with scanned layers, chunked cross-entropy and the ``--remat`` policies tried in order
  (the next one after an out-of-memory), for each row length in ``--lengths`` (rows per step
  = ``--tokens-per-step`` / length) and each ``--attention`` implementation (a failure is
  printed with its reason and the next one runs). MFU = model FLOPs / step time / the
  card's bf16 matmul peak *measured in the same run* (the best TFLOP/s of large square bf16
  matmuls), where model FLOPs = 6 N tokens + 6 L T^2 H D per row (attention's 12 L T^2 H D
  forward + backward, halved for the causal mask), N = matmul parameters (everything but the
  embedding lookup, plus the tied LM head), L layers, T row length, H D = query heads x
  head dim; rematerialisation's recompute is not counted. The spec-sheet peak's MFU is shown too.
* ``contrastive``: E5-base-shaped (BERT-base, 110M, random init) contrastive training, ours
  (the trainer path of bench/contrastive_step.py, bf16 compute, gradient caching) against
  sentence-transformers' CachedMultipleNegativesRankingLoss (torch bf16 autocast, the same
  weights written by ``convert.hf.save_hf``, mini-batch = batch / chunks), synthetic token
  ids, alternating runs, examples/s.
* ``longest``: the row length (doubling from ``--start-length``) at which the 1B decoder
  still trains one step (full remat), for each ``--long-attention`` implementation; the first
  out-of-memory (from XLA's memory analysis against the card's memory, or at run time) ends
  the search. Lengths whose step would take over ``--max-step-seconds`` are compiled and
  checked against the memory only, and reported apart ("compiles within memory").
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from embed_throughput import ROOT, device_line, record, timed  # noqa: E402

sys.path.insert(0, str(ROOT))
# JAX takes 75% of a GPU's memory up front by default; the longest-row search wants nearly all
# of it, and the peer (torch, in the contrastive part) the rest. Set the variable to override.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from t5x_like import partitioning as part  # noqa: E402
from t5x_like.models.decoder import DecoderConfig  # noqa: E402
from t5x_like.models.encoder import EncoderConfig  # noqa: E402

MFU_FORMULA = ("MFU = (6 N tokens + 6 L T^2 H D rows) / step time / measured bf16 matmul peak; "
               "N = matmul parameters (non-embedding + tied LM head), L layers, T row length, "
               "H D = query heads x head dim (attention 12 L T^2 H D fwd+bwd, halved: causal); "
               "remat recompute not counted")

SMOKE_DECODER = DecoderConfig(vocab_size=512, embed_dim=64, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=16, mlp_dim=128, tie_embeddings=True)
E5_BASE = EncoderConfig(vocab_size=30522, embed_dim=768, num_layers=12, num_heads=12, mlp_dim=3072,
                        max_position_embeddings=512, dropout_rate=0.1)
SMOKE_ENCODER = EncoderConfig(vocab_size=1000, embed_dim=64, num_layers=2, num_heads=4, mlp_dim=128,
                              max_position_embeddings=128, dropout_rate=0.1)


def one_billion() -> DecoderConfig:
    from long_context_memory import PRESETS  # bench/long_context_memory.py: Llama-3.2-1B's shape

    return PRESETS["1b"]


def is_oom(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}"
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                   "OOM", "exceeds the device memory"))


def reason(error: BaseException) -> str:
    lines = [x for x in str(error).splitlines() if x.strip()]
    return f"{type(error).__name__}: {(lines[0] if lines else '')[:160]}"


def free() -> None:
    gc.collect()
    jax.clear_caches()


def device_memory() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


# ---------------------------------------------------------------- matmul peak


def matmul_peak(sizes: list[int], repeats: int = 10) -> tuple[float, int]:
    """Best bf16 TFLOP/s of ``n x n @ n x n`` (fp32 accumulation) over ``sizes``, and its n."""
    best = (0.0, 0)
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
        f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
        jax.block_until_ready(f(a, b))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(f(a, b))
            times.append(time.perf_counter() - start)
        tflops = 2 * n**3 / statistics.median(times) / 1e12
        best = max(best, (tflops, n))
        del a, b
    return best


# -------------------------------------------------------------- decoder steps


def matmul_params(model: DecoderConfig, params) -> int:
    n = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if "embedding" not in jax.tree_util.keystr(path):
            n += int(np.prod(leaf.shape))
    return n + (model.vocab_size * model.embed_dim if model.tie_embeddings else 0)


def model_flops(model: DecoderConfig, n_matmul: int, rows: int, length: int) -> float:
    attention = 6.0 * model.num_layers * length**2 * model.num_heads * model.head_dim * rows
    return 6.0 * n_matmul * rows * length + attention


def lm_batch(rows: int, length: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"tokens": rng.integers(1, vocab, size=(rows, length)).astype(np.int32),
            "segment_ids": np.ones((rows, length), np.int32),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
            "loss_weights": np.ones((rows, length), np.float32)}


def check_memory(compiled, out: dict) -> None:
    """XLA's memory analysis of ``compiled`` into ``out``; MemoryError if it exceeds the device's."""
    memory = compiled.memory_analysis()
    limit = device_memory()
    if memory is None:
        return
    need = (memory.temp_size_in_bytes + memory.argument_size_in_bytes
            + memory.output_size_in_bytes - memory.alias_size_in_bytes)
    out["memory_gib"] = need / 2**30
    if limit is not None and need > limit:
        raise MemoryError(f"RESOURCE_EXHAUSTED (XLA's memory analysis): {need / 2**30:.1f} "
                          f"GiB needed, {limit / 2**30:.1f} GiB on the device")


def decoder_step(model: DecoderConfig, rows: int, length: int, steps: int, loss_chunk: int,
                 run: bool = True) -> dict:
    """Compiles and times the trainer's LM step; raises on failure (out of memory included).
    ``run=False`` only compiles it and checks XLA's memory analysis against the device."""
    from t5x_like.optimizers import OptimizerConfig
    from t5x_like.train_tasks import LanguageModelTask
    from t5x_like.trainer import Trainer

    model = dataclasses.replace(model, max_position_embeddings=max(length, model.max_position_embeddings))
    task = LanguageModelTask(model, loss_chunk_size=min(loss_chunk, length))
    mesh = part.make_mesh(part.MeshShape(data=1), devices=jax.devices()[:1])
    trainer = Trainer(task, OptimizerConfig(learning_rate=1e-5), mesh, total_steps=10**6)
    if not run:
        row = jax.ShapeDtypeStruct((rows, length), jnp.int32)
        abstract = {"tokens": row, "segment_ids": row, "positions": row,
                    "loss_weights": jax.ShapeDtypeStruct((rows, length), jnp.float32)}
        with jax.set_mesh(mesh), part.axis_rules(trainer.rules):
            start = time.perf_counter()
            compiled = trainer._step.lower(trainer.abstract_state, abstract).compile()
        out = {"compile_s": time.perf_counter() - start}
        check_memory(compiled, out)
        return out
    state = trainer.init_state()
    batch = part.shard_batch(mesh, lm_batch(rows, length, model.vocab_size), trainer.rules)
    try:
        # Lowered with the real state and batch, so the jitted step reuses this executable.
        with jax.set_mesh(mesh), part.axis_rules(trainer.rules):
            start = time.perf_counter()
            compiled = trainer._step.lower(state, batch).compile()
        out = {"compile_s": time.perf_counter() - start}
        check_memory(compiled, out)
        state, metrics = trainer.step(state, batch)  # warm-up
        jax.block_until_ready(metrics["loss"])
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = trainer.step(state, batch)
        out["loss"] = float(jax.device_get(metrics["loss"]))
        out["step_s"] = (time.perf_counter() - start) / steps
        out["n_matmul"] = matmul_params(model, state.params["model"])
    finally:
        del state, batch
    return out


def mfu_part(args, peak: float) -> list[dict]:
    base = SMOKE_DECODER if args.smoke else one_billion()
    spec_peak = None
    try:
        from t5x_like.peak_flops import peak_flops_per_device

        spec_peak = peak_flops_per_device()
    except ImportError:
        pass
    rows_out = []
    for length in [int(x) for x in args.lengths.split(",")]:
        rows = max(1, args.tokens_per_step // length)
        for attention in args.attention.split(","):
            row = dict(length=length, rows=rows, attention=attention)
            for policy in args.remat.split(","):
                model = dataclasses.replace(base, attention=attention, remat_policy=policy,
                                            dtype=args.dtype, scan_layers=True)
                row["remat"] = policy
                try:
                    out = decoder_step(model, rows, length, args.steps, args.loss_chunk)
                except Exception as e:  # noqa: BLE001 - report it and go on
                    row.pop("error", None)
                    row["error"] = ("out of memory: " if is_oom(e) else "") + reason(e)
                    free()
                    if is_oom(e):
                        continue  # the next remat policy
                    break
                row.pop("error", None)
                flops = model_flops(model, out["n_matmul"], rows, length)
                row.update(out, flops=flops, tflops=flops / out["step_s"] / 1e12,
                           mfu=flops / out["step_s"] / peak,
                           mfu_spec=flops / out["step_s"] / spec_peak if spec_peak else None,
                           tokens_per_s=rows * length / out["step_s"])
                free()
                break
            print(format_mfu(row), flush=True)
            rows_out.append(row)
    return rows_out


MFU_HEADER = ("| row length | rows | attention | remat | step s | tokens/s | model TFLOP/s | MFU "
              "(measured peak) | MFU (spec peak) | compile s | memory GiB (XLA) |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|")


def format_mfu(r: dict) -> str:
    head = f"| {r['length']} | {r['rows']} | {r['attention']} | {r.get('remat', '')} "
    if "error" in r:
        return head + f"| {r['error']} | | | | | | |"
    spec = f"{r['mfu_spec'] * 100:.1f}%" if r.get("mfu_spec") else "-"
    mem = f"{r['memory_gib']:.1f}" if "memory_gib" in r else "-"
    return head + (f"| {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | "
                   f"{r['mfu'] * 100:.1f}% | {spec} | {r['compile_s']:.0f} | {mem} |")


# ---------------------------------------------------------------- contrastive


def synthetic_pairs(batch: int, length: int, vocab: int, n: int, seed: int = 0):
    """``n`` batches of (query, passage) ids with [CLS] ... [SEP], random lengths (the longest
    of every batch = ``length``), padded to ``length`` (ours) and to the longest (the peer)."""
    rng = np.random.default_rng(seed)

    def side():
        lengths = rng.integers(length // 4, length + 1, size=batch)
        lengths[0] = length
        ids = rng.integers(min(1000, vocab // 2), vocab, size=(batch, length)).astype(np.int32)
        mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
        ids[:, 0] = 101
        ids[np.arange(batch), lengths - 1] = 102
        return ids * mask, mask

    ours, theirs = [], []
    for _ in range(n):
        (qt, qm), (pt, pm) = side(), side()
        ours.append({"query_tokens": qt, "query_mask": qm, "passage_tokens": pt[:, None],
                     "passage_mask": pm[:, None]})
        theirs.append(((qt, qm), (pt, pm)))
    return ours, theirs


def write_bert_dir(config: EncoderConfig, params, path: pathlib.Path) -> pathlib.Path:
    """An HF directory (save_hf) with a placeholder WordPiece vocabulary, so that
    sentence-transformers can load it without a tokenizer package (ids are synthetic)."""
    from t5x_like.convert import hf

    hf.save_hf(config, params, path)
    specials = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}
    (path / "vocab.txt").write_text("\n".join(specials.get(i, f"tok{i}")
                                              for i in range(config.vocab_size)) + "\n")
    return path


def contrastive_part(args) -> list[dict]:
    from contrastive_step import Ours

    base = SMOKE_ENCODER if args.smoke else E5_BASE
    rows_out = []
    try:
        import importlib

        import torch
        from contrastive_step import Theirs

        importlib.import_module("sentence_transformers")
    except ImportError as e:
        torch = None
        print(f"sentence-transformers side skipped: {reason(e)}")
    torch_device = "cuda" if (torch is not None and torch.cuda.is_available()) else "cpu"
    peer_args = argparse.Namespace(batch_size=args.cbatch, temperature=0.01, lr=2e-5,
                                   torch_device=torch_device,
                                   autocast=(torch.bfloat16 if torch is not None and args.dtype == "bfloat16"
                                             and torch_device == "cuda" else None))
    ours_batches, peer_batches = synthetic_pairs(args.cbatch, args.clength, base.vocab_size,
                                                 max(args.steps, 2))
    first = None
    with tempfile.TemporaryDirectory() as tmp:
        for attention in args.encoder_attention.split(","):
            config = dataclasses.replace(base, attention=attention, dtype=args.dtype)
            row = dict(side="ours", attention=attention, chunks=args.cchunks)
            try:
                ours = Ours(config, first, args.cchunks, peer_args, ours_batches)
                if first is None:  # every other side starts from these (random) weights
                    first = jax.device_get(ours.state.params["model"])
                row["compile_s"] = ours.compile_s
                row["variant"] = ours
            except Exception as e:  # noqa: BLE001
                row["error"] = reason(e)
                free()
            rows_out.append(row)
        if torch is not None and first is not None:
            model_dir = write_bert_dir(base, first, pathlib.Path(tmp) / "bert")
            row = dict(side="theirs", attention="sdpa (torch)", chunks=args.cchunks)
            try:
                row["variant"] = Theirs(model_dir, args.cchunks, peer_args, peer_batches)
            except Exception as e:  # noqa: BLE001
                row["error"] = reason(e)
            rows_out.append(row)
        live = [r for r in rows_out if "variant" in r]
        for r in live:
            r["variant"].steps(1)  # warm-up
        for r in live:
            r["times"] = []
        for _ in range(args.repeats):
            for r in live:
                r["times"].append(timed(lambda: r["variant"].steps(args.steps))[1] / args.steps)
        for r in live:
            del r["variant"]
            r["examples_per_s"] = args.cbatch / statistics.median(r["times"])
    peer = [r for r in rows_out if r["side"] == "theirs" and "examples_per_s" in r]
    for r in rows_out:
        if r["side"] == "ours" and "examples_per_s" in r and peer:
            r["ratio"] = r["examples_per_s"] / peer[0]["examples_per_s"]
        print(format_contrastive(r), flush=True)
    free()
    return rows_out


CONTRASTIVE_HEADER = ("| side | attention | chunks | examples/s (median) | s/step (every run) | ratio ours / "
                      "theirs | compile s |\n|---|---|---|---|---|---|---|")


def format_contrastive(r: dict) -> str:
    name = "t5x_like Trainer" if r["side"] == "ours" else "sentence-transformers CachedMNRL"
    head = f"| {name} | {r['attention']} | {r['chunks']} "
    if "error" in r:
        return head + f"| {r['error']} | | | |"
    ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
    comp = f"{r['compile_s']:.0f}" if "compile_s" in r else "-"
    return head + (f"| {r['examples_per_s']:.1f} | {', '.join(f'{t:.3f}' for t in r['times'])} "
                   f"| {ratio} | {comp} |")


# -------------------------------------------------------------------- longest


def longest_part(args) -> list[dict]:
    """Doubles the row until it no longer fits. A length whose step would take longer than
    ``--max-step-seconds`` (the last step time x the length ratio squared: attention
    dominates there) is only compiled and checked against the device's memory, not run."""
    base = SMOKE_DECODER if args.smoke else one_billion()
    rows_out = []
    for attention in args.long_attention.split(","):
        model = dataclasses.replace(base, attention=attention, remat_policy="full",
                                    dtype=args.dtype, scan_layers=True)
        length, ran, fits, why = args.start_length, None, None, "reached --max-length"
        while length <= args.max_length:
            predicted = None if ran is None else ran["step_s"] * (length / ran["length"]) ** 2
            run = predicted is None or predicted <= args.max_step_seconds
            try:
                out = decoder_step(model, 1, length, 1, args.loss_chunk, run=run)
            except Exception as e:  # noqa: BLE001
                why = ("out of memory at " if is_oom(e) else "failed at ") + f"{length}: {reason(e)}"
                free()
                break
            fits = dict(length=length, memory_gib=out.get("memory_gib"))
            if run:
                ran = dict(length=length, step_s=out["step_s"], memory_gib=out.get("memory_gib"))
                print(f"  {attention}: {length} tokens trains ({out['step_s']:.2f} s a step)", flush=True)
            else:
                print(f"  {attention}: {length} tokens fits by XLA's memory analysis (not run: a step "
                      f"would take ~{predicted:.0f} s)", flush=True)
            free()
            length *= 2
        row = dict(attention=attention, longest=ran["length"] if ran else None,
                   step_s=ran["step_s"] if ran else None,
                   memory_gib=ran.get("memory_gib") if ran else None,
                   fits=fits["length"] if fits else None,
                   fits_memory_gib=fits.get("memory_gib") if fits else None, stop=why)
        print(format_longest(row), flush=True)
        rows_out.append(row)
    return rows_out


LONGEST_HEADER = ("| attention | longest row that trained a step | step s there | memory GiB (XLA) "
                  "| longest that compiles within memory | memory GiB there | why the search stopped |\n"
                  "|---|---|---|---|---|---|---|")


def format_longest(r: dict) -> str:
    def gib(x):
        return f"{x:.1f}" if x is not None else "-"

    longest = f"{r['longest']:,}" if r["longest"] else "none"
    fits = f"{r['fits']:,}" if r.get("fits") else "none"
    step = f"{r['step_s']:.2f}" if r["step_s"] is not None else "-"
    return (f"| {r['attention']} | {longest} | {step} | {gib(r.get('memory_gib'))} | {fits} "
            f"| {gib(r.get('fits_memory_gib'))} | {r['stop']} |")


# ----------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--parts", default="mfu,contrastive,longest")
    p.add_argument("--smoke", action="store_true", help="tiny models and rows (runs on a CPU)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--lengths", default=None, help="mfu row lengths (default 4096,32768)")
    p.add_argument("--tokens-per-step", type=int, default=None, help="mfu (default 32768)")
    p.add_argument("--attention", default="pallas,cudnn,xla,chunked", help="mfu implementations")
    p.add_argument("--remat", default="full", help="mfu remat policies, tried in order on OOM "
                   "(e.g. none,dots,full)")
    p.add_argument("--loss-chunk", type=int, default=2048, help="positions per loss chunk")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5, smoke 2)")
    p.add_argument("--repeats", type=int, default=3, help="contrastive alternating rounds")
    p.add_argument("--cbatch", type=int, default=None, help="contrastive batch (default 1024)")
    p.add_argument("--clength", type=int, default=None, help="contrastive tokens a side (128)")
    p.add_argument("--cchunks", type=int, default=None, help="gradient-caching chunks (default 8)")
    p.add_argument("--encoder-attention", default="cudnn,xla", help="ours in contrastive")
    p.add_argument("--long-attention", default="chunked", help="longest-row implementations "
                   "(comma list, e.g. chunked,pallas,cudnn; each doubling compiles a 1B step)")
    p.add_argument("--start-length", type=int, default=None, help="longest: first length (8192)")
    p.add_argument("--max-length", type=int, default=None, help="longest: stop here (2**20)")
    p.add_argument("--max-step-seconds", type=float, default=60.0,
                   help="longest: lengths whose step would take longer are compiled, not run")
    p.add_argument("--json", help="also write every result here")
    p.add_argument("--record", action="store_true", help="append the tables to bench/RESULTS.md")
    args = p.parse_args(argv)
    small = args.smoke
    defaults = dict(lengths="64" if small else "4096,32768",
                    tokens_per_step=256 if small else 32768, steps=2 if small else 5,
                    cbatch=8 if small else 1024, clength=32 if small else 128,
                    cchunks=2 if small else 8, start_length=32 if small else 8192,
                    max_length=64 if small else 2**20)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if small:
        args.loss_chunk = min(args.loss_chunk, 64)
        args.repeats = min(args.repeats, 1)
    parts = args.parts.split(",")
    unknown = set(parts) - {"mfu", "contrastive", "longest"}
    if unknown:
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; choose from mfu, contrastive, longest")

    try:
        import transformers

        transformers.logging.set_verbosity_error()  # save_hf writes no BERT pooler: say nothing
    except ImportError:
        pass
    context = device_line() + f"; {args.dtype}" + ("; --smoke (tiny sizes)" if small else "")
    print(context, flush=True)
    results: dict = {"context": context, "args": vars(args)}
    sections = []
    if "mfu" in parts:
        peak, n = matmul_peak([256, 512] if small else [4096, 8192, 16384])
        results["matmul_peak_tflops"] = peak
        head = (f"Measured bf16 matmul peak: {peak:.1f} TFLOP/s ({n} x {n} x {n}). {MFU_FORMULA}. "
                f"{args.tokens_per_step} tokens a step, {args.steps} timed steps after one warm-up.")
        print(head + "\n" + MFU_HEADER, flush=True)
        rows = mfu_part(args, peak * 1e12)
        results["mfu"] = rows
        sections.append(("Decoder training step MFU (Llama-3.2-1B shape)" if not small else
                         "Decoder training step MFU (smoke)",
                         head + "\n\n" + MFU_HEADER + "\n" + "\n".join(format_mfu(r) for r in rows)))
    if "contrastive" in parts:
        head = (f"E5-base shape ({'smoke encoder' if small else 'BERT-base, 110M'}, random init), batch "
                f"{args.cbatch} (query, passage) pairs x {args.clength} tokens a side (synthetic ids), "
                f"temperature 0.01, AdamW, {args.steps} steps a run, {args.repeats} alternating rounds.")
        print(head + "\n" + CONTRASTIVE_HEADER, flush=True)
        rows = contrastive_part(args)
        results["contrastive"] = rows
        sections.append(("E5-base contrastive training: ours vs CachedMNRL",
                         head + "\n\n" + CONTRASTIVE_HEADER + "\n"
                         + "\n".join(format_contrastive(r) for r in rows)))
    if "longest" in parts:
        print(LONGEST_HEADER, flush=True)
        rows = longest_part(args)
        results["longest"] = rows
        sections.append(("Longest row a ~1B decoder trains at (one device)",
                         "Full remat, scanned layers, chunked cross-entropy, batch 1, lengths doubling "
                         f"from {args.start_length}.\n\n" + LONGEST_HEADER + "\n"
                         + "\n".join(format_longest(r) for r in rows)))
    for title, text in sections:
        print(f"\n### {title}\n\n{text}")
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    if args.record:
        record("GPU suite" + (" (smoke)" if small else ""),
               "\n\n".join(f"#### {title}\n\n{text}" for title, text in sections))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
