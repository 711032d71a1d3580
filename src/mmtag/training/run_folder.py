"""The run folder: what a run writes, who may write it (the run lock), and metrics.csv.

A run folder holds:
    config.yaml     the resolved config
    labels.json     the label map            vocab.json   the caption tokenizer (vocabulary)
    split.json      train / validation ids   metrics.csv  one row per epoch
    best.pt         everything predict needs (weights, config, labels, vocab, thresholds)
    last.pt         model + optimizer + scheduler + epoch + RNG states, for --resume
    summary.json    final validation metrics with the chosen thresholds
    val_probs.csv   the best model's validation probabilities (mmtag.evaluation.probs_csv)
    curves.png      the learning curves drawn from metrics.csv
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

from mmtag.atomic import is_temp_file
from mmtag.config import TrainConfig
from mmtag.data.sources import Source
from mmtag.run_files import (
    CONFIG_FILE,
    LAST_FILE,
    LOCK_FILE,
    PRE_CHECKPOINT_FILES,
    RunError,
    RunFolderTakenError,
    RunNotFoundError,
)

log = logging.getLogger("mmtag.train")


class RunInUseError(RunError, RuntimeError):
    """Another process is training in the run folder."""


def never_checkpointed(run_dir: Path) -> bool:
    return run_dir.is_dir() and all(
        p.name in PRE_CHECKPOINT_FILES | {LOCK_FILE} or is_temp_file(p)
        for p in run_dir.iterdir())


@contextmanager
def run_lock(run_dir: Path):
    """Hold an exclusive lock on `run_dir` while training in it: a second process (a resume
    started while the run is still going) is refused instead of writing over the same files.
    A POSIX record lock: the operating system drops it when the process ends, even by SIGKILL,
    and forked DataLoader workers do not inherit it (they may outlive a killed run briefly)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        yield
        return
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RunInUseError(f"run folder {run_dir} is in use by another mmtag process; wait "
                                f"for it to end (or stop it), then continue it with --resume "
                                f"{run_dir}") from None
        yield
    finally:
        os.close(fd)


def claim_run_folder(cfg: TrainConfig, source: Source, run_dir: Path, resume: bool,
                     restart: bool) -> bool:
    """Check what `run_dir` holds against the request, clear the files of a run that never
    reached a checkpoint when asked to, save the config; returns whether to resume."""
    if resume and (run_dir / LAST_FILE).exists():
        return True
    early = never_checkpointed(run_dir)
    if resume and not (early and (run_dir / CONFIG_FILE).exists()):
        raise RunNotFoundError(f"cannot resume: {run_dir / LAST_FILE} does not exist and "
                                f"{run_dir} holds no run that stopped before it")
    if resume:
        log.warning("%s stopped before its first checkpoint: starting it over with its saved "
                    "config", run_dir)
    elif any(p.name != LOCK_FILE for p in run_dir.iterdir()) and not (restart and early):
        raise RunFolderTakenError(not_empty_message(run_dir, source, early))
    leftovers = sorted(p for p in run_dir.iterdir() if p.name != LOCK_FILE)
    if leftovers:
        log.warning("%s: deleting the files of a run that stopped before its first checkpoint "
                    "(%s) and starting over", run_dir, ", ".join(p.name for p in leftovers))
    for p in leftovers:
        p.unlink()
    cfg.save(run_dir / CONFIG_FILE)
    return False


def not_empty_message(run_dir: Path, source: Source, early: bool) -> str:
    msg = f"run folder {run_dir} is not empty; choose another --out"
    if (run_dir / LAST_FILE).exists():
        return f"{msg}, or continue it with mmtag train --resume {run_dir} {source.flags()}"
    if early:
        return (f"{msg}. It holds no checkpoint (a run that stopped before its first one): "
                f"start it over with new settings: mmtag train --restart --out {run_dir} "
                f"{source.flags()} [--config ...] [--set ...], or with its saved ones: "
                f"mmtag train --resume {run_dir} {source.flags()}")
    return msg


