"""What predicting with a trained run needs, below training and inference alike: the
checkpoint format (best.pt), model.json's format, the evaluation pass with flip TTA, timing."""
