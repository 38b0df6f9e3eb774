"""MoE MLP classifier on scikit-learn's bundled 8x8 digits."""

from jmoe.train.defaults import base_config


def get_config():
    c = base_config()
    c.model.update(
        kind="classifier",
        arch="mlp",
        input_dim=64,
        d_model=64,
        num_layers=2,
        d_ff=128,
        num_heads=4,
        num_classes=10,
        moe_every=1,
    )
    c.moe.update(num_experts=4, top_k=2, d_ff=128, router="topk")
    c.data.update(kind="digits", batch_size=64, heldout_percent=20)
    c.optim.update(lr=3e-3, warmup_steps=20, weight_decay=0.01)
    c.train.update(steps=600, log_every=100, eval_every=200, checkpoint_every=300)
    return c
