"""Finish: the best weights reloaded, the decision rule's thresholds chosen on the validation
rows, best.pt completed, val_probs.csv, summary.json and the curves written."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from mmtag.atomic import atomic_write
from mmtag.data.batching import Pass
from mmtag.evaluation.estimate import decision_figures
from mmtag.evaluation.probs_csv import join_labels, write_val_probs
from mmtag.prediction.checkpoint import (
    BestCheckpoint,
    state_dict_megabytes,
)
from mmtag.prediction.passes import EvalPass, evaluate
from mmtag.run_files import (
    BEST_FILE,
    CURVES_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
)
from mmtag.training.feature_cache import resolve_engine
from mmtag.training.pipelines import loader
from mmtag.training.state import Run

log = logging.getLogger("mmtag.train")


def finish(run: Run) -> dict:
    """Thresholds on the validation rows, summary.json and the curves (rank 0)."""
    cfg, rt, sets = run.cfg, run.rt, run.sets
    summary = _choose_thresholds(run)
    summary["model_mb"] = run.size_mb
    # what this process took (a resumed run: since --resume), and on what
    summary["wall_seconds"] = round(time.time() - run.job.started, 1)
    summary["first_step_seconds"] = run.state.first_step_seconds  # from the process's start
    summary["machine"] = rt.machine
    summary["precision"] = rt.precision.to_dict()
    # what ran the frozen image stages into the cache (a distillation reads this teacher's)
    summary["cache_engine"] = resolve_engine(cfg.cache.engine) if sets.image_stage else None
    summary["processes"] = rt.dist.world
    # where the report finds the rows and photos again ("data_dir": what older readers look for)
    summary["data"] = run.job.source.to_dict()
    if run.job.source.rows is not None:
        summary["data_dir"] = str(run.job.source.rows.parent.resolve())
    atomic_write(run.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    _draw_curves(run.run_dir)
    return summary


def _choose_thresholds(run: Run) -> dict:
    """Reload the best weights and choose the decision thresholds on the validation rows (flip
    TTA from raw images, or from cached flipped features when they exist)."""
    cfg, rt, sets = run.cfg, run.rt, run.sets
    tta = cfg.tta_flip and (sets.image_stage == 0 or cfg.cache.flip)
    if tta and sets.image_stage > 0:
        sets.val.both_views = True  # the loader reads the dataset afresh
    # rank 0 alone: the other ranks wait for the summary
    return finalize(run, loader(sets.val, sets.workers, rt, cfg.channels_last,
                                Pass(cfg.optim.batch_size * 2)), tta)


def finalize(run: Run, val_loader, tta: bool) -> dict:
    """Reload the best weights, choose decision thresholds on the validation split, and store
    them in best.pt; `tta`: with the mirror image."""
    cfg, run_dir, data, model, rt = run.cfg, run.run_dir, run.data, run.model, run.rt
    best = BestCheckpoint.load(run_dir / BEST_FILE)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in best.model.items()})
    _, probs, targets = evaluate(model, val_loader, None, rt.device,
                                 EvalPass(dtype=rt.dtype, channels_last=cfg.channels_last, tta=tta))
    y = targets.astype(int)
    figures = decision_figures(cfg, y, probs, list(data.label_map.display))
    best.thresholds, best.finished = figures["thresholds"], True
    best.decision = figures["decision"]
    log.info("%s", figures["decision_why"])
    best.save(run_dir / BEST_FILE)
    write_val_probs(run_dir, [r.image_id for r in data.val_rows],
                    [join_labels(r.labels) for r in data.val_rows], list(data.label_map.labels),
                    probs)
    mb = state_dict_megabytes(model, cfg.model.fp16_storage)
    rule = ("expected-F1 label sets" if figures["decision"] == "expected_f1"
            else f"thresholds ({cfg.threshold_mode}, {cfg.threshold_metric})")
    tuned, at05 = figures["val"], figures["val_at_0.5"]
    log.info("best epoch %d; %s: val micro-F1 %.4f samples-F1 %.4f (at 0.5: %.4f / %.4f); "
             "saved model %.1f MB", best.epoch, rule, tuned["micro_f1"], tuned["samples_f1"],
             at05["micro_f1"], at05["samples_f1"], mb)
    # "sizes": the image sizes predicted at (one since multi-scale TTA was removed)
    return {"best_epoch": best.epoch, **figures,
            "tta": {"flip": bool(tta), "sizes": [cfg.data.image_size]},
            "saved_model_mb": round(mb, 2),
            "val_rows": len(data.val_rows), "train_rows": len(data.train_rows)}


def _draw_curves(run_dir: Path) -> None:
    try:
        from mmtag.training.curves import plot_curves

        plot_curves(run_dir / METRICS_FILE, run_dir / CURVES_FILE)
    except Exception as e:  # plotting must never cost a finished run
        log.warning("could not draw curves: %s", e)
