"""The training program: setup -> fit (train_one_epoch / evaluate per epoch) -> thresholds.

A run folder holds:
    config.yaml     the resolved config
    labels.json     the label map            vocab.json   the caption encoder (vocabulary)
    split.json      train / validation ids   metrics.csv  one row per epoch
    best.pt         everything predict needs (weights, config, labels, vocab, thresholds)
    last.pt         model + optimizer + scheduler + epoch + RNG states, for --resume
    summary.json    final validation metrics with the chosen thresholds; curves.png
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmtag.allocator import keep_freed_memory
from mmtag.atomic import atomic_write, is_temp_file, read_json
from mmtag.config import TrainConfig
from mmtag.data.csv_io import Record, read_csv
from mmtag.data.dataset import Split, TaggingDataset, make_loader
from mmtag.data.images import ImageTransformSpec, build_transform
from mmtag.data.labels import LabelMap
from mmtag.models.build import build_tagger, caption_encoder_to_dict, fit_caption_encoder
from mmtag.training.cached import cached_dataset, cached_datasets, plan_cache
from mmtag.training.checkpoint import (
    FORMAT_VERSION,
    atomic_save,
    check_model_size,
    inference_state_dict,
    load_checkpoint,
    state_dict_megabytes,
)
from mmtag.training.ema import EMA
from mmtag.training.losses import build_loss, pos_weight_from_targets
from mmtag.training.metrics import multilabel_metrics
from mmtag.training.runtime import (
    amp_dtype,
    autocast,
    cpu_has_fast_bf16,
    machine_info,
    resolve_device,
    rng_state,
    seed_everything,
    set_deterministic,
    set_rng_state,
)
from mmtag.training.thresholds import apply_thresholds, choose_thresholds, decide

log = logging.getLogger("mmtag.train")

METRIC_COLUMNS = ["loss", "precision", "recall", "micro_f1", "macro_f1", "samples_f1"]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


def image_spec(cfg: TrainConfig, normalisation: str, size: int | None = None) -> ImageTransformSpec:
    """The image pipeline's parameters; 'auto' normalisation is what the encoder expects.
    `size` replaces data.image_size (the other sizes of multi-scale TTA)."""
    d = cfg.data
    norm = normalisation if d.normalisation == "auto" else d.normalisation
    return ImageTransformSpec(size=size or d.image_size, normalisation=norm, hflip=d.hflip,
                              jitter=d.jitter, hue=d.hue, degrees=d.degrees,
                              translate=d.translate, scale=(d.scale_min, d.scale_max))


def encoder_normalisation(model: nn.Module) -> str:
    enc = getattr(model, "image_encoder", None)
    return getattr(enc, "normalisation", "imagenet") if enc is not None else "imagenet"


def _batch_to(batch, device: torch.device, channels_last: bool):
    images, ids, lengths, targets = batch
    images = _images_to(images, device, channels_last)
    # lengths stay on the CPU: pack_padded_sequence wants them there
    return images, ids.to(device, non_blocking=True), lengths, targets.to(device, non_blocking=True)


def _images_to(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def _progress(iterable, total: int, desc: str, enabled: bool):
    if enabled:
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
    return iterable


def train_one_epoch(model: nn.Module, loader, loss_fn: nn.Module, optimizer, device: torch.device,
                    *, dtype: torch.dtype | None = None, scaler=None, grad_clip: float = 0.0,
                    step_scheduler=None, channels_last: bool = False, progress: bool = False,
                    aux_weight: float = 0.0, ema=None,
                    desc: str = "train") -> tuple[float, np.ndarray, np.ndarray]:
    """One pass over `loader`; returns (mean loss of the final logits against the labels,
    probabilities, targets) of the pass."""
    model.train()
    total, count = 0.0, 0
    probs, targets = [], []
    bar = _progress(loader, len(loader), desc, progress)
    last_log = time.time()
    for step, batch in enumerate(bar):
        images, ids, lengths, target = _batch_to(batch, device, channels_last)
        with autocast(device, dtype):
            out = model.forward_all(images, ids, lengths)
        logits = out["logits"]
        loss = loss_fn(out["fused"].float(), target)
        if aux_weight > 0 and "image" in out:
            loss = loss + aux_weight * sum(loss_fn(out[k].float(), target) for k in ("image", "text"))
        if not torch.isfinite(loss):
            raise TrainingDivergedError(f"the loss became {loss.item()} at {desc} step {step}")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if ema is not None:
            ema.update(model)
        if step_scheduler is not None:
            step_scheduler.step()
        n = target.shape[0]
        # reported: the final prediction's loss against the labels, what `evaluate` reports for
        # the validation rows (the objective adds the per-modality heads' terms and soft targets)
        with torch.no_grad():
            total += loss_fn(logits.detach().float(), target).item() * n
        count += n
        probs.append(torch.sigmoid(logits.detach().float()).cpu())
        targets.append(target.cpu())
        if progress:
            bar.set_postfix(loss=f"{total / count:.4f}")
        elif time.time() - last_log > 30:
            log.info("%s step %d/%d loss %.4f", desc, step + 1, len(loader), total / count)
            last_log = time.time()
    return total / max(count, 1), torch.cat(probs).numpy(), torch.cat(targets).numpy()


def _logits(model: nn.Module, images, ids, lengths, tta: bool) -> torch.Tensor:
    """Model logits; with `tta`, the mean over the image and its mirror image (raw images are
    flipped here; cached features arrive as (B, V, ...) views)."""
    if not tta or getattr(model, "image_encoder", None) is None:
        return model(images, ids, lengths).float()
    if model.image_input_stage > 0:
        views = [images[:, v] for v in range(images.shape[1])]
    else:
        views = [images, images.flip(-1)]
    return torch.stack([model(v, ids, lengths).float() for v in views]).mean(0)


@torch.inference_mode()
def evaluate(model: nn.Module, loader, loss_fn: nn.Module | None, device: torch.device, *,
             dtype: torch.dtype | None = None, channels_last: bool = False, tta: bool = False,
             progress: bool = False, desc: str = "eval") -> tuple[float, np.ndarray, np.ndarray]:
    """(mean loss or nan, probabilities (N, C), targets (N, C)) over `loader`, in order.

    The image encoder runs as its `for_inference` copy (BatchNorm folded into the convs: the same
    outputs up to rounding, a quarter faster on CPU); `model` itself is left as it was."""
    model.eval()
    total, count = 0.0, 0
    probs, targets = [], []
    encoder = getattr(model, "image_encoder", None)
    if encoder is not None:
        model.image_encoder = encoder.for_inference(channels_last=channels_last)
    try:
        for batch in _progress(loader, len(loader), desc, progress):
            images, ids, lengths, target = _batch_to(batch, device, channels_last)
            with autocast(device, dtype):
                logits = _logits(model, images, ids, lengths, tta)
            if loss_fn is not None:
                total += loss_fn(logits, target).item() * target.shape[0]
            count += target.shape[0]
            probs.append(torch.sigmoid(logits).cpu())
            targets.append(target.cpu())
    finally:
        if encoder is not None:
            model.image_encoder = encoder
    loss = total / max(count, 1) if loss_fn is not None else float("nan")
    return loss, torch.cat(probs).numpy(), torch.cat(targets).numpy()


def _scores(prefix: str, loss: float, probs: np.ndarray, targets: np.ndarray,
            thresholds=0.5) -> dict:
    m = multilabel_metrics(targets.astype(int), apply_thresholds(probs, np.broadcast_to(
        np.asarray(thresholds, dtype=float), (probs.shape[1],))))
    return {f"{prefix}_loss": loss, **{f"{prefix}_{k}": m[k] for k in METRIC_COLUMNS[1:]}}


@dataclass
class RunData:
    """What setup() prepares: rows, label map, caption encoder, split."""

    train_rows: list[Record]
    val_rows: list[Record]
    label_map: LabelMap
    caption_enc: object
    split: Split
    image_dir: Path


def prepare_data(cfg: TrainConfig, data_dir: Path, run_dir: Path, resume: bool,
                 rows: list[Record]) -> RunData:
    """Split train.csv's `rows` (or reload the saved split), fit labels and vocabulary on the
    training rows only, and save them in the run folder."""
    from mmtag.models.build import caption_encoder_from_dict

    csv_path = data_dir / "train.csv"  # `rows` came from it (fit reads it first)
    unlabelled = [r for r in rows if not r.labels]
    if unlabelled:
        where = ", ".join(f"line {r.line} ({r.image_id})" for r in unlabelled[:5])
        more = f" and {len(unlabelled) - 5} more" if len(unlabelled) > 5 else ""
        # a sample may truly carry none of the labels, so this is allowed, but never silently
        log.warning("%s: %d row(s) without labels (%s%s) are used as images that carry none of "
                    "the labels; if their labels are missing, fix the CSV (mmtag check-data "
                    "lists them)", csv_path, len(unlabelled), where, more)
    if resume:
        split = Split.load(run_dir / "split.json")
        label_map = LabelMap.from_dict(read_json(run_dir / "labels.json"))
        caption_enc = caption_encoder_from_dict(read_json(run_dir / "vocab.json"))
    else:
        split = Split.make([r.image_id for r in rows], cfg.data.train_prop, cfg.data.split_seed,
                           cfg.data.val_block)
        split.save(run_dir / "split.json")
    train_rows, val_rows = split.apply(rows)
    if cfg.data.limit_train:
        train_rows = train_rows[: cfg.data.limit_train]
    if cfg.data.limit_val:
        val_rows = val_rows[: cfg.data.limit_val]
    if not resume:
        label_map = LabelMap.from_records(train_rows)
        caption_enc = fit_caption_encoder(cfg.model, cfg.data, [r.caption for r in train_rows])
        atomic_write(run_dir / "labels.json", json.dumps(label_map.to_dict()))
        atomic_write(run_dir / "vocab.json", json.dumps(caption_encoder_to_dict(caption_enc)))
    return RunData(train_rows, val_rows, label_map, caption_enc, split, data_dir / "data")


def _make_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    o = cfg.optim
    if o.scheduler == "plateau":
        mode = "min" if o.plateau_on == "val_loss" else "max"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=o.plateau_factor, patience=o.plateau_patience)
    if o.scheduler == "cosine":
        total = max(1, o.epochs * steps_per_epoch)
        warm = int(o.warmup_epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return None


def _make_optimizer(cfg: TrainConfig, model: nn.Module):
    """Adam/AdamW; pretrained encoders get `lr * encoder_lr_mult` (fine-tuning pretrained
    weights wants smaller steps than the freshly initialised head)."""
    encoders = [m for m in (model.image_encoder, model.text_encoder) if m is not None]
    enc_ids = {id(p) for m in encoders for p in m.parameters()}
    enc_params = [p for m in encoders for p in m.parameters() if p.requires_grad]
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in enc_ids]
    if not enc_params and not rest:
        raise ValueError("every parameter is frozen: nothing to train")
    o = cfg.optim
    groups = [{"params": rest, "lr": o.lr}]
    if enc_params:
        groups.append({"params": enc_params, "lr": o.lr * o.encoder_lr_mult})
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    groups = [g for g in groups if g["params"]]
    try:
        # one fused kernel per step instead of a handful of ops per parameter tensor: the same
        # update (tests/test_optim.py); it pays with many small tensors and on GPUs, while a cpu
        # recipe step here is dominated by convolutions (no measurable change, docs/quality.md
        # session 8); PyTorch < 2.4 fuses on CUDA only
        return cls(groups, lr=o.lr, weight_decay=o.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return cls(groups, lr=o.lr, weight_decay=o.weight_decay)


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _write_metrics(path: Path, rows: list[dict]) -> None:
    """metrics.csv rewritten whole, atomically: a crash never leaves half a row in it."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write(path, buf.getvalue())


