"""OLMoE-1B-7B shapes (Muennighoff et al., 2024): 6.9B total / 1.3B active parameters."""

from jmoe.train.defaults import base_config


def get_config():
    c = base_config()
    c.model.update(
        kind="lm",
        vocab_size=50304,
        d_model=2048,
        num_layers=16,
        num_heads=16,
        head_dim=128,
        d_ff=1024,
        max_len=4096,
        tie_embeddings=False,
        qk_norm=True,
        moe_every=1,
        dtype="bfloat16",
        param_dtype="bfloat16",
    )
    c.moe.update(num_experts=64, top_k=8, d_ff=1024, router="topk", normalize_weights=False)
    c.data.update(seq_len=4096)
    return c
