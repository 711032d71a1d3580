"""Scoring predictions: metrics, decision rules and thresholds, the cross-fit estimate."""