def _append_metrics(path: Path, row: dict) -> None:
    _write_metrics(path, [*_read_metrics(path), row])


def _metrics_upto(path: Path, epoch: int) -> None:
    """Drop rows after `epoch` (written by an interrupted run after its last checkpoint)."""
    rows = _read_metrics(path)
    keep = [r for r in rows if int(r["epoch"]) <= epoch]
    if keep and len(keep) != len(rows):
        _write_metrics(path, keep)
    elif not keep and path.exists():
        path.unlink()


def best_payload(cfg: TrainConfig, model: nn.Module, data: RunData, epoch: int, val: dict,
                 thresholds: list[float] | None = None) -> dict:
    """Everything predict needs, as plain data."""
    return {
        "format": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "labels": data.label_map.to_dict(),
        "caption": caption_encoder_to_dict(data.caption_enc),
        "model": inference_state_dict(model, cfg.model.fp16_storage),
        "epoch": epoch,
        "val_metrics": val,
        "thresholds": thresholds if thresholds is not None else [0.5] * data.label_map.num_classes,
        "at_least_one": cfg.at_least_one,
    }


def _train_csv(data_dir: Path) -> Path:
    """data_dir/train.csv, or an error saying what --data must be."""
    csv_path = data_dir / "train.csv"
    if not csv_path.exists():
        raise FileNotFoundError(f"{csv_path} not found: --data must be a Kaggle-layout folder "
                                f"(train.csv, data/*.jpg)")
    return csv_path


