"""E5 supervised fine-tuning with hard negatives (and optional distillation), by size:
small | base | large | tiny.

    python -m t5x_like.train --config=configs/e5_finetune.py:base --workdir=runs/e5_base_ft \
        --config.model.pretrained=/models/e5-base-unsupervised --config.data.path=/data/msmarco.jsonl

The recipe: 7 hard negatives a query, 192 tokens a side, temperature 0.01,
global batch 256, learning rate 3e-5 / 2e-5 / 1e-5 by size. Knowledge
distillation from a cross-encoder: give a pairs file with teacher ``scores``
and set ``--config.objective.kd_weight=1.0 --config.objective.contrastive_weight=0.2``
(E5 weights the contrastive term 0.2 beside the KL term).
"""

from configs import base
from configs.e5_pretrain import tiny_encoder

SIZES = {
    "small": ("intfloat/e5-small-unsupervised", 3e-5),
    "base": ("intfloat/e5-base-unsupervised", 2e-5),
    "large": ("intfloat/e5-large-unsupervised", 1e-5),
}


def get_config(size: str = "base"):
    c = base.get_config()
    c.task = "dual_encoder"
    c.pooling = "mean"
    c.objective.temperature = 0.01
    c.data.format = "pairs"  # {"query", "positive", "negatives": [...], "scores"?} JSONL
    c.data.negatives = "given"
    c.data.num_negatives = 7
    c.data.query_length = 192
    c.data.passage_length = 192
    c.data.query_prefix = "query: "
    c.data.passage_prefix = "passage: "
    c.model.dtype = "bfloat16"
    c.optimizer.warmup_steps = 400
    c.train.batch_size = 256
    c.train.epochs = 3.0
    c.train.grad_cache_chunks = 4
    c.eval.query_prefix = "query: "
    c.eval.passage_prefix = "passage: "
    c.target = "h100:8"  # every size fits v5e:2x4 too (bench/recipes_fit.py)
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.model.scan_layers = True  # one compiled layer: minutes less to compile at 24 layers
    if size == "tiny":
        c = tiny_encoder(c)
        c.model.dtype = "float32"
        c.data.num_negatives = 3
        c.data.negatives = "bm25"
        c.data.query_length = 32
        c.data.passage_length = 64
        c.train.epochs = 0.0
        c.train.grad_cache_chunks = 1
        c.optimizer.learning_rate = 1e-3
        c.optimizer.warmup_steps = 1
        return c
    if size not in SIZES:
        raise ValueError(f"configs/e5_finetune.py:{size}: choose one of {sorted(SIZES) + ['tiny']}")
    c.model.pretrained, c.optimizer.learning_rate = SIZES[size]
    if size == "large":  # 16 chunks keep BERT-large's activations inside a v5e's 16 GiB
        c.train.grad_cache_chunks = 16
    return c
