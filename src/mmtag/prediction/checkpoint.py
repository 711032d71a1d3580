"""Checkpoints: atomic writes, the `best` (inference) and `last` (resume) files, model size.

`best.pt` holds only plain data and tensors (config, label map, caption encoder, weights,
thresholds) so it loads with `torch.load(..., weights_only=True)` and predict needs nothing else.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mmtag.atomic import atomic_write
from mmtag.run_files import LAST_FILE, SUMMARY_FILE, RunError, RunNotFoundError

log = logging.getLogger("mmtag.predict")

FORMAT_VERSION = 1
# what every best.pt holds besides its weights
BEST_KEYS = ("config", "labels", "caption", "thresholds", "at_least_one")


class ModelTooLargeError(ValueError):
    """The saved inference model would exceed the configured size limit."""


def atomic_save(obj: dict, path: Path | str) -> None:
    """torch.save through mmtag.atomic: a crash or a full disk mid-write never leaves a
    truncated checkpoint behind (the previous one stays). A digest of the contents is saved
    with them, so bytes changed later (a bad disk, a tampered file) are refused on load rather
    than read as other weights or thresholds (a digest guards against corruption, not against
    someone who rewrites it too)."""
    payload = {k: v for k, v in obj.items() if k != "digest"}
    payload["digest"] = content_digest(payload)
    buf = io.BytesIO()  # serialised first: torch reports a failed file write as a RuntimeError
    torch.save(payload, buf)
    atomic_write(path, buf.getbuffer())


def content_digest(obj) -> str:
    """sha256 over every key and value of nested dicts/lists of tensors and plain values."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj) -> None:
    if isinstance(obj, dict):
        h.update(b"{")
        for k, v in obj.items():
            h.update(repr(k).encode())
            _feed(h, v)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"tensor:{t.dtype}:{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        h.update(repr(obj).encode())  # floats' repr round-trips exactly


def inference_state_dict(model: nn.Module, fp16: bool = False) -> dict[str, torch.Tensor]:
    """Weights and buffers on the CPU; floating tensors in fp16 when `fp16`."""
    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu")
        if fp16 and v.is_floating_point():
            v = v.half()
        sd[k] = v.clone()
    return sd


def state_dict_megabytes(model: nn.Module, fp16: bool = False) -> float:
    """Size of the weights as stored in `best.pt` (MB = 10^6 bytes)."""
    total = 0
    for v in model.state_dict().values():
        size = 2 if fp16 and v.is_floating_point() else v.element_size()
        total += v.numel() * size
    return total / 1e6


def check_model_size(model: nn.Module, limit_mb: float, fp16: bool) -> float:
    """Refuse up front a configuration whose saved model would exceed `limit_mb`."""
    mb = state_dict_megabytes(model, fp16)
    if mb > limit_mb:
        hint = "" if fp16 else f" (fp16 storage would make it {state_dict_megabytes(model, True):.1f} MB: set model.fp16_storage=true)"
        raise ModelTooLargeError(
            f"the saved model would be {mb:.1f} MB, over the {limit_mb:g} MB limit"
            f"{hint}; choose smaller encoders, a smaller model.hidden, or raise model.max_size_mb")
    return mb


class CheckpointError(RunError, ValueError):
    """A checkpoint file is damaged, truncated or not mmtag's; it was not loaded."""


def _without_removed_tta(config: dict, path: Path) -> dict:
    """A saved config with multi-scale TTA sizes (removed after e2ba04c; they changed only how
    a run predicted, not its weights): read as predicting at data.image_size alone, and said."""
    if not isinstance(config, dict) or not config.get("tta_sizes"):
        return config
    log.warning("%s was made with multi-scale TTA (tta_sizes=%s), which mmtag no longer has: "
                "it predicts at data.image_size alone (check out e2ba04c for the sizes)", path,
                config["tta_sizes"])
    return {**config, "tta_sizes": []}


