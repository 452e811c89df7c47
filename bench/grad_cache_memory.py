"""Peak temporary memory of one contrastive train step, plain versus gradient caching.

    python bench/grad_cache_memory.py [--batch 4096] [--chunks 1 4 16 64] [--layers 6]

Compiles (does not run) the trainer's jitted step for a BERT-shaped encoder on one
device and prints XLA's memory analysis: the temporaries hold the activations kept
for the backward pass, which gradient caching bounds by one chunk.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from t5x_like import partitioning as part
from t5x_like.models.encoder import EncoderConfig
from t5x_like.objectives.contrastive import ContrastiveConfig
from t5x_like.optimizers import OptimizerConfig
from t5x_like.train_tasks import DualEncoderTask
from t5x_like.trainer import Trainer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--group", type=int, default=2, help="passages a query (1 + negatives)")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 4, 16, 64])
    args = parser.parse_args()
    model = EncoderConfig(embed_dim=384, num_layers=args.layers, num_heads=12, mlp_dim=1536,
                          dropout_rate=0.0)
    mesh = part.make_mesh(part.MeshShape(data=1), devices=jax.devices()[:1])
    batch = {
        "query_tokens": jax.ShapeDtypeStruct((args.batch, args.length), jnp.int32),
        "query_mask": jax.ShapeDtypeStruct((args.batch, args.length), jnp.int32),
        "passage_tokens": jax.ShapeDtypeStruct((args.batch, args.group, args.length), jnp.int32),
        "passage_mask": jax.ShapeDtypeStruct((args.batch, args.group, args.length), jnp.int32),
    }
    print(f"device {jax.devices()[0].device_kind}; jax {jax.__version__}; encoder {args.layers} x 384; "
          f"batch {args.batch} queries x {args.group} passages x {args.length} tokens")
    print(f"{'chunks':>7s} {'temp GiB':>9s} {'args GiB':>9s}")
    for chunks in args.chunks:
        task = DualEncoderTask(model, ContrastiveConfig(), grad_cache_chunks=chunks)
        trainer = Trainer(task, OptimizerConfig(), mesh, total_steps=10)
        with jax.set_mesh(mesh):
            compiled = trainer._step.lower(trainer.abstract_state, batch).compile()
        memory = compiled.memory_analysis()
        print(f"{chunks:7d} {memory.temp_size_in_bytes / 2**30:9.2f} "
              f"{memory.argument_size_in_bytes / 2**30:9.2f}")


if __name__ == "__main__":
    main()
