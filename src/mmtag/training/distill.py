"""Distillation: a student learns from a teacher's probabilities as well as from the labels.

The teacher is a finished run or ensemble folder. Its probabilities on the student's training
rows (and on unlabelled rows, e.g. the test photos a user already has) are computed once, on
the teacher's own cached features when it is a cached recipe (seconds for 16,000 rows instead
of an hour of raw photos at its size with flip TTA), and kept in the feature cache under a key
of the teacher's weights and the photos' bytes. The student's validation rows keep their labels
alone: its figures stay honest.

A labelled row's target is `alpha * teacher + (1 - alpha) * labels`; an unlabelled row's is the
teacher's probabilities. Binary cross-entropy takes such soft targets as they are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmtag.atomic import atomic_write, read_json
from mmtag.config import ConfigError, TrainConfig
from mmtag.data.batching import Pass
from mmtag.data.csv_io import Record, read_csv
from mmtag.data.dataset import ImageRows, Reading, TaggingDataset, make_loader
from mmtag.data.images import build_transform, transform_spec
from mmtag.data.labels import LabelMap
from mmtag.data.tokenizers import tokenizer_from_dict
from mmtag.models.build import build_tagger, encoder_normalisation
from mmtag.prediction.checkpoint import BestCheckpoint
from mmtag.prediction.passes import EvalPass, evaluate
from mmtag.run_files import BEST_FILE, SPLIT_FILE, SUMMARY_FILE
from mmtag.runtime import choose_precision
from mmtag.training.cached import CachePlan, cached_dataset, plan_cache
from mmtag.training.feature_cache import default_cache_dir, image_digests

log = logging.getLogger("mmtag.distill")



@dataclass
class Teacher:
    """A finished teacher's checkpoint, as distillation reads it."""

    path: Path                  # its best.pt
    config: TrainConfig
    label_map: LabelMap
    ckpt: BestCheckpoint

    @property
    def states(self) -> list[dict]:
        """The weights of each member (one for a run)."""
        return self.ckpt.states()


def load_teacher(folder: Path | str) -> Teacher:
    """The teacher's best.pt; an unfinished run (its thresholds untuned, its weights maybe of
    an early epoch) is refused."""
    folder = Path(folder)
    path = folder / BEST_FILE if folder.is_dir() else folder
    if not path.exists():
        raise FileNotFoundError(f"teacher {folder} holds no {BEST_FILE}: give a finished run "
                                f"or ensemble folder (mmtag train / mmtag ensemble)")
    ckpt = BestCheckpoint.load(path, "teacher")
    if not ckpt.finished:
        raise ValueError(f"teacher {path} is from a run that did not finish: resume it first "
                         f"(mmtag train --resume {path.parent})")
    try:
        cfg = TrainConfig.from_dict(ckpt.config)
    except ConfigError as e:
        raise ConfigError(f"the config saved in {path}: {e}") from None
    return Teacher(path, cfg, LabelMap.from_dict(ckpt.labels), ckpt)


def teacher_split(teacher: Teacher) -> dict | None:
    """The teacher's split.json (a run's or an ensemble's folder), or None."""
    f = teacher.path.parent / SPLIT_FILE
    return read_json(f) if f.exists() else None


def unlabeled_rows(csv_path: Path | str, image_dir: Path) -> list[Record]:
    """The rows of `csv_path` whose photo is in `image_dir`: a row without its photo cannot be
    scored by the teacher, and is left out (counted in the log); so is a row with labels (a
    labelled row belongs in the training file)."""
    rows = read_csv(csv_path)
    kept = [r for r in rows if not r.labels and (image_dir / r.image_id).is_file()]
    if len(kept) < len(rows):
        log.info("%s: %d of %d rows have their photo in %s and are used as unlabelled rows; "
                 "the other %d are left out", csv_path, len(kept), len(rows), image_dir,
                 len(rows) - len(kept))
    if not kept:
        raise ValueError(f"no row of {csv_path} has its photo in {image_dir}: put the photos "
                         f"there or leave out --unlabeled")
    return kept


def teacher_probabilities(teacher: Teacher, rows: ImageRows, device: torch.device,
                          cache_root: Path | None = None, progress: bool = False) -> np.ndarray:
    """(N, C) probabilities of the teacher for `rows` (its label order), read from the cache
    when this teacher already scored these photos and captions."""
    key = _key(teacher, rows)
    folder = Path(cache_root or default_cache_dir()) / "teachers"
    cached = folder / f"{key}.npy"
    if cached.exists():
        probs = np.load(cached)
        if probs.shape == (len(rows.records), teacher.label_map.num_classes):
            log.info("teacher probabilities of %d rows read from %s", len(rows.records), cached)
            return probs
    probs = _score(teacher, rows, device, progress)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(cached, lambda f: np.save(f, probs.astype(np.float32)))
    log.info("teacher probabilities of %d rows cached in %s", len(rows.records), cached)
    return probs


