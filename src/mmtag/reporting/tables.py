"""The ablation's tables: results.csv (one row per run) and results.md (per variant: mean and
standard deviation over seeds; the paired difference of each variant to the baseline)."""

from __future__ import annotations

import csv
import io

from mmtag.atomic import read_json
from mmtag.reporting.render import render
from mmtag.reporting.stats import mean_sd, paired

# (results.csv column, heading, scale): F1 figures and their differences are read in points
METRICS = [
    ("val_at_0.5.micro_f1", "micro-F1 at threshold 0.5 (the report's figure)", 100),
    ("val_crossfit.micro_f1", "micro-F1, tuned threshold (cross-fit)", 100),
    ("val_crossfit.samples_f1", "samples-F1, the run's decision rule (cross-fit)", 100),
    ("val_loss", "validation loss (best epoch)", 1),
]


def rows_csv(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def by_variant(rows: list[dict]) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for r in rows:
        out.setdefault(r["variant"], {})[int(r["seed"])] = r
    return out


def variant_table(abl, rows: list[dict]) -> list[dict]:
    """Per variant: its overrides, seeds, and mean / sd of each metric and of the time."""
    groups = by_variant(rows)
    table = []
    for variant, sets in abl.grid.variants.items():
        runs = groups.get(variant, {})
        if not runs:
            continue
        cells = []
        for key, _, scale in METRICS:
            values = [r[key] * scale for r in runs.values() if r.get(key) is not None]
            cells.append(mean_sd(values) if values else (None, None))
        minutes = mean_sd([r["train_seconds"] / 60 for r in runs.values()])
        table.append({"variant": variant, "own": own_overrides(abl, variant),
                      "all": sets, "seeds": sorted(runs), "cells": cells, "minutes": minutes,
                      "mb": next(iter(runs.values()))["saved_model_mb"]})
    return table


def own_overrides(abl, variant: str) -> list[str]:
    """What sets a variant apart: its overrides beyond the grid's common ones."""
    base = abl.grid.variants[abl.grid.baseline]
    return [s for s in abl.grid.variants[variant] if s not in base]


def paired_table(abl, rows: list[dict]) -> list[dict]:
    """Per non-baseline variant and metric: the per-seed differences to the baseline, their
    mean, 95 % interval and paired t-test, over the seeds both finished."""
    groups = by_variant(rows)
    base = groups.get(abl.grid.baseline, {})
    table = []
    for variant in abl.grid.variants:
        runs = groups.get(variant, {})
        if variant == abl.grid.baseline or not runs:
            continue
        seeds = sorted(set(runs) & set(base))
        for key, label, scale in METRICS:
            if key == "val_loss":
                continue  # each run's own loss: BCE and focal values do not compare
            v = [runs[s][key] * scale for s in seeds]
            b = [base[s][key] * scale for s in seeds]
            table.append({"variant": variant, "metric": label, "scale": scale,
                          "diffs": [x - y for x, y in zip(v, b, strict=True)],
                          "test": paired(v, b)})
    return table


def ablation_markdown(abl, rows: list[dict], command: str, failed: list) -> str:
    summary = read_json(abl.out / rows[0]["run"] / "summary.json")
    cfg = abl.base_config
    return render("results.md.j2", abl=abl, command=command, metrics=METRICS,
                  variants=variant_table(abl, rows), paired=paired_table(abl, rows),
                  n_runs=len(rows), n_planned=len(abl.grid.variants) * len(abl.seeds),
                  diverged=failed,
                  summary=summary, cached=cfg.model.freeze_image != "none",
                  image_encoder=cfg.model.image_encoder, freeze=cfg.model.freeze_image)
