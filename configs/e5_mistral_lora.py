"""E5-mistral: a Mistral-7B decoder fine-tuned as an embedder with LoRA (Wang et al. 2023,
"Improving Text Embeddings with Large Language Models"). Arg: full (default) | tiny.

    python -m t5x_like.train --config=configs/e5_mistral_lora.py --workdir=runs/e5_mistral \
        --config.model.pretrained=/models/Mistral-7B-v0.1 --config.data.path=/data/pairs.jsonl

The recipe: last-token pooling over an appended EOS, queries written as
"Instruct: {task}\\nQuery: {query}" (passages bare), LoRA rank 16 (alpha 32) on
every attention and MLP projection with the base frozen, temperature 0.02, global
batch 2048 with one hard negative, 512 tokens, learning rate 1e-4, 1000 steps.
"""

from configs import base


def get_config(variant: str = "full"):
    c = base.get_config()
    c.task = "dual_encoder"
    c.pooling = "last"
    c.model.pretrained = "mistralai/Mistral-7B-v0.1"
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.model.attention = "chunked"
    c.model.scan_layers = True
    c.target = "h100:8"  # fits v5p:2x2x2 too (bench/recipes_fit.py)
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.objective.temperature = 0.02
    c.lora.enabled = True
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.data.format = "pairs"  # records may carry their own "instruction"
    c.data.negatives = "given"
    c.data.num_negatives = 1
    c.data.query_length = 512
    c.data.passage_length = 512
    c.data.append_eos = True
    c.data.instruction = "Given a web search query, retrieve relevant passages that answer the query"
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 100
    c.train.steps = 1000
    c.train.batch_size = 2048
    c.train.grad_cache_chunks = 32
    c.eval.instruction = c.data.instruction
    if variant == "tiny":
        c.model.pretrained = ""
        c.model.architecture = "decoder"
        c.model.config = base._section(
            model_type="mistral", vocab_size=32000, embed_dim=64, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=16, mlp_dim=128, max_position_embeddings=256,
            sliding_window=64, lm_head=False)
        c.model.tokenizer = "tokenizers/llama2.model"  # Mistral's SentencePiece family
        c.model.dtype = "float32"
        c.model.remat_policy = "none"
        c.model.scan_layers = False
        c.target = "cpu"
        c.mesh.data, c.mesh.fsdp = -1, 1
        c.lora.rank = 4
        c.lora.alpha = 8.0
        c.data.format = "beir"
        c.data.path = "beir/scifact"
        c.data.negatives = "bm25"
        c.data.query_length = 48
        c.data.passage_length = 64
        c.train.steps = 3
        c.train.batch_size = 16
        c.train.grad_cache_chunks = 2
        c.train.log_every = 1
        c.train.checkpoint_every = 2
        c.optimizer.warmup_steps = 1
        c.optimizer.learning_rate = 1e-3
    elif variant != "full":
        raise ValueError(f"configs/e5_mistral_lora.py:{variant}: choose full or tiny")
    return c
