"""CI-sized byte-level MoE LM on the Python standard library's sources (~1 min on 2 CPUs)."""

from jmoe.train.defaults import base_config


def get_config():
    c = base_config()
    c.model.update(
        kind="lm",
        vocab_size=256,
        d_model=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        d_ff=256,
        max_len=128,
        moe_every=1,
    )
    c.moe.update(num_experts=4, top_k=2, d_ff=192, router="topk")
    c.data.update(seq_len=64, batch_size=32, max_bytes=4_000_000, eval_batches=8)
    c.optim.update(lr=4e-3, warmup_steps=30)
    c.train.update(steps=300, log_every=50, eval_every=150, checkpoint_every=150)
    return c
