"""The torch Dataset, the seeded train/validation split, and the DataLoader factory."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from mmtag.atomic import atomic_write, read_json
from mmtag.data.batching import Pass, pass_order
from mmtag.data.csv_io import Record
from mmtag.data.images import ImageReadError, load_image
from mmtag.data.labels import LabelMap
from mmtag.run_files import SPLIT_FILE

CaptionFn = Callable[[str], tuple[np.ndarray, int]]


@dataclass(frozen=True)
class ImageRows:
    """Rows and where their photos are: the folder their files are in, the CSV they came from
    (named in messages)."""

    records: Sequence[Record]
    image_dir: Path
    source: str = ""

    def subset(self, idx: Sequence[int]) -> ImageRows:
        return ImageRows([self.records[i] for i in idx], self.image_dir, self.source)


@dataclass(frozen=True)
class Reading:
    """Which parts of its rows a TaggingDataset reads."""

    images: bool = True    # False for caption-only models: no decoding at all
    targets: bool = True   # False for predict: a labels column there is ignored, not checked
    # a missing or unreadable photo becomes a blank image (asked for: predict from the caption)
    blank_missing_images: bool = False


class TaggingDataset(Dataset):
    """(image, token ids, caption length, multi-hot target) for each CSV row, in file order.

    Captions are encoded once up front: lemmatising in every epoch (and every worker) is waste.
    Rows without labels (test.csv), and every row when not `with_targets`, get an all-zero
    target.
    """

    def __init__(self, rows: ImageRows, encode_caption: CaptionFn, label_map: LabelMap,
                 transform: Callable | None = None, reading: Reading = Reading()):
        self.records = list(rows.records)
        self.load_images = reading.images
        self.image_dir = Path(rows.image_dir)
        self.transform = transform
        self.source = rows.source
        self.blank_missing_images = reading.blank_missing_images
        with_targets = reading.targets
        ids, lengths = zip(*(encode_caption(r.caption) for r in self.records), strict=True) \
            if self.records else ((), ())
        self.tokens = torch.as_tensor(np.stack(ids)) if ids else torch.zeros(0, 1, dtype=torch.long)
        self.lengths = torch.as_tensor(lengths, dtype=torch.long)
        # predict needs no labels: a Labels column there is ignored, not checked
        self.targets = torch.as_tensor(np.stack(
            [label_map.encode(r.labels if with_targets else (), self.where(r))
             for r in self.records]
        )) if self.records else torch.zeros(0, label_map.num_classes)

    def where(self, rec: Record) -> str:
        """How errors name row `rec`: the CSV file and line, and the image id."""
        return f"{self.source} line {rec.line}, {rec.image_id}" if self.source else rec.image_id

    def __len__(self) -> int:
        return len(self.records)

    def load(self, i: int):
        """The decoded PIL image of row i (errors name the CSV row)."""
        rec = self.records[i]
        return load_image(self.image_dir / rec.image_id, self.where(rec))

    def __getitem__(self, i: int):
        if not self.load_images:
            return torch.zeros(1), self.tokens[i], self.lengths[i], self.targets[i]
        try:
            image = self.load(i)
        except ImageReadError:
            if not self.blank_missing_images:
                raise
            # Explicitly requested: predict from the caption alone (the caller lists these rows).
            from PIL import Image
            image = Image.new("RGB", (32, 32))
        if self.transform is not None:
            image = self.transform(image)
        return image, self.tokens[i], self.lengths[i], self.targets[i]


@dataclass(frozen=True)
class Split:
    """Which image ids train and which validate; saved as JSON with every run."""

    train_prop: float
    seed: int
    train: tuple[str, ...]
    val: tuple[str, ...]

    @classmethod
    def make(cls, image_ids: Sequence[str], train_prop: float, seed: int, block: int = 0) -> Split:
        """Random split by proportion (the report's TRAIN_VAL_PROP), reproducible for a seed;
        both parts keep file order. The rows are put in a seeded random order and cut into
        validation-sized blocks from the end: block 0 (the last) validates by default, block k is
        the k-th before it, so blocks 0..K-1 of one seed are K disjoint folds."""
        if not 0.0 < train_prop <= 1.0:
            raise ValueError(f"train_prop must be in (0, 1], got {train_prop}")
        n = len(image_ids)
        perm = np.random.default_rng(seed).permutation(n)
        n_train = int(round(train_prop * n))
        if train_prop < 1.0:
            n_train = min(max(n_train, 1), n - 1)
        n_val = n - n_train
        end = n - block * n_val
        if block < 0 or (n_val and end - n_val < 0):
            raise ValueError(f"validation block {block} does not exist: {n} rows hold "
                             f"{n // max(n_val, 1)} blocks of {n_val} (train_prop {train_prop}); "
                             f"use a block from 0 to {n // max(n_val, 1) - 1}")
        va = np.sort(perm[end - n_val:end])
        tr = np.sort(np.concatenate([perm[:end - n_val], perm[end:]]))
        return cls(train_prop, seed, tuple(image_ids[i] for i in tr), tuple(image_ids[i] for i in va))

    def apply(self, records: Sequence[Record]) -> tuple[list[Record], list[Record]]:
        """(train rows, validation rows) of `records` by image id; every id must be present."""
        by_id = {r.image_id: r for r in records}
        missing = [i for i in (*self.train, *self.val) if i not in by_id]
        if missing:
            raise ValueError(f"the saved split names {len(missing)} image ids that the CSV does "
                             f"not have (first: {missing[:5]}); was the run trained on another file?")
        return [by_id[i] for i in self.train], [by_id[i] for i in self.val]

    def save(self, path: Path | str) -> None:
        atomic_write(path, json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: Path | str) -> Split:
        return cls.from_dict(read_json(path), path)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, path: Path | str = SPLIT_FILE) -> Split:
        """The split saved as `to_dict()`; `path` names it in the error of a damaged one."""
        try:
            return cls(float(d["train_prop"]), int(d["seed"]), tuple(d["train"]), tuple(d["val"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}); use an intact copy "
                             f"of the run folder") from None


def _seed_worker(worker_id: int) -> None:
    # Each worker gets torch's per-worker seed; numpy and random follow it so augmentations
    # are reproducible for a given loader generator.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: Dataset, how: Pass, *, num_workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader for one pass (`how`) whose shuffling and worker augmentation are seeded;
    under torchrun (how.world > 1) it reads this rank's shard of the seeded order."""
    seed, shuffle = how.seed, how.shuffle
    if how.world > 1:
        rows = pass_order(len(dataset), how, equal="drop" if shuffle else "pad")
        dataset, shuffle = Subset(dataset, rows.tolist()), False
        seed += 7919 * how.rank  # each rank's workers draw their own augmentations
    gen = torch.Generator()
    gen.manual_seed(seed)
    return DataLoader(dataset, batch_size=how.batch_size, shuffle=shuffle,
                      num_workers=num_workers, drop_last=how.drop_last, pin_memory=pin_memory,
                      generator=gen, worker_init_fn=_seed_worker,
                      persistent_workers=num_workers > 0)