# What a run writes before its first checkpoint (last.pt) is complete; a folder holding only
# these is a run that stopped early, which `fit(..., restart=True)` (or a resume) starts over.
# (best.pt of epoch 1 is written just before last.pt.)
_PRE_CHECKPOINT_FILES = {"config.yaml", "split.json", "labels.json", "vocab.json",
                         "metrics.csv", "best.pt"}
LOCK_FILE = ".lock"  # held by the process training in the folder (see run_lock)
# Every file a run writes: what `mmtag demo` may delete of an earlier demo's run
RUN_FILES = _PRE_CHECKPOINT_FILES | {LOCK_FILE, "last.pt", "summary.json", "val_probs.csv",
                                     "curves.png"}


def is_run_file(p: Path) -> bool:
    return p.is_file() and (p.name in RUN_FILES or is_temp_file(p))


class RunInUseError(RuntimeError):
    """Another process is training in the run folder."""


def _never_checkpointed(run_dir: Path) -> bool:
    return run_dir.is_dir() and all(
        p.name in _PRE_CHECKPOINT_FILES | {LOCK_FILE} or is_temp_file(p)
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


def fit(cfg: TrainConfig, data_dir: Path | str, run_dir: Path | str, *, resume: bool = False,
        restart: bool = False, progress: bool | None = None) -> dict:
    """Train, keep the best and last checkpoints, choose thresholds; returns the summary.

    `resume` continues from `last.pt` (a run that stopped before its first checkpoint starts
    over with the same config). `restart`: `run_dir` may hold the files of a run that stopped
    before its first checkpoint; they are deleted and the run starts over."""
    started = time.time()
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    progress = sys.stderr.isatty() if progress is None else progress
    rows = read_csv(_train_csv(data_dir))  # a bad file is reported before anything is written
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"run folder {run_dir} is a file; choose another --out")
    if resume and not run_dir.is_dir():
        raise FileNotFoundError(f"cannot resume: run folder {run_dir} does not exist")
    made = [p for p in (run_dir, run_dir / LOCK_FILE) if not p.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir):
        try:
            resume = _claim_run_folder(cfg, data_dir, run_dir, resume, restart)
        except (FileExistsError, FileNotFoundError):
            for p in reversed(made):  # a refused folder is left as it was found
                p.rmdir() if p.is_dir() else p.unlink()
            raise
        return _fit(cfg, data_dir, run_dir, rows, resume, progress, started)


