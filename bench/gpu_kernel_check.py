"""The compiled Pallas GPU kernel against XLA attention on the same GPU: run it first.

tests/test_pallas_gpu_attention.py checks the kernel's algorithm on CPU, in Mosaic GPU's
interpreter, and lowers it for CUDA; neither compiles it to PTX nor runs it on Hopper.
This script does, where a Hopper GPU is lent, before any timing: for causal, packed
(8 documents), bidirectional-padded, sliding-window, cross (q shorter than kv), GQA and
head_dim 64 / 128 / 256 cases at lengths that are not block multiples, it compares the
output and dq / dk / dv of ``implementation="pallas"`` (bf16) with ``"xla"`` computed
in fp32 from the same bf16 inputs (xla itself matches a float64 reference in the tests),
relative to the reference's largest magnitude. Exit status 1 if any case is over
``--tolerance``.

    python bench/gpu_kernel_check.py                         # on a Hopper GPU
    python bench/gpu_kernel_check.py --interpret --small     # on CPU, in the interpreter
                                                             # (tests/test_bench_smoke.py)
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from t5x_like.kernels.attention import dot_product_attention  # noqa: E402

# name, batch, q_len, kv_len, heads, kv_heads, head_dim, causal, documents, pad, window
CASES = [
    ("causal-gqa-4:1-d128", 2, 2000, 2000, 8, 2, 128, True, None, 0, None),
    ("packed-8-docs-causal-d128", 1, 4100, 4100, 8, 8, 128, True, 8, 0, None),
    ("bidir-padded-d64", 2, 1000, 1000, 4, 4, 64, False, 2, 125, None),
    ("causal-window-256-d64", 1, 1536, 1536, 4, 1, 64, True, None, 0, 256),
    ("cross-q<kv-d64", 2, 300, 1000, 4, 2, 64, False, None, 0, None),
    ("causal-gqa-2:1-d256", 1, 700, 700, 4, 2, 256, True, None, 0, None),
]
# --small: one case at interpreter size (batch, q_len, kv_len, heads, kv heads, head_dim)
SMALL = {"packed-8-docs-causal-d128": (1, 200, 200, 4, 2, 128)}


def documents(batch: int, length: int, count: int, pad: int) -> np.ndarray:
    """``count`` equal documents (ids 1..count) then ``pad`` padding tokens (id 0)."""
    used = length - pad
    ids = np.repeat(np.arange(1, count + 1, dtype=np.int32), -(-used // count))[:used]
    return np.concatenate([ids, np.zeros(pad, np.int32)])[None].repeat(batch, 0)


def attend_and_grads(implementation, q, k, v, d_out, seg, kv_seg, causal, window, interpret):
    def loss(q, k, v):
        out = dot_product_attention(
            q, k, v, causal=causal, segment_ids=seg, kv_segment_ids=kv_seg,
            sliding_window=window, implementation=implementation, interpret=interpret,
        )
        return jnp.sum(out.astype(jnp.float32) * d_out), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return [np.asarray(x, np.float64) for x in (out, *grads)]


def check(case, interpret: bool, seed: int = 0) -> list[float]:
    name, b, tq, tk, h, kh, d, causal, docs, pad, window = case
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.bfloat16)
               for s in ((b, tq, h, d), (b, tk, kh, d), (b, tk, kh, d)))
    d_out = jnp.asarray(rng.normal(size=(b, tq, h, d)), jnp.float32)
    seg = kv_seg = None
    if docs is not None:
        seg = kv_seg = jnp.asarray(documents(b, tq, docs, pad))
    got = attend_and_grads("pallas_gpu", q, k, v, d_out, seg, kv_seg, causal, window, interpret)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    with jax.default_matmul_precision("highest"):  # no TF32 in the reference
        want = attend_and_grads("xla", *f32, d_out, seg, kv_seg, causal, window, False)
    return [float(np.max(np.abs(g - w)) / np.max(np.abs(w))) for g, w in zip(got, want)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--interpret", action="store_true", help="Mosaic GPU's interpreter (CPU)")
    p.add_argument("--small", action="store_true", help="one short case (for the interpreter)")
    p.add_argument("--tolerance", type=float, default=2e-2, help="bf16 relative error bound")
    args = p.parse_args(argv)
    cases = CASES
    if args.small:
        cases = [c[:1] + SMALL[c[0]] + c[7:] for c in CASES if c[0] in SMALL]
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}); jax {jax.__version__}; "
          f"{'interpret mode' if args.interpret else 'compiled'}; tolerance {args.tolerance}")
    print("| case | out | dq | dk | dv | s | verdict |\n|---|---|---|---|---|---|---|")
    failed = 0
    for case in cases:
        start = time.perf_counter()
        try:
            errors = check(case, args.interpret)
        except Exception as e:  # report, go on with the other cases
            failed += 1
            print(f"| {case[0]} | error: {type(e).__name__}: {str(e).splitlines()[0][:120]} |")
            continue
        ok = max(errors) <= args.tolerance
        failed += not ok
        cells = " | ".join(f"{e:.1e}" for e in errors)
        print(f"| {case[0]} | {cells} | {time.perf_counter() - start:.1f} | "
              f"{'ok' if ok else 'OVER'} |", flush=True)
    print(f"{len(cases) - failed} of {len(cases)} cases within tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
