"""The training program: `fit` = claim the run folder -> prepare data -> build the model ->
train epoch by epoch (checkpoints, metrics.csv) -> choose the decision rule's thresholds.

The pieces live beside it: the loop body in `engine`, the optimizer and schedule in `optim`,
cached-feature datasets in `cached`, the run folder's files and lock in `run_folder`, the
figures in `mmtag.evaluation`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmtag.atomic import atomic_write, read_json
from mmtag.config import TrainConfig
from mmtag.data.csv_io import Record, read_csv, train_csv_path
from mmtag.data.dataset import Split, TaggingDataset, make_loader
from mmtag.data.device_batches import DeviceBatches, PixelDataset, as_tensor, pass_order
from mmtag.data.images import build_transform, transform_spec
from mmtag.data.labels import LabelMap
from mmtag.data.pixel_cache import cache_bytes, default_pixel_dir, pixel_cache
from mmtag.data.tokenizers import CaptionTokenizer, fit_tokenizer, tokenizer_from_dict
from mmtag.distributed import (
    SINGLE,
    Dist,
    barrier,
    from_env,
    from_rank_zero,
    local_first,
    on_main,
    start,
    stop,
)
from mmtag.evaluation.estimate import decision_figures, epoch_scores
from mmtag.evaluation.probs_csv import average_probs, write_val_probs
from mmtag.models.build import build_tagger, encoder_normalisation
from mmtag.prediction.checkpoint import (
    FORMAT_VERSION,
    BestCheckpoint,
    atomic_save,
    check_model_size,
    inference_state_dict,
    load_checkpoint,
    state_dict_megabytes,
)
from mmtag.prediction.passes import evaluate
from mmtag.run_files import (
    BEST_FILE,
    CURVES_FILE,
    LABELS_FILE,
    LAST_FILE,
    LOCK_FILE,
    METRICS_FILE,
    SPLIT_FILE,
    SUMMARY_FILE,
    VOCAB_FILE,
    append_metrics_row,
    truncate_metrics,
)
from mmtag.runtime import (
    Precision,
    choose_precision,
    machine_info,
    resolve_device,
    rng_state,
    seconds_since_start,
    seed_everything,
    set_cudnn_autotuning,
    set_deterministic,
    set_rng_state,
    slow_precision_warning,
)
from mmtag.training.cached import cached_dataset, plan_cache
from mmtag.training.distill import (
    in_label_order,
    load_teacher,
    soft_targets,
    teacher_probabilities,
    teacher_split,
    unlabeled_rows,
)
from mmtag.training.ema import EMA
from mmtag.training.engine import StepOptions, TrainingDivergedError, train_one_epoch
from mmtag.training.feature_cache import resolve_engine
from mmtag.training.losses import build_loss, pos_weight_from_targets
from mmtag.training.optim import lr_factor, make_optimizer, make_scheduler, make_warmup
from mmtag.training.run_folder import claim_run_folder, run_lock

log = logging.getLogger("mmtag.train")

__all__ = ["fit", "prepare_data", "RunData", "TrainingDivergedError", "best_checkpoint_of"]


def fit(cfg: TrainConfig, data_dir: Path | str, run_dir: Path | str, *, resume: bool = False,
        restart: bool = False, progress: bool | None = None) -> dict:
    """Train, keep the best and last checkpoints, choose thresholds; returns the summary.

    `resume` continues from `last.pt` (a run that stopped before its first checkpoint starts
    over with the same config). `restart`: `run_dir` may hold the files of a run that stopped
    before its first checkpoint; they are deleted and the run starts over.

    Under torchrun every process calls it: rank 0 claims the folder and writes every file and
    returns the summary, the other ranks return None."""
    started = time.time()
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    progress = sys.stderr.isatty() if progress is None else progress
    rows = read_csv(train_csv_path(data_dir))  # a bad file is reported before anything is written
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"run folder {run_dir} is a file; choose another --out")
    if resume and not run_dir.is_dir():
        raise FileNotFoundError(f"cannot resume: run folder {run_dir} does not exist")
    dist = from_env()
    device = start(dist, resolve_device(cfg.device))
    try:
        with ExitStack() as held:  # rank 0 holds the run folder's lock until training ends
            resume = on_main(dist, lambda: _claim(cfg, data_dir, run_dir, resume, restart, held))
            summary = _train(cfg, data_dir, run_dir, rows, resume, progress and dist.main,
                             started, runtime(cfg, device, dist))
        barrier(dist)  # nobody leaves the process group while another still talks in it
        return summary
    finally:
        stop(dist)


def _claim(cfg: TrainConfig, data_dir: Path, run_dir: Path, resume: bool, restart: bool,
           held: ExitStack) -> bool:
    """Lock `run_dir` (in `held`) and claim it (whether the run resumes); a refused folder is
    left as it was found."""
    made = [p for p in (run_dir, run_dir / LOCK_FILE) if not p.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    held.enter_context(run_lock(run_dir))
    try:
        return claim_run_folder(cfg, data_dir, run_dir, resume, restart)
    except (FileExistsError, FileNotFoundError):
        for p in reversed(made):
            p.rmdir() if p.is_dir() else p.unlink()
        raise


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
    val_other_sizes: list       # the validation rows at the other sizes of multi-scale TTA
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


def _train(cfg: TrainConfig, data_dir: Path, run_dir: Path, rows: list[Record], resume: bool,
           progress: bool, started: float, rt: Runtime) -> dict | None:
    seed_everything(cfg.seed)
    if cfg.deterministic:
        set_deterministic()
    for warning in cfg.warnings():
        log.warning(warning)
    s = setup(cfg, data_dir, run_dir, rows, resume, progress, rt)
    _epochs(cfg, run_dir, s.model, s.train_model, s.data, s.sets, s.state, rt, progress)
    summary = on_main(rt.dist, lambda: _summary(cfg, data_dir, run_dir, s.model, s.data, s.sets,
                                                rt, s.size_mb, started,
                                                s.state.first_step_seconds))
    return summary if rt.dist.main else None


@dataclass
class Setup:
    """Everything the epochs need, as `setup` makes it."""

    data: RunData
    model: nn.Module
    train_model: nn.Module      # what runs the training forward pass (DDP / compiled)
    sets: Datasets
    state: TrainState
    size_mb: float              # the saved model's size


def setup(cfg: TrainConfig, data_dir: Path, run_dir: Path, rows: list[Record], resume: bool,
          progress: bool, rt: Runtime) -> Setup:
    """Split and vocabulary, model, datasets (and their caches), optimizer: what happens
    between the command and the first step (`mmtag bench train` times it too)."""
    t0 = time.time()
    data = _shared_data(cfg, data_dir, run_dir, resume, rows, rt.dist)
    t1 = time.time()
    model, last, size_mb = _model(cfg, data, run_dir, resume, rt)
    t2 = time.time()
    with local_first(rt.dist):  # one process per machine fills its caches, the others read them
        sets = _datasets(cfg, model, data, rt, progress)
        if cfg.distill.teacher:
            sets.train.targets = _distilled_targets(cfg, data, sets.train.targets, rt, progress)
    t3 = time.time()
    state = _training_state(cfg, model, sets, last, rt, run_dir)
    train_model = _train_model(cfg, model, rt)
    log.info("set-up: split and vocabulary %.1f s, model %.1f s, datasets %.1f s, optimizer "
             "%.1f s; %.1f s since the command started", t1 - t0, t2 - t1, t3 - t2,
             time.time() - t3, seconds_since_start())
    return Setup(data, model, train_model, sets, state, size_mb)


def _summary(cfg: TrainConfig, data_dir: Path, run_dir: Path, model: nn.Module, data: RunData,
             sets: Datasets, rt: Runtime, size_mb: float, started: float,
             first_step_seconds: float | None) -> dict:
    """Thresholds on the validation rows, summary.json and the curves (rank 0)."""
    summary = _finish(cfg, run_dir, model, data, sets, rt)
    summary["model_mb"] = size_mb
    # what this process took (a resumed run: since --resume), and on what
    summary["wall_seconds"] = round(time.time() - started, 1)
    summary["first_step_seconds"] = first_step_seconds  # from the process's start
    summary["machine"] = rt.machine
    summary["precision"] = rt.precision.to_dict()
    # what ran the frozen image stages into the cache (a distillation reads this teacher's)
    summary["cache_engine"] = resolve_engine(cfg.cache.engine) if sets.image_stage else None
    summary["processes"] = rt.dist.world
    summary["data_dir"] = str(data_dir.resolve())  # where the report finds the images
    atomic_write(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    _draw_curves(run_dir)
    return summary


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


def prepare_data(cfg: TrainConfig, data_dir: Path, run_dir: Path, resume: bool,
                 rows: list[Record], saved: dict | None = None) -> RunData:
    """Split train.csv's `rows` (or reload the saved split), fit labels and vocabulary on the
    training rows only, and save them in the run folder. `saved`: the split, labels and
    vocabulary as `saved_data` gives them, used instead of the run folder's files (the other
    ranks of a torchrun get them from rank 0)."""
    csv_path = data_dir / "train.csv"  # `rows` came from it (fit reads it first)
    unlabelled = [r for r in rows if not r.labels]
    if unlabelled:
        where = ", ".join(f"line {r.line} ({r.image_id})" for r in unlabelled[:5])
        more = f" and {len(unlabelled) - 5} more" if len(unlabelled) > 5 else ""
        # a sample may truly carry none of the labels, so this is allowed, but never silently
        log.warning("%s: %d row(s) without labels (%s%s) are used as images that carry none of "
                    "the labels; if their labels are missing, fix the CSV (mmtag check-data "
                    "lists them)", csv_path, len(unlabelled), where, more)
    if resume and saved is None:
        saved = {"split": read_json(run_dir / SPLIT_FILE),
                 "labels": read_json(run_dir / LABELS_FILE),
                 "caption": read_json(run_dir / VOCAB_FILE)}
    if saved is not None:
        split = Split.from_dict(saved["split"], run_dir / SPLIT_FILE)
        label_map = LabelMap.from_dict(saved["labels"])
        caption_enc = tokenizer_from_dict(saved["caption"])
    else:
        split = Split.make([r.image_id for r in rows], cfg.data.train_prop, cfg.data.split_seed,
                           cfg.data.val_block)
        split.save(run_dir / SPLIT_FILE)
    train_rows, val_rows = split.apply(rows)
    if cfg.data.limit_train:
        train_rows = train_rows[: cfg.data.limit_train]
    if cfg.data.limit_val:
        val_rows = val_rows[: cfg.data.limit_val]
    if saved is None:
        label_map = LabelMap.from_records(train_rows)
        caption_enc = fit_tokenizer(cfg.model, cfg.data, [r.caption for r in train_rows])
        atomic_write(run_dir / LABELS_FILE, json.dumps(label_map.to_dict()))
        atomic_write(run_dir / VOCAB_FILE, json.dumps(caption_enc.to_dict()))
    labelled = len(train_rows)
    if cfg.distill.unlabeled:  # after the labels and vocabulary: they come from train.csv
        train_rows = train_rows + unlabeled_rows(cfg.distill.unlabeled, data_dir / "data")
    return RunData(train_rows, val_rows, label_map, caption_enc, split, data_dir / "data",
                   labelled)


def saved_data(data: RunData) -> dict:
    """The split, labels and vocabulary of `data` as plain data (what the run folder holds)."""
    return {"split": data.split.to_dict(), "labels": data.label_map.to_dict(),
            "caption": data.caption_enc.to_dict()}


def _shared_data(cfg: TrainConfig, data_dir: Path, run_dir: Path, resume: bool,
                 rows: list[Record], dist: Dist) -> RunData:
    """prepare_data on rank 0 (which writes the run folder); the other ranks get the split,
    labels and vocabulary from it, not from files another machine may not see."""
    made = {}

    def on_rank_zero() -> dict:
        made["data"] = prepare_data(cfg, data_dir, run_dir, resume, rows)
        return saved_data(made["data"])

    saved = on_main(dist, on_rank_zero)
    return made["data"] if dist.main else prepare_data(cfg, data_dir, run_dir, True, rows, saved)


def _model(cfg: TrainConfig, data: RunData, run_dir: Path, resume: bool,
           rt: Runtime) -> tuple[nn.Module, dict | None, float]:
    """(the tagger on the device with last.pt's weights on a resume, last.pt or None, its saved
    size in MB); a model over model.max_size_mb is refused here, before any training."""
    device = rt.device
    model = build_tagger(cfg.model, data.label_map.num_classes, data.caption_enc,
                         load_pretrained=not resume)
    # rank 0 reads it, and sends it to the other ranks (their machines may not see the folder)
    last = on_main(rt.dist, lambda: load_checkpoint(
        run_dir / LAST_FILE, "resume checkpoint", required=(
            "model", "optimizer", "rng", "epoch", "best_value", "best_epoch", "bad_epochs"))
    ) if resume else None
    if last is not None and last.get("world_size", 1) != rt.dist.world:
        n = last.get("world_size", 1)
        how = f"torchrun --nproc_per_node={n} (or nodes x processes = {n})" if n > 1 else \
            "one process (without torchrun)"
        raise ValueError(f"{run_dir} was trained by {n} process(es) and this resume has "
                         f"{rt.dist.world}: the global batch, the shuffled shards and the "
                         f"learning rate depend on it; resume with {how}")
    if last is not None:
        # before anything runs the model: the frozen stages compute the feature cache, and on
        # a resume they hold random weights until the checkpoint's are in
        model.load_state_dict(last["model"])
    size_mb = check_model_size(model, cfg.model.max_size_mb, cfg.model.fp16_storage)
    log.info("model: %.1f MB saved (%s), limit %g MB; %d train / %d validation rows; device %s",
             size_mb, "fp16" if cfg.model.fp16_storage else "fp32", cfg.model.max_size_mb,
             len(data.train_rows), len(data.val_rows), device)
    model.to(device)
    if cfg.channels_last and model.image_encoder is not None:
        model.image_encoder.to(memory_format=torch.channels_last)
    return model, last, size_mb


def _datasets(cfg: TrainConfig, model: nn.Module, data: RunData, rt: Runtime,
              progress: bool) -> Datasets:
    """Training and validation datasets from raw rows, replaced by cached features of the
    frozen image stages / caption layers when the config allows (model.image_input_stage and
    text_input_stage are set to match)."""
    norm = encoder_normalisation(model)
    has_image = model.image_encoder is not None

    def raw(rows, train: bool, size: int | None = None) -> TaggingDataset:
        return TaggingDataset(rows, data.image_dir, data.caption_enc, data.label_map,
                              build_transform(transform_spec(cfg.data, norm, size), train=train),
                              source="train.csv", load_images=has_image)

    train_ds, val_ds = raw(data.train_rows, True), raw(data.val_rows, False)
    # the validation rows at the other sizes of multi-scale TTA (final evaluation only): copies
    # of val_ds with another size's preprocessing (the captions stay encoded once)
    sizes = cfg.tta_sizes if has_image else []
    others = []
    for size in sizes:
        others.append(copy.copy(val_ds))
        others[-1].transform = build_transform(transform_spec(cfg.data, norm, size), train=False)
    stage, text_stage = plan_cache(cfg, model)
    if not (stage > 0 or (text_stage and not has_image)):
        if has_image and pipeline(cfg, rt.device) == "device":
            return _pixel_datasets(cfg, data, rt, norm, (train_ds, val_ds, others), progress)
        return Datasets(train_ds, val_ds, others, 0, cfg.data.num_workers)
    log.info("cached-feature path: %s%s; only the rest trains. Cached images get flip "
             "augmentation only (colour jitter and affine need the raw pixels).",
             f"image stages [0, {min(stage, model.image_encoder.num_stages)}) cached"
             if stage else "no image", f", caption encoder layers [0, {text_stage}) cached"
             if text_stage else "")

    def cached(ds, train: bool, size: int | None = None):
        return cached_dataset(cfg, model, ds, transform_spec(cfg.data, norm, size), train=train,
                              stage=stage, text_stage=text_stage, progress=progress,
                              dtype=rt.dtype)

    sets = Datasets(cached(train_ds, True), cached(val_ds, False),
                    [cached(ds, False, size) for ds, size in zip(others, sizes, strict=True)],
                    stage, workers=0)  # features are in memory
    model.image_input_stage, model.text_input_stage = stage, text_stage
    return sets


def _distilled_targets(cfg: TrainConfig, data: RunData, hard: torch.Tensor, rt: Runtime,
                       progress: bool) -> torch.Tensor:
    """The training rows' targets mixed with the teacher's probabilities (cfg.distill); a
    teacher that trained on one of this run's validation rows is refused, as its knowledge of
    their labels would flow into the student's validation figures."""
    teacher = load_teacher(cfg.distill.teacher)
    split = teacher_split(teacher)
    seen = set(split["train"]) & set(data.split.val) if split else set()
    if seen:
        raise ValueError(f"teacher {cfg.distill.teacher} trained on {len(seen)} of this run's "
                         f"validation rows: distil with the teacher's split (--set "
                         f"data.train_prop={split['train_prop']} data.split_seed="
                         f"{split['seed']}), as mmtag distill does")
    probs = teacher_probabilities(teacher, data.train_rows, data.image_dir, source="train.csv",
                                  device=rt.device, cache_root=cfg.cache.dir and Path(cfg.cache.dir),
                                  progress=progress)
    probs = in_label_order(probs, teacher.label_map.labels, data.label_map.labels,
                           teacher.path)
    n = data.labelled if data.labelled >= 0 else len(data.train_rows)
    log.info("distillation from %s: %d labelled rows learn %.2f x its probabilities + %.2f x "
             "their labels, %d unlabelled rows its probabilities", teacher.path, n,
             cfg.distill.alpha, 1 - cfg.distill.alpha, len(data.train_rows) - n)
    return soft_targets(hard, probs, n, cfg.distill.alpha).to(hard.device)


