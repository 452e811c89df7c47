"""The README main job until the trainer lands: a sharded decoder forward on real text.

    python -m t5x_like.main --config=configs/foundation_demo.py --config.mesh.tensor=2
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Mesh axis sizes; -1 takes the remaining devices.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, sequence=1))
    # Fields of t5x_like.models.decoder.DecoderConfig (a small Llama shape, Llama-2 vocab).
    config.model = ml_collections.ConfigDict(
        dict(
            vocab_size=32000, embed_dim=256, num_layers=4, num_heads=8, num_kv_heads=2,
            head_dim=32, mlp_dim=688, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False,
            qkv_bias=False, causal=True, dtype="float32", attention="chunked", remat_policy="none",
        )
    )
    config.data = ml_collections.ConfigDict(
        dict(
            # Relative to the shared data directory ($T5X_LIKE_SHARED_DATA or ../shared/data).
            book="text/gutenberg/frankenstein_pg84.txt",
            tokenizer="tokenizers/llama2.model",
            batch_size=8,
            length=512,
        )
    )
    # Attention implementations whose logits are compared on the same batch.
    config.compare_attention = ("xla", "chunked")
    return config
