"""A small byte-level MoE LM (minutes to hours on CPU; fine on one GPU)."""

from jmoe.train.defaults import base_config


def get_config():
    c = base_config()
    c.model.update(
        kind="lm",
        vocab_size=256,
        d_model=256,
        num_layers=6,
        num_heads=8,
        num_kv_heads=4,
        d_ff=1024,
        max_len=256,
        moe_every=2,
        moe_offset=1,
        tie_embeddings=False,
    )
    c.moe.update(
        num_experts=8, top_k=2, d_ff=512, router="topk", num_shared_experts=1, fine_grained=2
    )
    c.data.update(seq_len=256, batch_size=32, eval_batches=16)
    c.optim.update(lr=1e-3, warmup_steps=200)
    c.train.update(steps=5000, log_every=100, eval_every=500, checkpoint_every=500)
    return c
