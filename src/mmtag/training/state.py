"""What a training run carries from set-up to finish: where it computes (`Runtime`), its rows
(`RunData`), their model inputs (`Datasets`), what the epochs change (`TrainState`), and the run
itself (`Job`, what the command asked for; `Run`, what set-up built for it)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmtag.config import TrainConfig
from mmtag.data.csv_io import Record
from mmtag.data.dataset import Split
from mmtag.data.labels import LabelMap
from mmtag.data.sources import Source
from mmtag.data.tokenizers import CaptionTokenizer
from mmtag.distributed import (
    SINGLE,
    Dist,
)
from mmtag.runtime import (
    Precision,
    choose_precision,
    machine_info,
    set_cudnn_autotuning,
    slow_precision_warning,
)
from mmtag.training.ema import EMA

log = logging.getLogger("mmtag.train")


@dataclass
class Runtime:
    """Where and how the run computes."""

    device: torch.device
    precision: Precision        # the autocast dtype and why (summary.json's "precision")
    machine: dict               # runtime.machine_info, saved in summary.json
    dist: Dist = SINGLE         # the training processes (torchrun), this one among them

    @property
    def dtype(self) -> torch.dtype | None:  # autocast dtype (None: fp32)
        return self.precision.dtype


@dataclass
class Datasets:
    """The run's rows as model inputs: raw images, or cached features of the frozen part."""

    train: Any
    val: Any
    image_stage: int            # cached image stages (0: raw images)
    workers: int                # DataLoader processes (0 for in-memory features)


@dataclass
class TrainState:
    """What one epoch changes, and what last.pt saves to resume it."""

    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    ema: EMA | None
    warmup: Any = None          # optim.LinearWarmup of the plateau / constant schedules
    first_step_seconds: float | None = None  # from the process's start to its first step's end
    start_epoch: int = 1
    best_value: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0


def runtime(cfg: TrainConfig, device: torch.device, dist: Dist = SINGLE) -> Runtime:
    machine = machine_info(device)
    log.info("machine: %s, %d logical CPUs, %d torch threads%s; torch %s", machine["cpu"],
             machine["logical_cpus"], machine["torch_threads"],
             f"; GPU {machine['gpu']}" if machine["gpu"] else "", machine["torch"])
    if device.type == "cuda" and not cfg.deterministic:
        set_cudnn_autotuning(cfg.cudnn_benchmark)
    precision = choose_precision(cfg.amp, device)
    warning = slow_precision_warning(precision, device)
    if warning:
        log.warning("%s", warning)
    log.info("precision: %s (%s)", precision.name, precision.reason)
    return Runtime(device, precision, machine, dist)


@dataclass
class RunData:
    """What prepare_data returns: rows, label map, caption tokenizer, split."""

    train_rows: list[Record]
    val_rows: list[Record]
    label_map: LabelMap
    caption_enc: CaptionTokenizer
    split: Split
    image_dir: Path
    labelled: int = -1          # train_rows[:labelled] are train.csv's; the rest unlabelled


@dataclass(frozen=True)
class Job:
    """What the command asked for, and where it runs."""

    cfg: TrainConfig
    source: Source              # the training rows and their photos
    run_dir: Path
    rt: Runtime
    progress: bool              # progress bars (rank 0 of a terminal)
    started: float              # time.time() when the command started


@dataclass
class Run:
    """A run once set up: the job, and what set-up built for it."""

    job: Job
    data: RunData
    model: nn.Module
    train_model: nn.Module      # what runs the training forward pass (DDP / compiled)
    sets: Datasets
    state: TrainState
    size_mb: float              # the saved model's size

    @property
    def cfg(self) -> TrainConfig:
        return self.job.cfg

    @property
    def rt(self) -> Runtime:
        return self.job.rt

    @property
    def run_dir(self) -> Path:
        return self.job.run_dir
