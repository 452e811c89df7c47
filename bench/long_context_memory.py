"""Memory of one long-context LM train step against row length: it must grow linearly.

    python bench/long_context_memory.py [--lengths 2048 4096 8192 16384] [--attention chunked]
    python bench/long_context_memory.py --preset 1b --lengths 8192 32768   # on a GPU

Compiles (does not run) the trainer's jitted step for one packed row (tokens, segment
ids, per-document positions) and prints XLA's memory analysis: temporaries (activations kept
for the backward pass and the step's scratch), arguments (params, Adam moments, batch), and
the memory each added token costs. With blockwise attention, full remat and chunked
cross-entropy no ``[length, length]`` or ``[length, vocab]`` tensor exists, so temporaries
per token stay flat; ``--attention xla`` shows the quadratic alternative. Runs unchanged
on CPU, GPU and TPU (one device).
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

from t5x_like import partitioning as part
from t5x_like.models.decoder import DecoderConfig
from t5x_like.optimizers import OptimizerConfig
from t5x_like.train_tasks import LanguageModelTask
from t5x_like.trainer import Trainer

PRESETS = {
    # 4 layers, d 512: a small config whose memory is dominated by activations.
    "small": DecoderConfig(vocab_size=32000, embed_dim=512, num_layers=4, num_heads=8,
                           num_kv_heads=2, head_dim=64, mlp_dim=1408),
    # Llama-3.2-1B's shape (16 layers, d 2048, GQA 32:8, 128K vocab, tied embeddings).
    "1b": DecoderConfig(vocab_size=128256, embed_dim=2048, num_layers=16, num_heads=32,
                        num_kv_heads=8, head_dim=64, mlp_dim=8192, tie_embeddings=True,
                        rope_theta=500_000.0),
}


def step_memory(model: DecoderConfig, length: int, loss_chunk: int):
    """XLA's memory analysis of the compiled train step for one row of ``length`` tokens."""
    model = dataclasses.replace(model, max_position_embeddings=length)
    task = LanguageModelTask(model, loss_chunk_size=loss_chunk)
    mesh = part.make_mesh(part.MeshShape(data=1), devices=jax.devices()[:1])
    trainer = Trainer(task, OptimizerConfig(), mesh, total_steps=10)
    row = jax.ShapeDtypeStruct((1, length), jnp.int32)
    batch = {"tokens": row, "segment_ids": row, "positions": row,
             "loss_weights": jax.ShapeDtypeStruct((1, length), jnp.float32)}
    with jax.set_mesh(mesh):
        compiled = trainer._step.lower(trainer.abstract_state, batch).compile()
    return compiled.memory_analysis()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--attention", default="chunked", help="an attention implementation")
    parser.add_argument("--remat", default="full", help="a remat policy (layers.REMAT_POLICIES)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--loss-chunk", type=int, default=256, help="positions per loss chunk")
    args = parser.parse_args()
    model = dataclasses.replace(PRESETS[args.preset], attention=args.attention,
                                remat_policy=args.remat, dtype=args.dtype, scan_layers=True)
    print(f"device {jax.devices()[0].device_kind}; jax {jax.__version__}; preset {args.preset} "
          f"({model.num_layers} x {model.embed_dim}, vocab {model.vocab_size}); attention "
          f"{args.attention}, remat {args.remat}, {args.dtype}, loss chunk {args.loss_chunk}")
    # Temporaries = a part that does not depend on length (gradients, optimizer update) plus
    # activations; the marginal KiB per added token shows how the activations grow.
    print(f"{'length':>7s} {'temp MiB':>9s} {'args MiB':>9s} {'marginal KiB/token':>19s}")
    previous = None
    for length in args.lengths:
        memory = step_memory(model, length, args.loss_chunk)
        temp = memory.temp_size_in_bytes
        marginal = ("" if previous is None else
                    f"{(temp - previous[1]) / (length - previous[0]) / 2**10:19.2f}")
        print(f"{length:7d} {temp / 2**20:9.1f} {memory.argument_size_in_bytes / 2**20:9.1f} "
              f"{marginal}", flush=True)
        previous = (length, temp)


if __name__ == "__main__":
    main()
