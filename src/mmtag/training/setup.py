"""Set-up: everything between the command and the first training step: the split, labels and
vocabulary, the model (last.pt's weights on a resume), the datasets and their caches, the
optimizer and schedule (`mmtag bench train` times it too)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from torch import nn

from mmtag.atomic import atomic_write, read_json
from mmtag.config import TrainConfig
from mmtag.data.csv_io import Record
from mmtag.data.dataset import Split
from mmtag.data.labels import LabelMap
from mmtag.data.sources import Source
from mmtag.data.tokenizers import fit_tokenizer, tokenizer_from_dict
from mmtag.distributed import (
    local_first,
    on_main,
)
from mmtag.models.build import build_tagger
from mmtag.prediction.checkpoint import (
    check_model_size,
    load_checkpoint,
)
from mmtag.run_files import (
    LABELS_FILE,
    LAST_FILE,
    METRICS_FILE,
    SPLIT_FILE,
    VOCAB_FILE,
    truncate_metrics,
)
from mmtag.runtime import (
    seconds_since_start,
    set_rng_state,
)
from mmtag.training.distill import (
    distilled_targets,
    unlabeled_rows,
)
from mmtag.training.ema import EMA
from mmtag.training.losses import build_loss, pos_weight_from_targets
from mmtag.training.optim import lr_factor, make_optimizer, make_scheduler, make_warmup
from mmtag.training.pipelines import datasets
from mmtag.training.state import Datasets, Job, Run, RunData, Runtime, TrainState

log = logging.getLogger("mmtag.train")


def setup(job: Job, rows: list[Record], resume: bool) -> Run:
    """Split and vocabulary, model, datasets (and their caches), optimizer: what happens
    between the command and the first step (`mmtag bench train` times it too). `rows`:
    train.csv's; `resume`: continue from the run folder's last.pt."""
    cfg, rt = job.cfg, job.rt
    t0 = time.time()
    data = _shared_data(job, resume, rows)
    t1 = time.time()
    model, last, size_mb = _model(job, data, resume)
    t2 = time.time()
    with local_first(rt.dist):  # one process per machine fills its caches, the others read them
        sets = datasets(cfg, model, data, rt, job.progress)
        if cfg.distill.teacher:
            sets.train.targets = distilled_targets(cfg, data, sets.train.targets, rt.device,
                                                   job.progress)
    t3 = time.time()
    state = _training_state(job, model, sets, last)
    train_model = _train_model(cfg, model, rt)
    log.info("set-up: split and vocabulary %.1f s, model %.1f s, datasets %.1f s, optimizer "
             "%.1f s; %.1f s since the command started", t1 - t0, t2 - t1, t3 - t2,
             time.time() - t3, seconds_since_start())
    return Run(job, data, model, train_model, sets, state, size_mb)


def prepare_data(cfg: TrainConfig, source: Source, run_dir: Path, resume: bool,
                 rows: list[Record], saved: dict | None = None) -> RunData:
    """Split train.csv's `rows` (or reload the saved split), fit labels and vocabulary on the
    training rows only, and save them in the run folder. `saved`: the split, labels and
    vocabulary as `saved_data` gives them, used instead of the run folder's files (the other
    ranks of a torchrun get them from rank 0)."""
    csv_path = source.shown  # `rows` came from it (fit reads it first)
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
        label_map = _label_map(train_rows, val_rows, source)
        caption_enc = fit_tokenizer(cfg.model, cfg.data, [r.caption for r in train_rows])
        atomic_write(run_dir / LABELS_FILE, json.dumps(label_map.to_dict()))
        atomic_write(run_dir / VOCAB_FILE, json.dumps(caption_enc.to_dict()))
    labelled = len(train_rows)
    if cfg.distill.unlabeled:  # after the labels and vocabulary: they come from train.csv
        train_rows = train_rows + unlabeled_rows(cfg.distill.unlabeled, source.images)
    return RunData(train_rows, val_rows, label_map, caption_enc, split, source.images, labelled)


def _label_map(train_rows: list[Record], val_rows: list[Record], source: Source) -> LabelMap:
    """Every label of the rows the run uses. A label only validation rows carry (a subset
    such as data.limit_train=48 may lack it) stays a unit the model cannot learn, scored as
    missed: said, never an error and never dropped from the figures."""
    label_map = LabelMap.from_records([*train_rows, *val_rows], source.names)
    trained = {str(lab) for r in train_rows for lab in r.labels}
    unseen = [lab for lab in label_map.labels if lab not in trained]
    if unseen:
        log.warning("label(s) %s appear only in validation rows, none of the %d training rows "
                    "carries them: the model cannot learn them and the figures count them as "
                    "missed; train on more rows (data.limit_train) to learn them",
                    ", ".join(unseen), len(train_rows))
    return label_map


def saved_data(data: RunData) -> dict:
    """The split, labels and vocabulary of `data` as plain data (what the run folder holds)."""
    return {"split": data.split.to_dict(), "labels": data.label_map.to_dict(),
            "caption": data.caption_enc.to_dict()}


def _shared_data(job: Job, resume: bool, rows: list[Record]) -> RunData:
    """prepare_data on rank 0 (which writes the run folder); the other ranks get the split,
    labels and vocabulary from it, not from files another machine may not see."""
    cfg, source, run_dir, dist = job.cfg, job.source, job.run_dir, job.rt.dist
    made = {}

    def on_rank_zero() -> dict:
        made["data"] = prepare_data(cfg, source, run_dir, resume, rows)
        return saved_data(made["data"])

    saved = on_main(dist, on_rank_zero)
    return made["data"] if dist.main else prepare_data(cfg, source, run_dir, True, rows, saved)


def _model(job: Job, data: RunData, resume: bool) -> tuple[nn.Module, dict | None, float]:
    """(the tagger on the device with last.pt's weights on a resume, last.pt or None, its saved
    size in MB); a model over model.max_size_mb is refused here, before any training."""
    cfg, run_dir, rt = job.cfg, job.run_dir, job.rt
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


def _training_state(job: Job, model: nn.Module, sets: Datasets,
                    last: dict | None) -> TrainState:
    """Loss, optimizer, schedule, gradient scaler and EMA: fresh, or as last.pt left them."""
    cfg, rt, run_dir = job.cfg, job.rt, job.run_dir
    pos_weight = None
    if cfg.loss.pos_weight:
        pos_weight = pos_weight_from_targets(sets.train.targets).to(rt.device)
    loss_fn = build_loss(cfg.loss, pos_weight)
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
