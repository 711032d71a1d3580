"""Plots and reports drawn from a run folder."""

