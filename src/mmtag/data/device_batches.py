"""Batches made on the device: the `device` data pipeline.

Each image is decoded once into a uint8 cache (mmtag.data.pixel_cache); the rows' pixels,
token ids and targets then sit on the training device (GPU memory when they fit), and every
batch is gathered by index and augmented there (mmtag.data.batch_augment). No worker
processes, no JPEG decoding per epoch, no host-to-device copy per step. The same code runs on
a CPU, where it saves the decoding but not the augmentation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from mmtag.data.batch_augment import augment_batch, normalise_batch
from mmtag.data.batching import Pass, pass_order
from mmtag.data.images import ImageTransformSpec
from mmtag.data.pixel_cache import decode_resized


def as_tensor(pixels: np.ndarray) -> torch.Tensor:
    """A read-only memory-mapped uint8 cache as a tensor without copying (nothing writes it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that the array is read-only
        return torch.from_numpy(pixels)


@dataclass
class PixelDataset:
    """The rows of a split as tensors: uint8 pixels (N, 3, S, S) (on the device, or on the CPU
    as a memory map when they do not fit), token ids (N, T), lengths (N,), targets (N, C)."""

    pixels: torch.Tensor
    tokens: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor
    spec: ImageTransformSpec
    train: bool                     # augment (else resize + normalise only)

    def __len__(self) -> int:
        return len(self.targets)

    def to(self, device: torch.device, *, pixels: bool, lengths: bool) -> PixelDataset:
        """A copy with the tensors on `device`; the pixels only when `pixels` (they fit), the
        lengths only when `lengths` (an LSTM packs sequences by lengths on the CPU)."""
        return PixelDataset(self.pixels.to(device) if pixels else self.pixels,
                            self.tokens.to(device), self.lengths.to(device) if lengths
                            else self.lengths, self.targets.to(device), self.spec, self.train)


class DeviceBatches:
    """The batches of one pass over a PixelDataset, like a DataLoader's: shuffled by the
    pass's seed (the same order on every rank), this rank's shard of it, in batch_size
    pieces."""

    def __init__(self, ds: PixelDataset, device: torch.device, how: Pass,
                 channels_last: bool = False):
        self.ds, self.device, self.seed, self.rank = ds, device, how.seed, how.rank
        self.channels_last = channels_last
        self.order = pass_order(len(ds), how, equal="drop" if ds.train else "pad")
        b = how.batch_size
        cuts = list(range(0, len(self.order), b))
        if how.drop_last and len(self.order) % b and len(cuts) > 1:
            cuts = cuts[:-1]
        self.cuts = [(c, min(c + b, len(self.order))) for c in cuts]

    def __len__(self) -> int:
        return len(self.cuts)

    def _pixels(self, idx_host: torch.Tensor, idx_dev: torch.Tensor) -> torch.Tensor:
        px = self.ds.pixels
        if px.device.type == self.device.type:  # on the training device (cuda == cuda:0 here)
            return px.index_select(0, idx_dev)
        batch = px[idx_host]  # from the memory map: pages in from disk or the page cache
        if self.device.type == "cuda":
            batch = batch.pin_memory()  # so the copy below does not wait for the GPU
        return batch.to(self.device, non_blocking=True)

    def __iter__(self):
        ds = self.ds
        order_dev = self.order.to(self.device)  # one copy per pass, sliced per batch
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed * 1009 + self.rank)
        for start, end in self.cuts:
            idx_host, idx_dev = self.order[start:end], order_dev[start:end]
            pixels = self._pixels(idx_host, idx_dev)
            if self.channels_last:
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            images = (augment_batch(pixels, ds.spec, gen) if ds.train
                      else normalise_batch(pixels, ds.spec.normalisation))
            idx_len = idx_dev if ds.lengths.device.type == self.device.type else idx_host
            yield (images, ds.tokens.index_select(0, idx_dev), ds.lengths[idx_len],
                   ds.targets.index_select(0, idx_dev))


class DecodedBatches:
    """A TaggingDataset's rows in order, `batch_size` at a time, decoded and resized on
    `device` (nvJPEG on a GPU: mmtag.data.pixel_cache.decode_resized) and normalised there:
    prediction's batches without DataLoader workers. Every image must be readable (the
    caller checks them first)."""

    def __init__(self, ds, spec: ImageTransformSpec, batch_size: int, device: torch.device):
        self.ds, self.spec, self.batch_size, self.device = ds, spec, batch_size, device

    def __len__(self) -> int:
        return -(-len(self.ds) // self.batch_size)

    def __iter__(self):
        ds = self.ds
        for s in range(0, len(ds), self.batch_size):
            rows = ds.records[s:s + self.batch_size]
            pixels = decode_resized([ds.image_dir / r.image_id for r in rows],
                                    [ds.where(r) for r in rows], self.spec.size, self.device)
            e = s + len(rows)
            yield (normalise_batch(pixels, self.spec.normalisation), ds.tokens[s:e],
                   ds.lengths[s:e], ds.targets[s:e])
