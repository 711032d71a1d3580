"""The ablation's tables: results.csv (one row per run) and results.md (per variant: mean and
standard deviation over seeds; the paired difference of each variant to the baseline)."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from mmtag.atomic import read_json
from mmtag.config import TrainConfig
from mmtag.reporting.render import render
from mmtag.reporting.stats import mean_sd, paired
from mmtag.run_files import SUMMARY_FILE


@dataclass(frozen=True)
class Metric:
    column: str     # results.csv's
    label: str
    scale: float    # F1 figures and their differences are read in points (x100)
    digits: int
    paired: bool    # compared with the baseline (a loss is not: BCE and focal values differ)


METRICS = [
    Metric("val_at_0.5.micro_f1", "micro-F1 at threshold 0.5 (the report's figure)", 100, 2, True),
    Metric("crossfit.threshold.micro_f1", "micro-F1, tuned threshold (cross-fit)", 100, 2, True),
    Metric("crossfit.expected_f1.samples_f1", "samples-F1, expected-F1 label sets (cross-fit)",
           100, 2, True),
    Metric("val_loss", "validation loss (best epoch)", 1, 4, False),
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


def _values(runs: dict[int, dict], metric: Metric) -> dict[int, float]:
    """seed -> the metric in its display unit, for the runs that have it."""
    return {seed: r[metric.column] * metric.scale for seed, r in runs.items()
            if r.get(metric.column) is not None}


def variant_table(abl, rows: list[dict]) -> list[dict]:
    """Per variant: its own overrides, seeds, and mean / sd of each metric and of the time."""
    groups = by_variant(rows)
    table = []
    for variant in abl.grid.variants:
        runs = groups.get(variant, {})
        if not runs:
            continue
        cells = []
        for m in METRICS:
            values = list(_values(runs, m).values())
            cells.append((*mean_sd(values), m.digits) if values else (None, None, m.digits))
        table.append({"variant": variant, "own": own_overrides(abl, variant),
                      "seeds": sorted(runs), "cells": cells,
                      "minutes": mean_sd([r["train_seconds"] / 60 for r in runs.values()]),
                      "mb": next(iter(runs.values()))["saved_model_mb"]})
    return table


def own_overrides(abl, variant: str) -> list[str]:
    """What sets a variant apart: its overrides beyond the baseline's (the grid's common
    ones)."""
    base = abl.grid.variants[abl.grid.baseline]
    return [s for s in abl.grid.variants[variant] if s not in base]


def paired_table(abl, rows: list[dict]) -> list[dict]:
    """Per non-baseline variant and F1 metric: the per-seed differences to the baseline over
    the seeds both have, their mean, 95 % interval and paired t-test."""
    groups = by_variant(rows)
    base = groups.get(abl.grid.baseline, {})
    table = []
    for variant in abl.grid.variants:
        runs = groups.get(variant, {})
        if variant == abl.grid.baseline or not runs:
            continue
        for m in (m for m in METRICS if m.paired):
            v, b = _values(runs, m), _values(base, m)
            seeds = sorted(set(v) & set(b))
            table.append({"variant": variant, "metric": m.label, "seeds": seeds,
                          "diffs": [v[s] - b[s] for s in seeds],
                          "test": paired([v[s] for s in seeds], [b[s] for s in seeds])})
    return table


def cache_note(cfg: TrainConfig) -> str | None:
    """What a base recipe on cached image features cannot show, or None."""
    freeze = cfg.model.freeze_image
    if cfg.model.image_encoder == "none" or freeze == "none" or cfg.cache.enabled == "off":
        return None
    if freeze == "all":
        return (f"The base recipe keeps its image encoder ({cfg.model.image_encoder}) frozen "
                f"and trains on its cached features: these results say nothing about "
                f"fine-tuning the image encoder.")
    return (f"The base recipe trains on cached features of the first {freeze} stages of its "
            f"image encoder ({cfg.model.image_encoder}), which stay frozen, and with flip "
            f"augmentation only.")


# what summary.json's machine holds (runs saved before a key existed lack it: "not recorded")
MACHINE_KEYS = ("cpu", "logical_cpus", "torch_threads", "fast_bf16", "device", "gpu",
                "gpu_memory_gb", "memory_gb", "os", "torch", "python", "packages")


def machine_facts(summary: dict) -> dict:
    """summary.json's machine, with the precision the run chose on it (runtime.Precision)."""
    return {**dict.fromkeys(MACHINE_KEYS), **(summary.get("machine") or {}),
            "precision": summary.get("precision")}


def results_context(abl, rows: list[dict], command: str, diverged: list) -> dict:
    """What results.md and the ablation report show."""
    summary = read_json(abl.out / rows[0]["run"] / SUMMARY_FILE)
    return {"abl": abl, "command": command, "metrics": METRICS,
            "variants": variant_table(abl, rows), "paired": paired_table(abl, rows),
            "rows": rows, "n_runs": len(rows),
            "n_planned": len(abl.grid.variants) * len(abl.seeds), "diverged": diverged,
            "summary": summary, "machine": machine_facts(summary),
            "cache_note": cache_note(abl.base_config)}


def ablation_markdown(abl, rows: list[dict], command: str, diverged: list) -> str:
    return render("results.md.j2", **results_context(abl, rows, command, diverged))
