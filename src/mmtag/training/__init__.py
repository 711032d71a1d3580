"""Training: the loop body, optimizers and schedules, losses, the feature cache, checkpoints,
the run folder and `fit`."""