def _claim_run_folder(cfg: TrainConfig, data_dir: Path, run_dir: Path, resume: bool,
                      restart: bool) -> bool:
    """Check what `run_dir` holds against the request, clear the files of a run that never
    reached a checkpoint when asked to, save the config; returns whether to resume."""
    if resume and (run_dir / "last.pt").exists():
        return True
    early = _never_checkpointed(run_dir)
    if resume and not (early and (run_dir / "config.yaml").exists()):
        raise FileNotFoundError(f"cannot resume: {run_dir / 'last.pt'} does not exist and "
                                f"{run_dir} holds no run that stopped before it")
    if resume:
        log.warning("%s stopped before its first checkpoint: starting it over with its saved "
                    "config", run_dir)
    elif any(p.name != LOCK_FILE for p in run_dir.iterdir()) and not (restart and early):
        raise FileExistsError(_not_empty_message(run_dir, data_dir, early))
    leftovers = sorted(p for p in run_dir.iterdir() if p.name != LOCK_FILE)
    if leftovers:
        log.warning("%s: deleting the files of a run that stopped before its first checkpoint "
                    "(%s) and starting over", run_dir, ", ".join(p.name for p in leftovers))
    for p in leftovers:
        p.unlink()
    cfg.save(run_dir / "config.yaml")
    return False


