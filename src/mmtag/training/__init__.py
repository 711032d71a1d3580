"""Configs, losses, metrics, thresholds, checkpoints and the training loop."""