def load_checkpoint(path: Path | str, what: str = "checkpoint",
                    required: tuple[str, ...] = ()) -> dict:
    """Load a checkpoint written by mmtag (plain data + tensors only).

    Only the restricted loader (`weights_only=True`) is ever used: a file it refuses (tampered,
    truncated, empty, or holding code) is reported as an error, never loaded any other way."""
    path = Path(path)
    if not path.exists():
        raise RunNotFoundError(f"{what} {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder, not a checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # UnpicklingError, EOFError, RuntimeError (zip), ...: all damage
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        # torch's own message may advise weights_only=False: that would run code in the file
        if "weights_only" in reason or "Weights only load failed" in reason:
            reason = "it holds objects other than plain data and tensors"
        raise CheckpointError(
            f"{what} {path} cannot be read safely ({type(e).__name__}: {reason[:160]}); it was "
            f"not loaded. It is damaged, truncated or not written by mmtag: use an intact copy, "
            f"or train the run again") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{what} {path} is not an mmtag checkpoint of format "
                              f"{FORMAT_VERSION}; it was not loaded")
    digest = ckpt.pop("digest", None)  # checkpoints written before digests have none
    if digest is not None and digest != content_digest(ckpt):
        raise CheckpointError(f"{what} {path} does not match the digest saved with it: its "
                              f"bytes changed after it was written (a damaged disk or copy, or "
                              f"an edit); it was not loaded. Use an intact copy, or train again")
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise CheckpointError(f"{what} {path} lacks {', '.join(missing)}: it is not a whole "
                              f"mmtag checkpoint of this kind; it was not loaded")
    return ckpt


@dataclass
class BestCheckpoint:
    """best.pt, what a run predicts with: its recipe, labels, caption encoder, weights and
    decision thresholds, as plain data and tensors. One model's weights (`model`), or an
    ensemble's (`ensemble`: {"runs", "shared", "members"}, written by `mmtag ensemble`).
    Training writes it after each best epoch with thresholds of 0.5, and again with the tuned
    thresholds and `finished` once the run ends."""

    config: dict
    labels: dict
    caption: dict
    thresholds: list[float]
    at_least_one: bool
    finished: bool = False
    model: dict | None = None
    ensemble: dict | None = None
    epoch: int | None = None
    val_metrics: dict | None = None
    decision: str | None = None  # the rule chosen when the run ended (config decision: auto)

    def states(self) -> list[dict]:
        """The full state dict of each member (one for a single run)."""
        if self.ensemble is None:
            return [self.model]
        ens = self.ensemble
        return [{**ens["shared"], **own} for own in ens["members"]]

    def payload(self) -> dict:
        """The dict saved as best.pt (keys in the order runs have always written them)."""
        d = {"format": FORMAT_VERSION, "config": self.config, "labels": self.labels,
             "caption": self.caption}
        if self.ensemble is None:
            d.update(model=self.model, epoch=self.epoch, val_metrics=self.val_metrics)
        d.update(thresholds=self.thresholds, at_least_one=self.at_least_one,
                 finished=self.finished)
        if self.decision is not None:
            d["decision"] = self.decision
        if self.ensemble is not None:
            d["ensemble"] = self.ensemble
        return d

    def save(self, path: Path | str) -> None:
        atomic_save(self.payload(), path)

    @classmethod
    def load(cls, path: Path | str, what: str = "checkpoint") -> BestCheckpoint:
        """best.pt at `path`, checked (CheckpointError when damaged or incomplete). A file
        written before runs recorded `finished` is finished unless its run folder says
        otherwise (last.pt there but no summary.json, which a run writes when it ends); a
        best.pt copied out on its own is taken as finished."""
        path = Path(path)
        ckpt = load_checkpoint(path, what, required=BEST_KEYS)
        if "model" not in ckpt and "ensemble" not in ckpt:
            raise CheckpointError(f"{what} {path} holds no weights (neither model nor "
                                  f"ensemble); it was not loaded")
        finished = ckpt.get("finished")
        if finished is None:
            folder = path.parent
            finished = not ((folder / LAST_FILE).exists()
                            and not (folder / SUMMARY_FILE).exists())
        return cls(config=_without_removed_tta(ckpt["config"], path), labels=ckpt["labels"], caption=ckpt["caption"],
                   thresholds=list(ckpt["thresholds"]), at_least_one=bool(ckpt["at_least_one"]),
                   finished=bool(finished), model=ckpt.get("model"),
                   ensemble=ckpt.get("ensemble"), epoch=ckpt.get("epoch"),
                   val_metrics=ckpt.get("val_metrics"), decision=ckpt.get("decision"))

    @property
    def rule(self) -> str:
        """The decision rule it predicts with: the one chosen when the run ended, else its
        config's (an unfinished 'auto' run: its thresholds of 0.5)."""
        rule = self.decision or self.config.get("decision", "threshold")
        return "threshold" if rule == "auto" else rule

    def unfinished_message(self, path: Path | str) -> str:
        """What to tell a user of an unfinished run's best.pt, naming how to finish it."""
        run = Path(path).parent
        epoch = self.epoch if self.epoch is not None else "?"
        return (f"{run} is an unfinished run (it stopped after epoch {epoch}; its decision "
                f"thresholds were never tuned and are 0.5): finish it with mmtag train "
                f"--resume {run} --data DIR")