def _not_empty_message(run_dir: Path, data_dir: Path, early: bool) -> str:
    msg = f"run folder {run_dir} is not empty; choose another --out"
    if (run_dir / "last.pt").exists():
        return f"{msg}, or continue it with --resume {run_dir}"
    if early:
        return (f"{msg}. It holds no checkpoint (a run that stopped before its first one): "
                f"start it over with its own settings: mmtag train --resume {run_dir} --data "
                f"{data_dir}")
    return msg


def _fit(cfg: TrainConfig, data_dir: Path, run_dir: Path, rows: list[Record], resume: bool,
         progress: bool, started: float) -> dict:
    keep_freed_memory()  # a no-op when the CLI already did it
    seed_everything(cfg.seed)
    set_deterministic(cfg.deterministic)
    device = resolve_device(cfg.device)
    machine = machine_info(device)
    log.info("machine: %s, %d logical CPUs, %d torch threads%s; torch %s", machine["cpu"],
             machine["logical_cpus"], machine["torch_threads"],
             f"; GPU {machine['gpu']}" if machine["gpu"] else "", machine["torch"])
    dtype = amp_dtype(cfg.amp, device)
    channels_last = cfg.channels_last
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_fast_bf16():
        log.warning("amp=bf16 on a CPU without native bf16 (AVX512-BF16 or AMX): it will run "
                    "slower than fp32 here; use --set amp=none")

    for warning in cfg.warnings():
        log.warning(warning)

    data = prepare_data(cfg, data_dir, run_dir, resume, rows)
    model = build_tagger(cfg.model, data.label_map.num_classes, data.caption_enc,
                         load_pretrained=not resume)
    last = load_checkpoint(run_dir / "last.pt", "resume checkpoint", required=(
        "model", "optimizer", "rng", "epoch", "best_value", "best_epoch", "bad_epochs")
    ) if resume else None
    if last is not None:
        # before anything runs the model: the frozen stages compute the feature cache, and on
        # a resume they hold random weights until the checkpoint's are in
        model.load_state_dict(last["model"])
    size_mb = check_model_size(model, cfg.model.max_size_mb, cfg.model.fp16_storage)
    log.info("model: %.1f MB saved (%s), limit %g MB; %d train / %d validation rows; device %s",
             size_mb, "fp16" if cfg.model.fp16_storage else "fp32", cfg.model.max_size_mb,
             len(data.train_rows), len(data.val_rows), device)
    model.to(device)
    if channels_last and model.image_encoder is not None:
        model.image_encoder.to(memory_format=torch.channels_last)

    norm = encoder_normalisation(model)
    has_image = model.image_encoder is not None
    train_ds = TaggingDataset(data.train_rows, data.image_dir, data.caption_enc, data.label_map,
                              build_transform(image_spec(cfg, norm), train=True),
                              source="train.csv", load_images=has_image)
    val_ds = TaggingDataset(data.val_rows, data.image_dir, data.caption_enc, data.label_map,
                            build_transform(image_spec(cfg, norm), train=False),
                            source="train.csv", load_images=has_image)
    o = cfg.optim
    pin = device.type == "cuda"
    workers = cfg.data.num_workers
    stage, text_stage = plan_cache(cfg, model)
    if stage > 0 or (text_stage and model.image_encoder is None):
        log.info("cached-feature path: %s%s; only the rest trains. Cached images get flip "
                 "augmentation only (colour jitter and affine need the raw pixels).",
                 f"image stages [0, {min(stage, model.image_encoder.num_stages)}) cached"
                 if stage else "no image", f", caption encoder layers [0, {text_stage}) cached"
                 if text_stage else "")
    # the validation rows at the other sizes of multi-scale TTA (final evaluation only): copies
    # of val_ds with another size's preprocessing (the captions stay encoded once)
    tta_sizes = cfg.tta_sizes if has_image else []
    extra_val = []
    for size in tta_sizes:
        extra_val.append(copy.copy(val_ds))
        extra_val[-1].transform = build_transform(image_spec(cfg, norm, size), train=False)
    if stage > 0 or (text_stage and model.image_encoder is None):
        train_ds, val_ds = cached_datasets(cfg, model, train_ds, val_ds,
                                           image_spec(cfg, norm), stage=stage,
                                           text_stage=text_stage, progress=progress, dtype=dtype)
        extra_val = [cached_dataset(cfg, model, ds, image_spec(cfg, norm, size), train=False,
                                    stage=stage, text_stage=text_stage, progress=progress,
                                    dtype=dtype) for ds, size in zip(extra_val, tta_sizes, strict=True)]
        model.image_input_stage, model.text_input_stage = stage, text_stage
        workers = 0  # features are in memory
    val_loader = make_loader(val_ds, o.batch_size * 2, shuffle=False, num_workers=workers,
                             pin_memory=pin)
    steps = math.ceil(len(train_ds) / o.batch_size)
    pos_weight = None
    if cfg.loss.pos_weight:
        pos_weight = pos_weight_from_targets(train_ds.targets).to(device)
    loss_fn = build_loss(cfg.loss.name, pos_weight=pos_weight, alpha=cfg.loss.alpha,
                         gamma=cfg.loss.gamma, gamma_neg=cfg.loss.gamma_neg,
                         gamma_pos=cfg.loss.gamma_pos, clip=cfg.loss.clip)
    optimizer = _make_optimizer(cfg, model)
    scheduler = _make_scheduler(cfg, optimizer, steps)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    start_epoch, best_value, best_epoch, bad_epochs = 1, None, 0, 0
    if last is not None:
        optimizer.load_state_dict(last["optimizer"])
        if scheduler is not None and last.get("scheduler") is not None:
            scheduler.load_state_dict(last["scheduler"])
        if scaler is not None and last.get("scaler") is not None:
            scaler.load_state_dict(last["scaler"])
        set_rng_state(last["rng"])
        start_epoch = last["epoch"] + 1
        best_value, best_epoch, bad_epochs = last["best_value"], last["best_epoch"], last["bad_epochs"]
        _metrics_upto(run_dir / "metrics.csv", last["epoch"])
        log.info("resuming %s at epoch %d (best %s = %s at epoch %d)", run_dir, start_epoch,
                 cfg.best_metric, best_value, best_epoch)

    ema = EMA(model, o.ema) if o.ema > 0 else None  # from the (resumed) weights
    if ema is not None and last is not None and last.get("ema") is not None:
        ema.load_state_dict(last["ema"])
    higher_better = cfg.best_metric != "val_loss"
    # Flip TTA (from raw images, or from cached flipped features when they exist) is for the
    # final evaluation, thresholds and predictions; per-epoch validation scores the plain view,
    # which halves its cost and ranks epochs the same way.
    final_tta = cfg.tta_flip and (stage == 0 or cfg.cache.flip)
    for epoch in range(start_epoch, o.epochs + 1):
        if cfg.optim.early_stopping and bad_epochs >= cfg.optim.early_stopping:
            log.info("early stopping: no better %s for %d epochs", cfg.best_metric, bad_epochs)
            break
        # Re-seed per epoch so a resumed run draws the same shuffles and augmentations as an
        # uninterrupted one, whatever happened before the interruption.
        seed_everything(cfg.seed * 1000 + epoch)
        train_loader = make_loader(train_ds, o.batch_size, shuffle=True, drop_last=len(train_ds) > o.batch_size,
                                   seed=cfg.seed * 1000 + epoch, num_workers=workers,
                                   pin_memory=pin)
        t0 = time.time()
        lr = optimizer.param_groups[0]["lr"]
        try:
            tr_loss, tr_probs, tr_targets = train_one_epoch(
                model, train_loader, loss_fn, optimizer, device, dtype=dtype, scaler=scaler,
                grad_clip=o.grad_clip, step_scheduler=scheduler if o.scheduler == "cosine" else None,
                channels_last=channels_last, progress=progress, desc=f"epoch {epoch}/{o.epochs}",
                aux_weight=cfg.model.aux_weight if cfg.model.aux_heads != "none" else 0.0,
                ema=ema)
        except TrainingDivergedError as e:
            kept = "last.pt" if (run_dir / "last.pt").exists() else "no checkpoint yet"
            raise TrainingDivergedError(
                f"{e}; training stopped, the last good checkpoint is kept ({kept}). Try a lower "
                f"optim.lr, optim.grad_clip=1.0, or amp=none.") from None
        with ema.applied(model) if ema is not None else nullcontext():
            va_loss, va_probs, va_targets = evaluate(model, val_loader, loss_fn, device, dtype=dtype,
                                                     channels_last=channels_last, tta=False,
                                                     progress=progress, desc="validate")
        row = {"epoch": epoch, "lr": lr, **_scores("train", tr_loss, tr_probs, tr_targets),
               **_scores("val", va_loss, va_probs, va_targets), "seconds": round(time.time() - t0, 2)}
        if scheduler is not None and o.scheduler == "plateau":
            scheduler.step(va_loss if o.plateau_on == "val_loss" else row["val_micro_f1"])
        value = row["val_loss"] if cfg.best_metric == "val_loss" else row[f"val_{cfg.best_metric}"]
        improved = best_value is None or (value > best_value if higher_better else value < best_value)
        if improved:
            best_value, best_epoch, bad_epochs = value, epoch, 0
            with ema.applied(model) if ema is not None else nullcontext():  # the validated weights
                atomic_save(best_payload(cfg, model, data, epoch, row), run_dir / "best.pt")
        else:
            bad_epochs += 1
        _append_metrics(run_dir / "metrics.csv", {k: _round(v) for k, v in row.items()})
        atomic_save({"format": FORMAT_VERSION, "epoch": epoch, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict() if scheduler is not None else None,
                     "scaler": scaler.state_dict() if scaler is not None else None,
                     "ema": ema.state_dict() if ema is not None else None,
                     "rng": rng_state(), "best_value": best_value, "best_epoch": best_epoch,
                     "bad_epochs": bad_epochs}, run_dir / "last.pt")
        log.info("epoch %d/%d  train loss %.4f micro-F1 %.4f | val loss %.4f micro-F1 %.4f "
                 "samples-F1 %.4f (F1 at 0.5, no TTA) | lr %.2g | %.0fs%s", epoch, o.epochs, tr_loss,
                 row["train_micro_f1"], va_loss, row["val_micro_f1"], row["val_samples_f1"], lr,
                 row["seconds"], "  *best*" if improved else "")

    val_loaders = [val_loader]
    for ds in extra_val:
        val_loaders.append(make_loader(ds, o.batch_size * 2, shuffle=False, num_workers=workers,
                                       pin_memory=pin))
    if final_tta and stage > 0:
        for ds in (val_ds, *extra_val):
            ds.both_views = True  # the loader reads the dataset afresh
    summary = finalize(cfg, run_dir, data, model, val_loaders, device, dtype, channels_last,
                       final_tta)
    summary["model_mb"] = size_mb
    # what this process took (a resumed run: since --resume), and on what
    summary["wall_seconds"] = round(time.time() - started, 1)
    summary["machine"] = machine
    atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2))
    try:
        from mmtag.reporting.plots import plot_curves

        plot_curves(run_dir / "metrics.csv", run_dir / "curves.png")
    except Exception as e:  # plotting must never cost a finished run
        log.warning("could not draw curves: %s", e)
    return summary


