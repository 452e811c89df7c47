"""Continued pre-training of a Llama-2-7B-shaped decoder from 4K to 32K context. Arg: full | tiny.

    python -m t5x_like.train --config=configs/llama_long_context.py --workdir=runs/llama_32k \
        --config.model.pretrained=/models/Llama-2-7b-hf --config.data.path=/data/long_docs/

The recipe, three stages in one command (``t5x_like.stages``), each from the last one's
export: rows of 8K, 16K, then 32K tokens, the RoPE base multiplied by 4 for every doubling
of the context (adjusted base frequency: 10K at Llama-2's 4K, so 40K, 160K, 640K), the
same tokens a step throughout (64 rows of 8K, 32 of 16K, 16 of 32K), 1000 steps a
stage. Packed rows with document masking and per-document positions, chunked
cross-entropy, full remat, bf16 compute, learning rate 2e-5 with 20 warmup steps.
The data is a long / short mix as in ProLong: documents of at least a row's tokens at 60%
(``data.long_fraction``), shorter ones at 40%, so short-context skills are kept.
Extending by interpolation instead of a base change is a config change:
``--config.stages.rope_theta_factor=1 --config.model.rope_scaling.rope_type=yarn
--config.model.rope_scaling.factor=8`` (or ``linear``, ``llama3``, ``dynamic``).
Context parallelism: ``--config.mesh.sequence=N`` splits every row over N devices with
ring attention (``model.attention="ring"``, which is the chunked kernel when the sequence
axis has one device), on top of fsdp over the rest.
"""

from configs import base


def get_config(variant: str = "full"):
    c = base.get_config()
    c.task = "lm"
    c.model.pretrained = "meta-llama/Llama-2-7b-hf"
    c.model.dtype = "bfloat16"
    c.model.attention = "ring"
    c.model.remat_policy = "full"
    c.model.scan_layers = True
    c.model.rope_theta = 40_000.0  # stage 0; x4 per stage
    c.stages.num = 3
    c.stages.length_factor = 2
    c.stages.rope_theta_factor = 4.0
    c.stages.constant_tokens = True
    c.mesh.fsdp = -1
    c.mesh.data = 1
    c.target = "h100:8"  # every stage; fits v5p:2x2x2 too (bench/recipes_fit.py)
    c.lm.loss_chunk_size = 2048
    c.data.format = "text"
    c.data.length = 8192  # stage 0; doubled per stage
    c.data.long_fraction = 0.6  # documents of >= a row's tokens (data.long_threshold=0)
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
        c.model.rope_theta = 10_000.0
        c.stages.num = 2
        c.model.scan_layers = False
        c.mesh.fsdp = 1
        c.mesh.data = -1
        c.target = "cpu"
        c.data.path = "text/gutenberg"
        c.data.split_paragraphs = True
        c.data.length = 128  # then 256
        c.lm.loss_chunk_size = 64
        c.train.batch_size = 16  # then 8
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
