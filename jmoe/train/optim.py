"""AdamW with linear warmup, cosine decay and global-norm gradient clipping."""

import optax


def learning_rate(cfg_optim, steps: int):
    """Warmup from 0 to `lr` over `warmup_steps`, then cosine to `lr * min_lr_ratio`."""
    warm = max(1, min(cfg_optim.warmup_steps, steps - 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg_optim.lr,
        warmup_steps=warm,
        decay_steps=max(steps, warm + 1),
        end_value=cfg_optim.lr * cfg_optim.min_lr_ratio,
    )


def make_optimizer(cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    o = cfg.optim
    schedule = learning_rate(o, cfg.train.steps)
    tx = optax.chain(
        optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay),
    )
    return tx, schedule
