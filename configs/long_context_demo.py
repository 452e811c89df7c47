"""The long-context recipe at CPU scale: a small decoder pre-trained at 512 tokens, extended
to 2048 (4x). Arg: pretrain | extend | tiny. ``bench/long_context_demo.py`` runs the first
two and the probes; ``tiny`` is the pretrain run at test scale (a 2-layer d 64 decoder, the
Llama-2 vocabulary, 128-token rows, 3 steps) on the shared books.

    python bench/long_context_demo.py --workdir runs/long_context_demo

* ``pretrain``: a 4-layer, d 256 Llama-shaped decoder (GQA 4:2, tied embeddings, RoPE
  base 10K) trained from scratch on Gutenberg books packed into 512-token rows (document
  masking, per-document positions) with a 4K-piece SentencePiece vocabulary trained on the
  same books (the Llama-2 vocabulary's 32K-row softmax would cost most of the CPU time).
* ``extend``: the recipe of ``configs/llama_long_context.py`` from the pre-trained export:
  two stages, 1024 then 2048 tokens a row, the RoPE base x4 per doubling (40K, 160K), the
  same 8K tokens a step, full remat and chunked attention and loss.

The demo script fills in ``data.path``, ``model.tokenizer`` and (extend) ``model.pretrained``.
"""

from configs import base


def get_config(variant: str = "pretrain"):
    c = base.get_config()
    c.task = "lm"
    c.mesh.data = -1
    c.data.format = "text"
    c.data.length = 512
    c.lm.loss_chunk_size = 128
    c.model.dtype = "float32"
    c.model.attention = "chunked"
    c.train.batch_size = 16
    c.train.log_every = 10
    c.train.export = True
    c.train.keep_checkpoints = 1
    c.eval.lm_batches = 4
    c.optimizer.weight_decay = 0.01
    c.optimizer.decay = "cosine"
    c.optimizer.end_factor = 0.1
    # The pre-trained shape; extend reads it from model.pretrained (the pretrain export) and
    # keeps it here for the fit check (python -m t5x_like.compile), which loads no weights.
    c.model.architecture = "decoder"
    c.model.config = base._section(
        model_type="llama", vocab_size=4096, embed_dim=256, num_layers=4, num_heads=4,
        num_kv_heads=2, head_dim=64, mlp_dim=688, tie_embeddings=True,
        rope_theta=10_000.0, max_position_embeddings=512)
    if variant == "pretrain":
        c.train.steps = 300  # 2.5M tokens, about 3/4 of an epoch of the nine books
        c.train.checkpoint_every = 100
        c.optimizer.learning_rate = 3e-3
        c.optimizer.warmup_steps = 30
    elif variant == "extend":
        c.model.rope_theta = 40_000.0  # stage 0 (1024 tokens); x4 for stage 1 (2048)
        c.model.remat_policy = "full"
        c.data.length = 1024
        c.stages.num = 2
        c.stages.length_factor = 2
        c.stages.rope_theta_factor = 4.0
        c.stages.constant_tokens = True
        c.train.batch_size = 8  # 8K tokens a step, then 4 rows of 2048
        c.train.steps = 60
        c.train.checkpoint_every = 30
        c.optimizer.learning_rate = 5e-4
        c.optimizer.warmup_steps = 5
    elif variant == "tiny":
        c.model.config = base._section(
            model_type="llama", vocab_size=32000, embed_dim=64, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=16, mlp_dim=128, tie_embeddings=True,
            rope_theta=10_000.0, max_position_embeddings=128)
        c.model.tokenizer = "tokenizers/llama2.model"
        c.target = "cpu"
        c.data.path = "text/gutenberg"
        c.data.length = 128
        c.lm.loss_chunk_size = 64
        c.train.steps = 3
        c.train.log_every = 1
        c.train.checkpoint_every = 2
        c.train.keep_checkpoints = 2
        c.eval.lm_path = "text/tinyshakespeare.txt"
        c.eval.lm_batches = 2
        c.optimizer.learning_rate = 3e-3
        c.optimizer.warmup_steps = 1
    else:
        raise ValueError(f"configs/long_context_demo.py:{variant}: choose pretrain, extend or tiny")
    return c
