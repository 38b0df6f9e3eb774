"""Mixtral-8x7B shapes (Jiang et al., 2024): 46.7B total / 12.9B active parameters."""

from jmoe.train.defaults import base_config


def get_config():
    c = base_config()
    c.model.update(
        kind="lm",
        vocab_size=32000,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        d_ff=14336,
        max_len=32768,
        rope_theta=1e6,
        tie_embeddings=False,
        moe_every=1,
        dtype="bfloat16",
        param_dtype="bfloat16",
    )
    c.moe.update(num_experts=8, top_k=2, d_ff=14336, router="topk", softmax_order="after")
    c.data.update(seq_len=4096)
    return c
