"""Attention throughput: every implementation present on this platform, side by side.

    python bench/attention.py                       # defaults for the platform
    python bench/attention.py --lengths 1024,8192 --head-dims 64,128 --modes causal,packed
    python bench/attention.py --record              # also append the table to bench/RESULTS.md

Reports forward and forward+backward TFLOP/s (causal FLOPs counted as half; the
backward counted as 2.5 forwards; document masking not subtracted, so ``packed``
is effective throughput) as the median of ``--repeats`` timed calls after
one warm-up. Modes: ``causal``; ``packed`` (causal over 8 documents per row, segment
ids); ``bidir-padded`` (bidirectional, the last 1/8 of each row padding with its own
id). Runs unchanged on CPU, GPU and TPU; ``tokamax.dot_product_attention`` joins the
table when tokamax is installed.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from t5x_like.kernels import attention  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "RESULTS.md"


def segment_ids(mode: str, batch: int, length: int) -> np.ndarray | None:
    if mode == "causal":
        return None
    if mode == "packed":
        return np.repeat(np.arange(1, 9, dtype=np.int32), -(-length // 8))[:length][None].repeat(
            batch, 0
        )
    if mode == "bidir-padded":
        ids = np.ones((batch, length), np.int32)
        ids[:, length - length // 8 :] = 0
        return ids
    raise ValueError(f"unknown mode {mode!r}")


def runs_here(name: str) -> bool:
    """Whether a backend runs compiled on this platform (interpreted Pallas is not timed;
    ring attention needs a sequence mesh and is the chunked kernel without one)."""
    backend = jax.default_backend()
    if name == "cudnn":
        return backend == "gpu"
    if name == "pallas":  # the platform's kernel (pallas_tpu / pallas_gpu: the same row)
        return backend in ("tpu", "gpu")
    return name not in ("ring", "pallas_tpu", "pallas_gpu")


def implementations() -> dict[str, callable]:
    impls = {}
    for name in attention.IMPLEMENTATIONS:
        if not runs_here(name):
            continue
        impls[name] = lambda q, k, v, causal, seg, name=name: attention.dot_product_attention(
            q, k, v, causal=causal, segment_ids=seg, implementation=name
        )
    try:
        import tokamax  # noqa: F401

        def tokamax_attention(q, k, v, causal, seg):
            kw = {}
            if seg is not None:
                kw["mask"] = (seg[:, :, None] == seg[:, None, :])[:, None]
            return tokamax.dot_product_attention(q, k, v, is_causal=causal, **kw)

        impls["tokamax"] = tokamax_attention
    except ImportError:
        pass
    return impls


def time_call(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(args) -> list[dict]:
    impls = implementations()
    if args.implementations:
        impls = {k: v for k, v in impls.items() if k in args.implementations.split(",")}
    dtype = jnp.dtype(args.dtype)
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        for head_dim in [int(x) for x in args.head_dims.split(",")]:
            for mode in args.modes.split(","):
                rng = np.random.default_rng(0)
                shape_q = (args.batch, length, args.heads, head_dim)
                shape_kv = (args.batch, length, args.kv_heads, head_dim)
                q = jnp.asarray(rng.normal(size=shape_q), dtype)
                k = jnp.asarray(rng.normal(size=shape_kv), dtype)
                v = jnp.asarray(rng.normal(size=shape_kv), dtype)
                seg_np = segment_ids(mode, args.batch, length)
                seg = None if seg_np is None else jnp.asarray(seg_np)
                causal = mode != "bidir-padded"
                spec = attention.AttentionSpec(
                    args.batch, length, length, args.heads, args.kv_heads, head_dim, causal,
                    head_dim**-0.5,
                )
                for name, impl in impls.items():
                    if name == "xla" and length > args.xla_max_length:
                        continue  # the reference materialises [q, kv] logits
                    fwd = jax.jit(lambda q, k, v, impl=impl: impl(q, k, v, causal, seg))
                    fwd_bwd = jax.jit(
                        jax.grad(
                            lambda q, k, v, impl=impl: jnp.sum(
                                impl(q, k, v, causal, seg).astype(jnp.float32)
                            ),
                            argnums=(0, 1, 2),
                        )
                    )
                    row = dict(impl=name, length=length, head_dim=head_dim, mode=mode)
                    try:
                        t_f = time_call(fwd, (q, k, v), args.repeats)
                        t_fb = time_call(fwd_bwd, (q, k, v), args.repeats)
                    except Exception as e:  # report, keep going with the others
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
                    else:
                        row.update(
                            fwd_ms=t_f * 1e3,
                            fwd_tflops=attention.flops(spec) / t_f / 1e12,
                            fwd_bwd_ms=t_fb * 1e3,
                            fwd_bwd_tflops=attention.flops(spec, backward=True) / t_fb / 1e12,
                        )
                    rows.append(row)
                    print(format_row(row), flush=True)
    return rows


HEADER = (
    "| impl | length | head_dim | mode | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |\n"
    "|---|---|---|---|---|---|---|---|"
)


def format_row(row: dict) -> str:
    head = f"| {row['impl']} | {row['length']} | {row['head_dim']} | {row['mode']} "
    if "error" in row:
        return head + f"| {row['error']} | | | |"
    return head + (
        f"| {row['fwd_ms']:.1f} | {row['fwd_tflops']:.4f} | {row['fwd_bwd_ms']:.1f} "
        f"| {row['fwd_bwd_tflops']:.4f} |"
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    on_cpu = jax.default_backend() == "cpu"
    p.add_argument("--lengths", default="1024,4096" if on_cpu else "1024,2048,4096,8192,16384,32768")
    p.add_argument("--head-dims", default="64" if on_cpu else "64,128")
    p.add_argument("--modes", default="causal,packed,bidir-padded")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8 if on_cpu else 16)
    p.add_argument("--kv-heads", type=int, default=2 if on_cpu else 16)
    p.add_argument("--dtype", default="float32" if on_cpu else "bfloat16")
    p.add_argument("--implementations", default="", help="comma list; default: all present")
    p.add_argument("--xla-max-length", type=int, default=8192 if on_cpu else 16384)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = p.parse_args(argv)

    device = jax.devices()[0]
    context = (
        f"device: {jax.device_count()} x {device.device_kind} ({jax.default_backend()}); "
        f"jax {jax.__version__}; python {platform.python_version()}; "
        f"{datetime.date.today().isoformat()}; dtype {args.dtype}, batch {args.batch}, heads "
        f"{args.heads}/{args.kv_heads} kv"
    )
    print(context)
    print(HEADER)
    rows = bench(args)
    if args.record:
        command = "python bench/attention.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with RESULTS.open("a") as f:
            f.write(f"\n### Attention throughput\n\n{context}\n\n`{command.strip()}`\n\n{HEADER}\n")
            f.write("\n".join(format_row(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