def pipeline(cfg: TrainConfig, device: torch.device) -> str:
    """data.pipeline resolved: 'auto' is 'device' on CUDA, where decoding JPEGs every epoch
    cannot keep up with the model, and 'loader' elsewhere."""
    if cfg.data.pipeline != "auto":
        return cfg.data.pipeline
    return "device" if device.type == "cuda" else "loader"


def _pixel_datasets(cfg: TrainConfig, data: RunData, rt: Runtime, norm: str, raw: tuple,
                    progress: bool) -> Datasets:
    """The device pipeline: every image decoded once into a uint8 cache at each size, moved to
    the device with the captions and targets when it fits (else read from the memory map)."""
    folder = Path(cfg.cache.dir) / "pixels" if cfg.cache.dir else default_pixel_dir()
    train_ds, val_ds, others = raw
    # an LSTM packs its sequences by lengths held on the CPU; MiniLM masks on the device
    lengths_on_device = cfg.model.text_encoder != "glove_lstm"

    def pixels(ds: TaggingDataset, train: bool, size: int | None = None) -> PixelDataset:
        spec = transform_spec(cfg.data, norm, size)
        paths = [data.image_dir / r.image_id for r in ds.records]
        where = [ds.where(r) for r in ds.records]
        cache = as_tensor(pixel_cache(paths, where, spec.size, folder,
                                      workers=cfg.data.num_workers, progress=progress))
        fits = _fits_on_device(cache_bytes(len(paths), spec.size), rt.device)
        return PixelDataset(cache, ds.tokens, ds.lengths, ds.targets, spec, train).to(
            rt.device, pixels=fits, lengths=lengths_on_device)

    sizes = cfg.tta_sizes
    log.info("device pipeline: images decoded once into uint8 caches in %s, augmented in "
             "batches on %s", folder, rt.device)
    return Datasets(pixels(train_ds, True), pixels(val_ds, False),
                    [pixels(ds, False, size) for ds, size in zip(others, sizes, strict=True)],
                    0, workers=0)