def finalize(cfg: TrainConfig, run_dir: Path, data: RunData, model: nn.Module, val_loaders,
             device: torch.device, dtype, channels_last: bool, tta: bool) -> dict:
    """Reload the best weights, choose decision thresholds on the validation split, and store
    them in best.pt. `val_loaders`: the validation rows at each size of cfg.image_sizes (their
    probabilities are averaged, as predict does)."""
    best = load_checkpoint(run_dir / "best.pt")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in best["model"].items()})
    probs = 0.0
    for loader in val_loaders:
        _, p, targets = evaluate(model, loader, None, device, dtype=dtype,
                                 channels_last=channels_last, tta=tta)
        probs = probs + p / len(val_loaders)
    y = targets.astype(int)
    figures = decision_figures(cfg, y, probs, [str(lab) for lab in data.label_map.labels])
    best["thresholds"] = figures["thresholds"]
    atomic_save(best, run_dir / "best.pt")
    _write_probs(run_dir / "val_probs.csv", data, probs)
    mb = state_dict_megabytes(model, cfg.model.fp16_storage)
    rule = ("expected-F1 label sets" if cfg.decision == "expected_f1"
            else f"thresholds ({cfg.threshold_mode}, {cfg.threshold_metric})")
    sizes = cfg.image_sizes[:len(val_loaders)]
    tuned, at05 = figures["val"], figures["val_at_0.5"]
    log.info("best epoch %d; %s%s: val micro-F1 %.4f samples-F1 %.4f "
             "(at 0.5: %.4f / %.4f); saved model %.1f MB", best["epoch"], rule,
             f", images at {'+'.join(map(str, sizes))} px" if len(sizes) > 1 else "",
             tuned["micro_f1"], tuned["samples_f1"], at05["micro_f1"], at05["samples_f1"], mb)
    return {"best_epoch": best["epoch"], **figures, "tta": {"flip": bool(tta), "sizes": sizes},
            "saved_model_mb": round(mb, 2),
            "val_rows": len(data.val_rows), "train_rows": len(data.train_rows)}


