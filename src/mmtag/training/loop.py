"""The training program: `fit` = claim the run folder -> `setup` -> the epochs -> `finish`.

Read it top to bottom: `fit` claims the folder and makes the `Job`; `setup.setup` builds the
`Run` (data, model, datasets, optimizer); `_epochs` trains, validates and checkpoints each
epoch; `finish.finish` chooses the thresholds and writes summary.json. Beside them: the data
pipelines in `pipelines`, the loop body in `engine`, the optimizer and schedule in `optim`, the
run folder's lock in `run_folder`, what the run carries in `state`.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

from torch import nn

from mmtag.config import TrainConfig
from mmtag.data.csv_io import Record
from mmtag.data.sources import Source, open_data
from mmtag.distributed import (
    barrier,
    from_env,
    from_rank_zero,
    on_main,
    start,
    stop,
)
from mmtag.evaluation.estimate import epoch_scores
from mmtag.prediction.checkpoint import (
    FORMAT_VERSION,
    BestCheckpoint,
    atomic_save,
    inference_state_dict,
)
from mmtag.prediction.passes import EvalPass, evaluate
from mmtag.run_files import (
    BEST_FILE,
    LAST_FILE,
    LOCK_FILE,
    METRICS_FILE,
    RunFolderTakenError,
    RunNotFoundError,
    append_metrics_row,
)
from mmtag.runtime import (
    resolve_device,
    rng_state,
    seconds_since_start,
    seed_everything,
    set_deterministic,
)
from mmtag.training.engine import StepOptions, TrainingDivergedError, train_one_epoch
from mmtag.training.finish import finish
from mmtag.training.pipelines import loader, sharded_pass, train_batches
from mmtag.training.run_folder import claim_run_folder, run_lock
from mmtag.training.setup import setup
from mmtag.training.state import Job, Run, RunData, TrainState, runtime

log = logging.getLogger("mmtag.train")

__all__ = ["fit", "TrainingDivergedError", "best_checkpoint_of"]


def fit(cfg: TrainConfig, source: Source | Path | str, run_dir: Path | str, *, resume: bool = False,
        restart: bool = False, progress: bool | None = None) -> dict:
    """Train, keep the best and last checkpoints, choose thresholds; returns the summary.

    `resume` continues from `last.pt` (a run that stopped before its first checkpoint starts
    over with the same config). `restart`: `run_dir` may hold the files of a run that stopped
    before its first checkpoint; they are deleted and the run starts over.

    Under torchrun every process calls it: rank 0 claims the folder and writes every file and
    returns the summary, the other ranks return None."""
    started = time.time()
    run_dir = Path(run_dir)
    source = source if isinstance(source, Source) else open_data(source)  # a Kaggle folder, a table
    progress = sys.stderr.isatty() if progress is None else progress
    rows = source.read(need_labels=True)  # a bad file is reported before anything is written
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderTakenError(f"run folder {run_dir} is a file; choose another --out")
    if resume and not run_dir.is_dir():
        raise RunNotFoundError(f"cannot resume: run folder {run_dir} does not exist")
    dist = from_env()
    device = start(dist, resolve_device(cfg.device))
    try:
        with ExitStack() as held:  # rank 0 holds the run folder's lock until training ends
            resume = on_main(dist, lambda: _claim(cfg, source, run_dir, resume, restart, held))
            job = Job(cfg, source, run_dir, runtime(cfg, device, dist), progress and dist.main,
                      started)
            summary = _train(job, rows, resume)
        barrier(dist)  # nobody leaves the process group while another still talks in it
        return summary
    finally:
        stop(dist)


def _claim(cfg: TrainConfig, source: Source, run_dir: Path, resume: bool, restart: bool,
           held: ExitStack) -> bool:
    """Lock `run_dir` (in `held`) and claim it (whether the run resumes); a refused folder is
    left as it was found."""
    made = [p for p in (run_dir, run_dir / LOCK_FILE) if not p.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    held.enter_context(run_lock(run_dir))
    try:
        return claim_run_folder(cfg, source, run_dir, resume, restart)
    except (FileExistsError, FileNotFoundError):
        for p in reversed(made):
            p.rmdir() if p.is_dir() else p.unlink()
        raise


def _train(job: Job, rows: list[Record], resume: bool) -> dict | None:
    """setup -> epochs -> finish; the summary on rank 0, None on the other ranks."""
    cfg = job.cfg
    seed_everything(cfg.seed)
    if cfg.deterministic:
        set_deterministic()
    for warning in cfg.warnings():
        log.warning(warning)
    run = setup(job, rows, resume)
    _epochs(run)
    summary = on_main(job.rt.dist, lambda: finish(run))
    return summary if job.rt.dist.main else None


def _epochs(run: Run) -> None:
    """Train from state.start_epoch to optim.epochs (or early stopping): after each epoch,
    validate, save best.pt when the best metric improved, append to metrics.csv, save last.pt
    (rank 0 writes; every rank has the same metrics row)."""
    cfg, rt, sets, state = run.cfg, run.rt, run.sets, run.state
    o = cfg.optim
    val_loader = loader(sets.val, sets.workers, rt, cfg.channels_last,
                        sharded_pass(o.batch_size * 2, rt.dist))
    for epoch in range(state.start_epoch, o.epochs + 1):
        if o.early_stopping and state.bad_epochs >= o.early_stopping:
            log.info("early stopping: no better %s for %d epochs", cfg.best_metric,
                     state.bad_epochs)
            break
        row = _epoch(run, val_loader, epoch, first=epoch == state.start_epoch)
        improved = _track_best(cfg, state, row, epoch)
        if rt.dist.main:
            _save_epoch(run, epoch, row, improved)
        log.info("epoch %d/%d  train loss %.4f micro-F1 %.4f | val loss %.4f micro-F1 %.4f "
                 "samples-F1 %.4f (F1 at 0.5, no TTA) | lr %.2g | %.0fs%s", epoch, o.epochs,
                 row["train_loss"], row["train_micro_f1"], row["val_loss"], row["val_micro_f1"],
                 row["val_samples_f1"], row["lr"], row["seconds"], "  *best*" if improved else "")


def _save_epoch(run: Run, epoch: int, row: dict, improved: bool) -> None:
    """best.pt when the epoch improved, the metrics.csv row, last.pt."""
    model, state, run_dir = run.model, run.state, run.run_dir
    if improved:
        with _validated_weights(model, state):
            best_checkpoint_of(run.cfg, model, run.data, epoch, row).save(run_dir / BEST_FILE)
    append_metrics_row(run_dir / METRICS_FILE, row)
    atomic_save(_last_payload(model, state, epoch, run.rt.dist.world), run_dir / LAST_FILE)


def _epoch(run: Run, val_loader, epoch: int, first: bool) -> dict:
    """Train one epoch and validate (plain view: per-epoch validation ranks epochs, flip TTA is
    for the final figures); returns metrics.csv's row. `first`: this process's first epoch
    (the time to its first step is logged and kept)."""
    cfg, rt, model, state = run.cfg, run.rt, run.model, run.state
    o = cfg.optim
    batches = train_batches(cfg, run.sets, rt, epoch)
    t0 = time.time()
    lr = state.optimizer.param_groups[0]["lr"]
    opts = step_options(run, epoch, first)
    try:
        tr_loss, tr_probs, tr_targets = train_one_epoch(model, batches, state.loss_fn,
                                                        state.optimizer, opts)
    except TrainingDivergedError as e:
        kept = LAST_FILE if (run.run_dir / LAST_FILE).exists() else "no checkpoint yet"
        raise TrainingDivergedError(
            f"{e}; training stopped, the last good checkpoint is kept ({kept}). Try a lower "
            f"optim.lr, optim.grad_clip=1.0, or amp=none.") from None
    # each rank updated its BatchNorm statistics (and their average) from its own batches
    from_rank_zero([*model.buffers(), *(state.ema.shadow.values() if state.ema else [])],
                   rt.dist)
    with _validated_weights(model, state):
        va_loss, va_probs, va_targets = evaluate(model, val_loader, state.loss_fn, rt.device, EvalPass(
            dtype=rt.dtype, channels_last=cfg.channels_last, progress=run.job.progress,
            desc="validate", dist=rt.dist, rows=len(run.sets.val)))
    row = {"epoch": epoch, "lr": lr, **epoch_scores("train", tr_loss, tr_probs, tr_targets),
           **epoch_scores("val", va_loss, va_probs, va_targets),
           "seconds": round(time.time() - t0, 2)}
    warming = state.warmup is not None and not state.warmup.finished
    if state.scheduler is not None and o.scheduler == "plateau" and not warming:
        state.scheduler.step(va_loss if o.plateau_on == "val_loss" else row["val_micro_f1"])
    return row


def step_options(run: Run, epoch: int, first: bool) -> StepOptions:
    """How epoch `epoch` steps; `first`: the time to the first step is logged and kept."""
    cfg, rt, state = run.cfg, run.rt, run.state
    o = cfg.optim
    return StepOptions(
        rt.device, dtype=rt.dtype, scaler=state.scaler, grad_clip=o.grad_clip,
        step_scheduler=state.scheduler if o.scheduler == "cosine" else state.warmup,
        channels_last=cfg.channels_last, progress=run.job.progress,
        desc=f"epoch {epoch}/{o.epochs}",
        aux_weight=cfg.model.aux_weight if cfg.model.aux_heads != "none" else 0.0, ema=state.ema,
        train_model=run.train_model, dist=rt.dist,
        on_first_step=(lambda: _first_step(state)) if first else None)


def _first_step(state: TrainState) -> None:
    state.first_step_seconds = round(seconds_since_start(), 1)
    log.info("first training step done %.1f s after the command started",
             state.first_step_seconds)


def _track_best(cfg: TrainConfig, state: TrainState, row: dict, epoch: int) -> bool:
    """Update the best value and epoch from `row`; returns whether this epoch is the best."""
    value = row[f"val_{cfg.best_metric}"] if cfg.best_metric != "val_loss" else row["val_loss"]
    higher_better = cfg.best_metric != "val_loss"
    improved = state.best_value is None or (value > state.best_value if higher_better
                                            else value < state.best_value)
    if improved:
        state.best_value, state.best_epoch, state.bad_epochs = value, epoch, 0
    else:
        state.bad_epochs += 1
    return improved


def _validated_weights(model: nn.Module, state: TrainState):
    """The weights that are validated and saved as best: the EMA's when there is one."""
    return state.ema.applied(model) if state.ema is not None else nullcontext()


def _last_payload(model: nn.Module, state: TrainState, epoch: int, world: int) -> dict:
    """last.pt: everything a resume needs to continue exactly."""
    return {"format": FORMAT_VERSION, "epoch": epoch, "model": model.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
            "scaler": state.scaler.state_dict() if state.scaler is not None else None,
            "ema": state.ema.state_dict() if state.ema is not None else None,
            "warmup": state.warmup.state_dict() if state.warmup is not None else None,
            "world_size": world, "rng": rng_state(), "best_value": state.best_value,
            "best_epoch": state.best_epoch, "bad_epochs": state.bad_epochs}


def best_checkpoint_of(cfg: TrainConfig, model: nn.Module, data: RunData, epoch: int,
                       val: dict) -> BestCheckpoint:
    """best.pt of an epoch: thresholds of 0.5 until `finalize` chooses them."""
    return BestCheckpoint(config=cfg.to_dict(), labels=data.label_map.to_dict(),
                          caption=data.caption_enc.to_dict(),
                          thresholds=[0.5] * data.label_map.num_classes,
                          at_least_one=cfg.at_least_one, finished=False,
                          model=inference_state_dict(model, cfg.model.fp16_storage),
                          epoch=epoch, val_metrics=val)


