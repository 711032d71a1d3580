"""Experiments and reports over finished runs: ablation grids (`ablate`), overlaid curves and
bar charts (`compare`), and a self-contained report of a run or an ablation (`report`).

This layer sits above training and evaluation: it calls `mmtag.api.train` and reads run
folders; nothing below imports it."""