def decision_figures(cfg: TrainConfig, y: np.ndarray, probs: np.ndarray,
                     label_names: list[str]) -> dict:
    """Thresholds chosen on validation targets `y` and probabilities `probs` by the config's
    rule, and the figures summary.json reports: at 0.5, tuned on these rows, and the cross-fit
    estimate for the rule chosen and for the other one (a run's, or an ensemble's averaged)."""
    thr = choose_thresholds(y, probs, mode=cfg.threshold_mode, metric=cfg.threshold_metric,
                            at_least_one=cfg.at_least_one, min_support=cfg.min_support)
    at05 = multilabel_metrics(y, apply_thresholds(probs, np.full(probs.shape[1], 0.5)))
    tuned = multilabel_metrics(y, decide(probs, thr, at_least_one=cfg.at_least_one,
                                         rule=cfg.decision), label_names=label_names)
    other = "threshold" if cfg.decision == "expected_f1" else "expected_f1"
    return {"decision": cfg.decision, "thresholds": [float(t) for t in thr],
            "val_at_0.5": {k: at05[k] for k in METRIC_COLUMNS[1:]},
            "val": {k: tuned[k] for k in METRIC_COLUMNS[1:]},
            "val_crossfit": _crossfit(cfg, y, probs, cfg.decision),
            # the same estimate for the rule not chosen, so the choice can be made with numbers
            "val_crossfit_other_rule": {"decision": other, **_crossfit(cfg, y, probs, other)},
            "per_class": tuned["per_class"]}


