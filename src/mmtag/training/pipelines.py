"""The data pipeline of a run, chosen once: raw images through a DataLoader, cached features of
the frozen layers, or pixels decoded once and augmented on the device; and the batches of each
pass over them."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from mmtag.config import TrainConfig
from mmtag.data.batching import Pass
from mmtag.data.dataset import ImageRows, Reading, TaggingDataset, make_loader
from mmtag.data.device_batches import DeviceBatches, PixelDataset, as_tensor
from mmtag.data.images import build_transform, transform_spec
from mmtag.data.pixel_cache import cache_bytes, default_pixel_dir, pixel_cache
from mmtag.distributed import (
    Dist,
)
from mmtag.models.build import encoder_normalisation
from mmtag.runtime import (
    seed_everything,
)
from mmtag.training.cached import CachePlan, cached_dataset, plan_cache
from mmtag.training.state import Datasets, RunData, Runtime

log = logging.getLogger("mmtag.train")


def datasets(cfg: TrainConfig, model: nn.Module, data: RunData, rt: Runtime,
              progress: bool) -> Datasets:
    """Training and validation datasets from raw rows, replaced by cached features of the
    frozen image stages / caption layers when the config allows (model.image_input_stage and
    text_input_stage are set to match)."""
    norm = encoder_normalisation(model)
    has_image = model.image_encoder is not None

    def raw(rows, train: bool) -> TaggingDataset:
        return TaggingDataset(ImageRows(rows, data.image_dir, "train.csv"), data.caption_enc,
                              data.label_map,
                              build_transform(transform_spec(cfg.data, norm), train=train),
                              Reading(images=has_image))

    train_ds, val_ds = raw(data.train_rows, True), raw(data.val_rows, False)
    stage, text_stage = plan_cache(cfg, model)
    if not (stage > 0 or (text_stage and not has_image)):
        if has_image and pipeline(cfg, rt.device) == "device":
            return _pixel_datasets(cfg, data, rt, norm, (train_ds, val_ds), progress)
        return Datasets(train_ds, val_ds, 0, cfg.data.num_workers)
    log.info("cached-feature path: %s%s; only the rest trains. Cached images get flip "
             "augmentation only (colour jitter and affine need the raw pixels).",
             f"image stages [0, {min(stage, model.image_encoder.num_stages)}) cached"
             if stage else "no image", f", caption encoder layers [0, {text_stage}) cached"
             if text_stage else "")

    def cached(ds, train: bool):
        return cached_dataset(cfg, model, ds, transform_spec(cfg.data, norm),
                              CachePlan(stage, text_stage, rt.dtype, progress), train=train)

    sets = Datasets(cached(train_ds, True), cached(val_ds, False), stage,
                    workers=0)  # features are in memory
    model.image_input_stage, model.text_input_stage = stage, text_stage
    return sets


def pipeline(cfg: TrainConfig, device: torch.device) -> str:
    """data.pipeline resolved: 'auto' is 'device' on CUDA, where decoding JPEGs every epoch
    cannot keep up with the model, and 'loader' elsewhere."""
    if cfg.data.pipeline != "auto":
        return cfg.data.pipeline
    return "device" if device.type == "cuda" else "loader"


def _pixel_datasets(cfg: TrainConfig, data: RunData, rt: Runtime, norm: str, raw: tuple,
                    progress: bool) -> Datasets:
    """The device pipeline: every image decoded once into a uint8 cache, moved to the device
    with the captions and targets when it fits (else read from the memory map)."""
    folder = Path(cfg.cache.dir) / "pixels" if cfg.cache.dir else default_pixel_dir()
    train_ds, val_ds = raw
    # an LSTM packs its sequences by lengths held on the CPU; MiniLM masks on the device
    lengths_on_device = cfg.model.text_encoder != "glove_lstm"

    def pixels(ds: TaggingDataset, train: bool) -> PixelDataset:
        spec = transform_spec(cfg.data, norm)
        paths = [data.image_dir / r.image_id for r in ds.records]
        where = [ds.where(r) for r in ds.records]
        cache = as_tensor(pixel_cache(paths, where, spec.size, folder,
                                      workers=cfg.data.num_workers, progress=progress))
        fits = _fits_on_device(cache_bytes(len(paths), spec.size), rt.device)
        return PixelDataset(cache, ds.tokens, ds.lengths, ds.targets, spec, train).to(
            rt.device, pixels=fits, lengths=lengths_on_device)

    log.info("device pipeline: images decoded once into uint8 caches in %s, augmented in "
             "batches on %s", folder, rt.device)
    return Datasets(pixels(train_ds, True), pixels(val_ds, False), 0, workers=0)


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


def loader(ds, workers: int, rt: Runtime, channels_last: bool, how: Pass):
    """One pass's batches over `ds`: made on the device for a PixelDataset, else by a
    DataLoader with `workers` processes."""
    if isinstance(ds, PixelDataset):
        return DeviceBatches(ds, rt.device, how, channels_last)
    return make_loader(ds, how, num_workers=workers, pin_memory=rt.device.type == "cuda")


def sharded_pass(batch_size: int, dist: Dist, **how) -> Pass:
    """A pass of `batch_size` batches of which this process reads its shard (under torchrun)."""
    return Pass(batch_size, rank=dist.rank, world=dist.world, **how)


def train_batches(cfg: TrainConfig, sets: Datasets, rt: Runtime, epoch: int):
    """Epoch `epoch`'s training batches (this rank's shard)."""
    # Re-seeded per epoch so a resumed run draws the same shuffles and augmentations as an
    # uninterrupted one, whatever happened before the interruption; each rank its own draws
    # (dropout), all of them the same shuffle (the loader's seed)
    seed_everything(cfg.seed * 1000 + epoch + 1_000_003 * rt.dist.rank)
    rows = len(sets.train) // rt.dist.world
    b = cfg.optim.batch_size
    return loader(sets.train, sets.workers, rt, cfg.channels_last,
                  sharded_pass(b, rt.dist, shuffle=True, seed=cfg.seed * 1000 + epoch,
                               drop_last=rows > b))
