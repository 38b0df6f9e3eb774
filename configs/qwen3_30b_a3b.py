"""Qwen3-30B-A3B shapes (Qwen team, 2025): 30.5B total / 3.3B active parameters."""

from jmoe.train.defaults import base_config


def get_config():
    c = base_config()
    c.model.update(
        kind="lm",
        vocab_size=151936,
        d_model=2048,
        num_layers=48,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        d_ff=6144,
        max_len=32768,
        rope_theta=1e6,
        tie_embeddings=False,
        qk_norm=True,
        moe_every=1,
        dtype="bfloat16",
        param_dtype="bfloat16",
    )
    c.moe.update(num_experts=128, top_k=8, d_ff=768, router="topk")
    c.data.update(seq_len=4096)
    return c