def _fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Whether a pixel cache goes to the device: on CUDA when it takes under 40 % of the free
    memory (the model's activations need the rest); a CPU reads it from the memory map."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    fits = nbytes < 0.4 * free
    if not fits:
        log.info("pixel cache of %.1f GB stays in host memory (%.1f GB free on %s)",
                 nbytes / 1e9, free / 1e9, device)
    return fits


def _training_state(cfg: TrainConfig, model: nn.Module, sets: Datasets, last: dict | None,
                    rt: Runtime, run_dir: Path) -> TrainState:
    """Loss, optimizer, schedule, gradient scaler and EMA: fresh, or as last.pt left them."""
    pos_weight = None
    if cfg.loss.pos_weight:
        pos_weight = pos_weight_from_targets(sets.train.targets).to(rt.device)
    lc = cfg.loss
    loss_fn = build_loss(lc.name, pos_weight=pos_weight, alpha=lc.alpha, gamma=lc.gamma,
                         gamma_neg=lc.gamma_neg, gamma_pos=lc.gamma_pos, clip=lc.clip)
    factor = lr_factor(cfg.optim, rt.dist.world)
    if factor != 1.0:
        log.info("learning rates x%.3g (optim.lr_scale=%s: global batch %d against lr_batch %d)",
                 factor, cfg.optim.lr_scale, cfg.optim.batch_size * rt.dist.world,
                 cfg.optim.lr_batch)
    optimizer = make_optimizer(cfg.optim, model, factor)
    steps = math.ceil(len(sets.train) // rt.dist.world / cfg.optim.batch_size)
    scheduler = make_scheduler(cfg.optim, optimizer, steps)
    scaler = torch.amp.GradScaler(rt.device.type) if rt.dtype == torch.float16 else None
    state = TrainState(loss_fn, optimizer, scheduler, scaler, ema=None,
                       warmup=make_warmup(cfg.optim, optimizer, steps))
    if last is not None:
        _restore(state, last, cfg, run_dir, rt.dist.main)
    state.ema = EMA(model, cfg.optim.ema) if cfg.optim.ema > 0 else None  # from the (resumed) weights
    if state.ema is not None and last is not None and last.get("ema") is not None:
        state.ema.load_state_dict(last["ema"])
    return state


def _restore(state: TrainState, last: dict, cfg: TrainConfig, run_dir: Path,
             rt_main: bool) -> None:
    state.optimizer.load_state_dict(last["optimizer"])
    if state.scheduler is not None and last.get("scheduler") is not None:
        state.scheduler.load_state_dict(last["scheduler"])
    if state.scaler is not None and last.get("scaler") is not None:
        state.scaler.load_state_dict(last["scaler"])
    if state.warmup is not None and last.get("warmup") is not None:
        state.warmup.load_state_dict(last["warmup"])
    set_rng_state(last["rng"])
    state.start_epoch = last["epoch"] + 1
    state.best_value, state.best_epoch = last["best_value"], last["best_epoch"]
    state.bad_epochs = last["bad_epochs"]
    if rt_main:
        truncate_metrics(run_dir / METRICS_FILE, last["epoch"])
    log.info("resuming %s at epoch %d (best %s = %s at epoch %d)", run_dir, state.start_epoch,
             cfg.best_metric, state.best_value, state.best_epoch)


def _train_model(cfg: TrainConfig, model: nn.Module, rt: Runtime) -> nn.Module:
    """What runs the training forward pass: the model, wrapped in DistributedDataParallel
    under torchrun (gradients averaged over the ranks) and compiled with `compile: true`."""
    wrapped = model
    if rt.dist.active:
        from torch.nn.parallel import DistributedDataParallel

        # static_graph: every step uses the same parameters, and a recipe may leave some
        # trainable ones out of the loss (e.g. a conv head whose map the queries skip)
        wrapped = DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
            static_graph=True)
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    return wrapped


def _loader(ds, batch_size: int, workers: int, rt: Runtime, channels_last: bool, *,
            shuffle: bool, seed: int = 0, drop_last: bool = False, dist: Dist = SINGLE):
    """One pass's batches over `ds`: made on the device for a PixelDataset, else by a
    DataLoader; under torchrun (`dist`) this rank's shard of the seeded order."""
    if isinstance(ds, PixelDataset):
        return DeviceBatches(ds, batch_size, rt.device, shuffle=shuffle, seed=seed,
                             drop_last=drop_last, rank=dist.rank, world=dist.world,
                             channels_last=channels_last)
    if dist.active:
        rows = pass_order(len(ds), shuffle=shuffle, seed=seed, rank=dist.rank, world=dist.world,
                          equal="drop" if shuffle else "pad")
        ds, shuffle = torch.utils.data.Subset(ds, rows.tolist()), False
        seed += 7919 * dist.rank  # each rank's workers draw their own augmentations
    return make_loader(ds, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                       num_workers=workers, pin_memory=rt.device.type == "cuda")


def _epochs(cfg: TrainConfig, run_dir: Path, model: nn.Module, train_model: nn.Module,
            data: RunData, sets: Datasets, state: TrainState, rt: Runtime,
            progress: bool) -> None:
    """Train from state.start_epoch to optim.epochs (or early stopping): after each epoch,
    validate, save best.pt when the best metric improved, append to metrics.csv, save last.pt
    (rank 0 writes; every rank has the same metrics row)."""
    o = cfg.optim
    val_loader = _loader(sets.val, o.batch_size * 2, sets.workers, rt, cfg.channels_last,
                         shuffle=False, dist=rt.dist)
    for epoch in range(state.start_epoch, o.epochs + 1):
        if o.early_stopping and state.bad_epochs >= o.early_stopping:
            log.info("early stopping: no better %s for %d epochs", cfg.best_metric,
                     state.bad_epochs)
            break
        row = _epoch(cfg, run_dir, model, train_model, sets, val_loader, state, rt, epoch,
                     progress, first=epoch == state.start_epoch)
        improved = _track_best(cfg, state, row, epoch)
        if rt.dist.main:
            _save_epoch(cfg, run_dir, model, data, state, rt, epoch, row, improved)
        log.info("epoch %d/%d  train loss %.4f micro-F1 %.4f | val loss %.4f micro-F1 %.4f "
                 "samples-F1 %.4f (F1 at 0.5, no TTA) | lr %.2g | %.0fs%s", epoch, o.epochs,
                 row["train_loss"], row["train_micro_f1"], row["val_loss"], row["val_micro_f1"],
                 row["val_samples_f1"], row["lr"], row["seconds"], "  *best*" if improved else "")


def _save_epoch(cfg: TrainConfig, run_dir: Path, model: nn.Module, data: RunData,
                state: TrainState, rt: Runtime, epoch: int, row: dict, improved: bool) -> None:
    """best.pt when the epoch improved, the metrics.csv row, last.pt."""
    if improved:
        with _validated_weights(model, state):
            best_checkpoint_of(cfg, model, data, epoch, row).save(run_dir / BEST_FILE)
    append_metrics_row(run_dir / METRICS_FILE, row)
    atomic_save(_last_payload(model, state, epoch, rt.dist.world), run_dir / LAST_FILE)


def _epoch(cfg: TrainConfig, run_dir: Path, model: nn.Module, train_model: nn.Module,
           sets: Datasets, val_loader, state: TrainState, rt: Runtime, epoch: int,
           progress: bool, first: bool) -> dict:
    """Train one epoch and validate (plain view: per-epoch validation ranks epochs, flip TTA is
    for the final figures); returns metrics.csv's row. `first`: this process's first epoch
    (the time to its first step is logged and kept)."""
    o = cfg.optim
    loader = train_batches(cfg, sets, rt, epoch)
    t0 = time.time()
    lr = state.optimizer.param_groups[0]["lr"]
    opts = step_options(cfg, train_model, state, rt, epoch, progress, first)
    try:
        tr_loss, tr_probs, tr_targets = train_one_epoch(model, loader, state.loss_fn,
                                                        state.optimizer, opts)
    except TrainingDivergedError as e:
        kept = LAST_FILE if (run_dir / LAST_FILE).exists() else "no checkpoint yet"
        raise TrainingDivergedError(
            f"{e}; training stopped, the last good checkpoint is kept ({kept}). Try a lower "
            f"optim.lr, optim.grad_clip=1.0, or amp=none.") from None
    # each rank updated its BatchNorm statistics (and their average) from its own batches
    from_rank_zero([*model.buffers(), *(state.ema.shadow.values() if state.ema else [])],
                   rt.dist)
    with _validated_weights(model, state):
        va_loss, va_probs, va_targets = evaluate(model, val_loader, state.loss_fn, rt.device,
                                                 dtype=rt.dtype, channels_last=cfg.channels_last,
                                                 tta=False, progress=progress, desc="validate",
                                                 dist=rt.dist, rows=len(sets.val))
    row = {"epoch": epoch, "lr": lr, **epoch_scores("train", tr_loss, tr_probs, tr_targets),
           **epoch_scores("val", va_loss, va_probs, va_targets),
           "seconds": round(time.time() - t0, 2)}
    warming = state.warmup is not None and not state.warmup.finished
    if state.scheduler is not None and o.scheduler == "plateau" and not warming:
        state.scheduler.step(va_loss if o.plateau_on == "val_loss" else row["val_micro_f1"])
    return row


def train_batches(cfg: TrainConfig, sets: Datasets, rt: Runtime, epoch: int):
    """Epoch `epoch`'s training batches (this rank's shard)."""
    # Re-seeded per epoch so a resumed run draws the same shuffles and augmentations as an
    # uninterrupted one, whatever happened before the interruption; each rank its own draws
    # (dropout), all of them the same shuffle (the loader's seed)
    seed_everything(cfg.seed * 1000 + epoch + 1_000_003 * rt.dist.rank)
    rows = len(sets.train) // rt.dist.world
    b = cfg.optim.batch_size
    return _loader(sets.train, b, sets.workers, rt, cfg.channels_last, shuffle=True,
                   seed=cfg.seed * 1000 + epoch, drop_last=rows > b, dist=rt.dist)


def step_options(cfg: TrainConfig, train_model: nn.Module, state: TrainState, rt: Runtime,
                 epoch: int, progress: bool, first: bool) -> StepOptions:
    """How epoch `epoch` steps; `first`: the time to the first step is logged and kept."""
    o = cfg.optim
    return StepOptions(
        rt.device, dtype=rt.dtype, scaler=state.scaler, grad_clip=o.grad_clip,
        step_scheduler=state.scheduler if o.scheduler == "cosine" else state.warmup,
        channels_last=cfg.channels_last, progress=progress, desc=f"epoch {epoch}/{o.epochs}",
        aux_weight=cfg.model.aux_weight if cfg.model.aux_heads != "none" else 0.0, ema=state.ema,
        train_model=train_model, dist=rt.dist,
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
            "world_size": world, "rng": rng_state(), "best_value": state.best_value, "best_epoch": state.best_epoch,
            "bad_epochs": state.bad_epochs}


def best_checkpoint_of(cfg: TrainConfig, model: nn.Module, data: RunData, epoch: int,
                       val: dict) -> BestCheckpoint:
    """best.pt of an epoch: thresholds of 0.5 until `finalize` chooses them."""
    return BestCheckpoint(config=cfg.to_dict(), labels=data.label_map.to_dict(),
                          caption=data.caption_enc.to_dict(),
                          thresholds=[0.5] * data.label_map.num_classes,
                          at_least_one=cfg.at_least_one, finished=False,
                          model=inference_state_dict(model, cfg.model.fp16_storage),
                          epoch=epoch, val_metrics=val)


def _finish(cfg: TrainConfig, run_dir: Path, model: nn.Module, data: RunData, sets: Datasets,
            rt: Runtime) -> dict:
    """Reload the best weights and choose the decision thresholds on the validation rows (flip
    TTA from raw images, or from cached flipped features when they exist; every size of
    multi-scale TTA)."""
    tta = cfg.tta_flip and (sets.image_stage == 0 or cfg.cache.flip)
    loaders = []
    for ds in (sets.val, *sets.val_other_sizes):
        if tta and sets.image_stage > 0:
            ds.both_views = True  # the loader reads the dataset afresh
        # rank 0 alone: the other ranks wait for the summary
        loaders.append(_loader(ds, cfg.optim.batch_size * 2, sets.workers, rt, cfg.channels_last,
                               shuffle=False))
    return finalize(cfg, run_dir, data, model, loaders, rt.device, rt.dtype, cfg.channels_last,
                    tta)


def finalize(cfg: TrainConfig, run_dir: Path, data: RunData, model: nn.Module, val_loaders,
             device: torch.device, dtype, channels_last: bool, tta: bool) -> dict:
    """Reload the best weights, choose decision thresholds on the validation split, and store
    them in best.pt. `val_loaders`: the validation rows at each size of cfg.image_sizes (their
    probabilities are averaged, as predict does)."""
    best = BestCheckpoint.load(run_dir / BEST_FILE)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in best.model.items()})
    parts = []
    for loader in val_loaders:
        _, p, targets = evaluate(model, loader, None, device, dtype=dtype,
                                 channels_last=channels_last, tta=tta)
        parts.append(p)
    probs = average_probs(parts)
    y = targets.astype(int)
    label_names = [str(lab) for lab in data.label_map.labels]
    figures = decision_figures(cfg, y, probs, label_names)
    best.thresholds, best.finished = figures["thresholds"], True
    best.save(run_dir / BEST_FILE)
    write_val_probs(run_dir, [r.image_id for r in data.val_rows],
                    [" ".join(map(str, r.labels)) for r in data.val_rows], label_names, probs)
    mb = state_dict_megabytes(model, cfg.model.fp16_storage)
    rule = ("expected-F1 label sets" if cfg.decision == "expected_f1"
            else f"thresholds ({cfg.threshold_mode}, {cfg.threshold_metric})")
    sizes = cfg.image_sizes[:len(val_loaders)]
    tuned, at05 = figures["val"], figures["val_at_0.5"]
    log.info("best epoch %d; %s%s: val micro-F1 %.4f samples-F1 %.4f "
             "(at 0.5: %.4f / %.4f); saved model %.1f MB", best.epoch, rule,
             f", images at {'+'.join(map(str, sizes))} px" if len(sizes) > 1 else "",
             tuned["micro_f1"], tuned["samples_f1"], at05["micro_f1"], at05["samples_f1"], mb)
    return {"best_epoch": best.epoch, **figures, "tta": {"flip": bool(tta), "sizes": sizes},
            "saved_model_mb": round(mb, 2),
            "val_rows": len(data.val_rows), "train_rows": len(data.train_rows)}


def _draw_curves(run_dir: Path) -> None:
    try:
        from mmtag.training.curves import plot_curves

        plot_curves(run_dir / METRICS_FILE, run_dir / CURVES_FILE)
    except Exception as e:  # plotting must never cost a finished run
        log.warning("could not draw curves: %s", e)
