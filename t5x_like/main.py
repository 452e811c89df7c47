"""The README main job: build the default decoder, shard it, run it on real text.

    python -m t5x_like.main [--config=configs/foundation_demo.py] [--config.FIELD=VALUE ...]

Prints the mesh, the parameter count and layout, the packed batch, the jitted
forward pass's time and its next-token loss (about ln(vocab) for an untrained
model), and how far apart the attention implementations' logits are.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, logging
from ml_collections import config_flags

from t5x_like import cli, paths
from t5x_like import partitioning as part
from t5x_like.data import packing, text
from t5x_like.models.decoder import Decoder, DecoderConfig, count_params

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(paths.REPO_ROOT / "configs" / "foundation_demo.py"),
    "ml-collections config file; override fields with --config.FIELD=VALUE.",
)


def next_token_loss(logits: jax.Array, tokens: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting token t+1 from t inside the same document."""
    targets = tokens[:, 1:]
    valid = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1)


def load_batch(cfg) -> dict[str, np.ndarray]:
    import sentencepiece as spm  # a tokenizer, not TensorFlow: fine outside data/

    sp = spm.SentencePieceProcessor(model_file=str(paths.shared_data(cfg.tokenizer)))
    book = text.read_gutenberg(paths.shared_data(cfg.book))
    docs = text.paragraphs(book, min_chars=20)
    needed = cfg.batch_size * cfg.length
    encoded, total = [], 0
    for para in docs:  # tokenise only as many paragraphs as the batch needs
        ids = [sp.bos_id()] + sp.encode(para)
        encoded.append(ids)
        total += len(ids)
        if total >= 2 * needed:
            break
    rows = packing.pack(encoded, cfg.length, pad_id=0)
    if len(rows["tokens"]) < cfg.batch_size:
        raise ValueError(
            f"config.data: {cfg.book} gives {len(rows['tokens'])} rows of {cfg.length} tokens, "
            f"fewer than batch_size={cfg.batch_size}"
        )
    return {k: v[: cfg.batch_size] for k, v in rows.items()}


def run(config) -> dict[str, float]:
    mesh = part.make_mesh(config.mesh)
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; jax {jax.__version__}")
    print(part.describe_mesh(mesh))

    model_cfg = DecoderConfig(**config.model.to_dict())
    batch = load_batch(config.data)
    n_docs = int(sum(len(set(r[r > 0])) for r in batch["segment_ids"]))
    print(
        f"batch: tokens {batch['tokens'].shape} from {config.data.book}, {n_docs} documents "
        f"packed, {int((batch['segment_ids'] > 0).sum())} real tokens"
    )

    model = Decoder(model_cfg)
    tokens = jnp.asarray(batch["tokens"])
    params, _ = part.sharded_init(model, mesh, jax.random.key(config.seed), tokens)
    print(f"decoder: {count_params(params):,} parameters, {model_cfg.num_layers} layers")
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0][:6]:
        print(f"  {jax.tree_util.keystr(path):40s} {str(leaf.shape):16s} {leaf.sharding.spec}")

    results = {}
    logits_by_impl = {}
    with jax.set_mesh(mesh):
        device_batch = part.shard_batch(mesh, batch)
        for impl in config.compare_attention:
            m = Decoder(dataclasses.replace(model_cfg, attention=impl))

            @jax.jit
            def forward(p, b, m=m):
                logits = m.apply({"params": p}, b["tokens"], b["segment_ids"], b["positions"])
                return logits, next_token_loss(logits, b["tokens"], b["segment_ids"])

            t0 = time.perf_counter()
            logits, loss = jax.block_until_ready(forward(params, device_batch))
            compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            logits, loss = jax.block_until_ready(forward(params, device_batch))
            run_s = time.perf_counter() - t0
            logits_by_impl[impl] = np.asarray(logits)
            results[impl] = float(loss)
            print(
                f"forward [{impl:8s}] logits {logits.shape} {logits.sharding.spec}; loss "
                f"{float(loss):.4f} (ln vocab = {math.log(model_cfg.vocab_size):.4f}); "
                f"first call {compile_s:.2f}s, second {run_s * 1e3:.0f} ms"
            )
    impls = list(logits_by_impl)
    for other in impls[1:]:
        diff = np.max(np.abs(logits_by_impl[other] - logits_by_impl[impls[0]]))
        print(f"max |logits[{other}] - logits[{impls[0]}]| = {diff:.2e}")
        results[f"diff_{other}"] = float(diff)
    return results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.FIELD=VALUE")
    logging.set_verbosity(logging.WARNING)
    run(_CONFIG.value)


if __name__ == "__main__":
    cli.run_absl(main)