def _key(teacher: Teacher, rows: ImageRows) -> str:
    h = hashlib.sha256()
    with open(teacher.path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digests = image_digests(rows.records, rows.image_dir, rows.source)
    for r, digest in zip(rows.records, digests, strict=True):
        h.update(f"\0{digest}\0{r.caption}".encode())
    return h.hexdigest()[:24]


def _score(teacher: Teacher, rows: ImageRows, device: torch.device,
           progress: bool) -> np.ndarray:
    """Run the teacher over `rows` as its training scored its validation rows: on its cached
    features where its recipe caches (its frozen layers from the pretrained weights, so the
    cache it filled is the one read), with its flip TTA; each member's probabilities
    averaged."""
    cfg = teacher.config
    summary = teacher.path.parent / SUMMARY_FILE
    # the engine that filled the teacher's cache, not today's default (runs that do not say
    # so cached with torch, the only engine then)
    engine = read_json(summary).get("cache_engine", "torch") if summary.exists() else None
    if engine:
        cfg = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, engine=engine))
    caption_enc = tokenizer_from_dict(teacher.ckpt.caption)
    model = build_tagger(cfg.model, teacher.label_map.num_classes, caption_enc,
                         load_pretrained=True)
    norm = encoder_normalisation(model)
    spec = transform_spec(cfg.data, norm)
    ds = TaggingDataset(rows, caption_enc, teacher.label_map, build_transform(spec, train=False),
                        Reading(images=model.image_encoder is not None, targets=False))
    dtype = choose_precision(cfg.amp, device).dtype
    stage, text_stage = plan_cache(cfg, model)
    tta = cfg.tta_flip and (stage == 0 or cfg.cache.flip)
    if stage or text_stage:
        ds = cached_dataset(cfg, model, ds, spec, CachePlan(stage, text_stage, dtype, progress),
                            train=False)
        ds.both_views = tta and stage > 0
        model.image_input_stage, model.text_input_stage = stage, text_stage
    loader = make_loader(ds, Pass(cfg.optim.batch_size * 2),
                         num_workers=0 if stage or text_stage else cfg.data.num_workers)
    parts = []
    for i, state in enumerate(teacher.states):
        # the frozen layers' weights in best.pt are rounded to fp16: on the cached path they
        # are not run; elsewhere these are the weights the teacher predicts with
        model.load_state_dict({k: v.float() if v.is_floating_point() else v
                               for k, v in state.items()})
        model.to(device)
        _, p, _ = evaluate(model, loader, None, device, EvalPass(
            dtype=dtype, channels_last=True, tta=tta, progress=progress,
            desc=f"teacher {i + 1}/{len(teacher.states)}"))
        parts.append(p)
    return np.mean(parts, axis=0)


def soft_targets(hard: torch.Tensor, teacher: np.ndarray, labelled: int,
                 alpha: float) -> torch.Tensor:
    """Each row's target: `alpha * teacher + (1 - alpha) * hard` for the first `labelled`
    rows, the teacher's probabilities for the (unlabelled) rest."""
    t = torch.as_tensor(teacher, dtype=torch.float32)
    mixed = alpha * t + (1.0 - alpha) * hard.float().cpu()
    is_labelled = (torch.arange(len(t)) < labelled)[:, None]
    return torch.where(is_labelled, mixed, t)


def in_label_order(probs: np.ndarray, teacher_labels: Sequence, student_labels: Sequence,
                   teacher: Path) -> np.ndarray:
    """The teacher's columns reordered as the student's labels; a label the teacher does not
    know is an error (its target would be made up)."""
    index = {label: i for i, label in enumerate(teacher_labels)}
    missing = [label for label in student_labels if label not in index]
    if missing:
        raise ValueError(f"teacher {teacher} does not know the label(s) {missing} of the "
                         f"student's training rows: distil from a teacher trained on the same "
                         f"labels")
    return probs[:, [index[label] for label in student_labels]]


def distilled_targets(cfg: TrainConfig, data, hard: torch.Tensor, device: torch.device,
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
    probs = teacher_probabilities(teacher, ImageRows(data.train_rows, data.image_dir, "train.csv"),
                                  device, cfg.cache.dir and Path(cfg.cache.dir), progress)
    probs = in_label_order(probs, teacher.label_map.labels, data.label_map.labels,
                           teacher.path)
    n = data.labelled if data.labelled >= 0 else len(data.train_rows)
    log.info("distillation from %s: %d labelled rows learn %.2f x its probabilities + %.2f x "
             "their labels, %d unlabelled rows its probabilities", teacher.path, n,
             cfg.distill.alpha, 1 - cfg.distill.alpha, len(data.train_rows) - n)
    return soft_targets(hard, probs, n, cfg.distill.alpha).to(hard.device)
