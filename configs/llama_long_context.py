"""Continued pre-training of a Llama-2-7B-shaped decoder to 32K context. Arg: full | tiny.

    python -m t5x_like.train --config=configs/llama_long_context.py --workdir=runs/llama_32k \
        --config.model.pretrained=/models/Llama-2-7b-hf --config.data.path=/data/long_docs/

The recipe (one stage; the long-context issue chains stages): RoPE base raised
from 10K to 500K (adjusted base frequency), packed rows of 32K tokens with
document masking and per-document positions, chunked cross-entropy, full remat,
bf16 compute, learning rate 2e-5 with 20 warmup steps, 64 rows a step.
"""

from configs import base


def get_config(variant: str = "full"):
    c = base.get_config()
    c.task = "lm"
    c.model.pretrained = "meta-llama/Llama-2-7b-hf"
    c.model.dtype = "bfloat16"
    c.model.attention = "chunked"
    c.model.remat_policy = "full"
    c.model.scan_layers = True
    c.model.rope_theta = 500_000.0
    c.model.max_position_embeddings = 32_768
    c.mesh.fsdp = -1
    c.mesh.data = 1
    c.lm.loss_chunk_size = 2048
    c.data.format = "text"
    c.data.length = 32_768
    c.optimizer.learning_rate = 2e-5
    c.optimizer.warmup_steps = 20
    c.optimizer.decay = "constant"
    c.optimizer.weight_decay = 0.0
    c.train.batch_size = 64
    c.train.steps = 1000
    c.train.checkpoint_every = 100
    if variant == "tiny":
        c.model.pretrained = ""
        c.model.architecture = "decoder"
        c.model.config = base._section(
            model_type="llama", vocab_size=32000, embed_dim=64, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=16, mlp_dim=128, max_position_embeddings=256)
        c.model.tokenizer = "tokenizers/llama2.model"
        c.model.dtype = "float32"
        c.model.max_position_embeddings = 512
        c.model.scan_layers = False
        c.mesh.fsdp = 1
        c.mesh.data = -1
        c.data.path = "text/gutenberg"
        c.data.split_paragraphs = True
        c.data.length = 256
        c.lm.loss_chunk_size = 64
        c.train.batch_size = 8
        c.train.steps = 3
        c.train.log_every = 1
        c.train.checkpoint_every = 2
        c.optimizer.learning_rate = 1e-3
        c.optimizer.warmup_steps = 1
        c.eval.lm_path = "text/tinyshakespeare.txt"
        c.eval.lm_batches = 2
    elif variant != "full":
        raise ValueError(f"configs/llama_long_context.py:{variant}: choose full or tiny")
    return c