def _write_probs(path: Path, data: RunData, probs: np.ndarray) -> None:
    """Validation probabilities of the best model, for threshold and error analysis."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["ImageID", "Labels", *[str(lab) for lab in data.label_map.labels]])
    for r, p in zip(data.val_rows, probs, strict=True):
        w.writerow([r.image_id, " ".join(map(str, r.labels)), *[f"{x:.5f}" for x in p]])
    atomic_write(path, buf.getvalue())


def _crossfit(cfg: TrainConfig, y: np.ndarray, probs: np.ndarray, rule: str,
              seed: int = 0) -> dict:
    """Validation figures with thresholds chosen on the *other* half of the validation rows
    (both ways, averaged): tuning thresholds and scoring on the same rows flatters a model.
    (The expected-F1 rule tunes nothing; its halves are scored the same way.)"""
    n = len(y)
    if n < 4:
        return {}
    perm = np.random.default_rng(seed).permutation(n)
    halves = (perm[: n // 2], perm[n // 2:])
    scores = []
    for fit_idx, test_idx in (halves, halves[::-1]):
        thr = choose_thresholds(y[fit_idx], probs[fit_idx], mode=cfg.threshold_mode,
                                metric=cfg.threshold_metric, at_least_one=cfg.at_least_one,
                                min_support=max(1, cfg.min_support // 2))
        scores.append(multilabel_metrics(y[test_idx], decide(
            probs[test_idx], thr, at_least_one=cfg.at_least_one, rule=rule)))
    return {k: float(np.mean([m[k] for m in scores])) for k in METRIC_COLUMNS[1:]}


def _round(v):
    return round(v, 6) if isinstance(v, float) else v
