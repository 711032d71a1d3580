"""Loading a trained run and predicting labels."""

