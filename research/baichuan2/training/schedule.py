"""The learning-rate table, one value per optimizer step."""
import math


def lr_schedule(total_steps, lr, min_lr, warmup_ratio):
    """Per-step learning rates: linear warmup to `lr`, then cosine decay to `min_lr` (indexed by optimizer step)."""
    warmup = int(math.ceil(warmup_ratio * total_steps))
    lrs = []
    for step in range(total_steps):
        if step < warmup:
            lrs.append(lr * (step + 1) / warmup)
        else:
            progress = (step - warmup) / max(1, total_steps - warmup)
            lrs.append(min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress)))
    return lrs
