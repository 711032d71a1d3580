"""`mmtag ensemble`: several trained runs as one model that averages their probabilities.

Runs of one recipe trained with different seeds err differently enough that their averaged
probabilities score higher than any of them (docs/experiments.md). The members must
share the architecture, the preprocessing and the validation rows: the ensemble's decision
thresholds are chosen on the members' averaged validation probabilities (their
``val_probs.csv``), exactly as a run chooses its own. Weights that are equal in every member
(the frozen pretrained parts of a cached-path recipe) are stored once, so two members of the
`cpu` recipe take about 65 MB rather than twice 57.

The folder it writes is a run folder for `evaluate`, `predict` and `benchmark` (``best.pt``,
``config.yaml``, ``labels.json``, ``vocab.json``, ``split.json``, ``summary.json``,
``val_probs.csv``); it cannot be resumed or trained further.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from mmtag.atomic import (
    atomic_write,
    read_json,
    remove_stale_stages,
    staging_folder,
    swap_in,
)
from mmtag.config import TrainConfig, first_difference
from mmtag.data.labels import LabelMap
from mmtag.data.tokenizers import tokenizer_from_dict
from mmtag.evaluation.estimate import decision_figures
from mmtag.evaluation.probs_csv import average_probs, read_val_probs, write_val_probs
from mmtag.outputs import check_output_folder
from mmtag.prediction.checkpoint import BestCheckpoint, ModelTooLargeError
from mmtag.run_files import (
    BEST_FILE,
    CONFIG_FILE,
    LABELS_FILE,
    SPLIT_FILE,
    SUMMARY_FILE,
    VAL_PROBS_FILE,
    VOCAB_FILE,
    RunInvalidError,
)

# config fields that change how a member was trained, not what it computes at prediction time
# (the decision settings are the first member's: the ensemble chooses its own thresholds)
_TRAINING_ONLY = {"seed", "optim", "loss", "cache", "device", "deterministic", "best_metric",
                  "channels_last", "decision", "threshold_mode", "threshold_metric",
                  "at_least_one", "min_support"}
# data fields of the split (checked through split.json and val_probs.csv instead) and of
# training-time augmentation
_DATA_TRAINING_ONLY = {"train_prop", "split_seed", "val_block", "limit_train", "limit_val",
                       "hflip", "jitter", "hue", "degrees", "translate", "scale_min", "scale_max",
                       "num_workers"}


# data fields that only the GloVe caption tokenizer reads
_GLOVE_ONLY = {"stopwords", "lemmatizer", "min_freq"}


def _prediction_config(cfg: dict) -> dict:
    """The fields of a saved config that change predictions, in today's form (a config saved
    by an older version is read the way it loads, so old and new members compare alike)."""
    cfg = TrainConfig.from_dict(cfg).to_dict()
    out = {k: v for k, v in cfg.items() if k not in _TRAINING_ONLY}
    skip = _DATA_TRAINING_ONLY | (_GLOVE_ONLY if cfg["model"]["text_encoder"] != "glove_lstm"
                                  else set())
    out["data"] = {k: v for k, v in cfg["data"].items() if k not in skip}
    return out


def build_ensemble(runs: Sequence[Path | str], out: Path | str) -> dict:
    """Write the ensemble of `runs` (finished run folders) to the folder `out`; returns its
    summary (validation figures of the averaged probabilities, as a run's summary.json)."""
    runs, out = [Path(r) for r in runs], Path(out)
    if len(runs) < 2:
        raise ValueError("an ensemble needs at least two runs")
    out = check_output_folder(out, "--out", runs)  # a link to a folder: the folder it names
    remove_stale_stages(out)  # what a killed ensemble left
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose another --out")
    ckpts = [BestCheckpoint.load(r / BEST_FILE) for r in runs]
    for run, ck in zip(runs, ckpts, strict=True):
        if not ck.finished:
            raise RunInvalidError(f"{ck.unfinished_message(run / BEST_FILE)}; then build the "
                             f"ensemble")
    first, base = runs[0], ckpts[0]
    _check_members(runs, ckpts)
    v, p = _averaged_val_probs(runs)
    shared, members, mb = _shared_weights([ck.model for ck in ckpts])
    cfg = TrainConfig.from_dict(base.config)
    if mb > cfg.model.max_size_mb:
        raise ModelTooLargeError(
            f"the ensemble of {len(runs)} runs would be {mb:.1f} MB saved ({len(shared)} of "
            f"{len(ckpts[0].model)} weight tensors shared), over the limit of "
            f"{cfg.model.max_size_mb:g} MB (model.max_size_mb); use fewer runs")

    figures = decision_figures(cfg, v.targets, p, v.label_names)
    # every file is made in a stage beside `out`, which becomes `out` once complete: a kill
    # leaves no folder that predict would use and evaluate fail on
    best = BestCheckpoint(config=base.config, labels=base.labels, caption=base.caption,
                          thresholds=figures["thresholds"], at_least_one=base.at_least_one,
                          finished=True, decision=figures["decision"], ensemble={"runs": [str(r) for r in runs],
                                                   "shared": shared, "members": members})
    tta = (read_json(first / SUMMARY_FILE).get("tta")
           if (first / SUMMARY_FILE).exists() else None)
    summary = {"members": [str(r) for r in runs], **figures, "tta": tta,
               "saved_model_mb": round(mb, 2), "shared_tensors": len(shared),
               "val_rows": len(v.image_ids)}
    stage = staging_folder(out)
    try:
        _write_ensemble(stage, first, best, summary, v, p)
        swap_in(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage)
    return summary


def _averaged_val_probs(runs: list[Path]):
    """(the first run's val_probs.csv, the members' probabilities averaged); members whose
    files list other rows or labels are refused."""
    read = [read_val_probs(run) for run in runs]
    v = read[0]
    for run, other in zip(runs[1:], read[1:], strict=True):
        if (other.image_ids, other.true_labels, other.label_names) != (
                v.image_ids, v.true_labels, v.label_names):
            raise ValueError(f"{run / VAL_PROBS_FILE} does not list the same rows and labels as "
                             f"{runs[0] / VAL_PROBS_FILE}")
    return v, average_probs(r.probs for r in read)


def _shared_weights(states: list[dict]) -> tuple[dict, list[dict], float]:
    """(the tensors equal in every member, each member's others, the saved size in MB): the
    shared ones are stored once."""
    shared = {k: v for k, v in states[0].items()
              if all(k in s and s[k].shape == v.shape and torch.equal(s[k], v) for s in states[1:])}
    members = [{k: v for k, v in s.items() if k not in shared} for s in states]
    nbytes = sum(v.numel() * v.element_size() for v in shared.values())
    nbytes += sum(v.numel() * v.element_size() for m in members for v in m.values())
    return shared, members, nbytes / 1e6


def _write_ensemble(out: Path, first: Path, best: BestCheckpoint, summary: dict, v,
                    probs) -> None:
    """The ensemble's files in the folder `out`: best.pt, the first member's run files, the
    averaged val_probs.csv and summary.json (the file that says the folder is complete)."""
    best.save(out / BEST_FILE)
    for name in (CONFIG_FILE, LABELS_FILE, VOCAB_FILE, SPLIT_FILE):
        if (first / name).exists():
            atomic_write(out / name, (first / name).read_bytes())
    write_val_probs(out, v.image_ids, v.true_labels, v.label_names, probs)
    atomic_write(out / SUMMARY_FILE, json.dumps(summary, indent=2))


def _check_members(runs: list[Path], ckpts: list[BestCheckpoint]) -> None:
    """Refuse members that cannot be averaged: ensembles, other validation rows, another model
    or preprocessing, another label set or vocabulary (each named against the first run)."""
    first, base = runs[0], ckpts[0]
    for run, ck in zip(runs[1:], ckpts[1:], strict=True):
        if ck.ensemble is not None or base.ensemble is not None:
            raise ValueError(f"{run if ck.ensemble is not None else first} is an ensemble "
                             f"already; give the runs it was built from")
        if (run / SPLIT_FILE).read_text() != (first / SPLIT_FILE).read_text():
            raise ValueError(f"{run} validates on other rows than {first} (split.json differs): "
                             f"the ensemble's thresholds are chosen on rows no member trained on, "
                             f"so the members need the same data.split_seed and train_prop")
        diff = first_difference(_prediction_config(base.config), _prediction_config(ck.config))
        if diff:
            raise ValueError(f"{run} predicts differently from {first} ({diff}): an ensemble's "
                             f"members need the same model and preprocessing")
        if LabelMap.from_dict(ck.labels).labels != LabelMap.from_dict(base.labels).labels:
            raise ValueError(f"{run} has another label set than {first}: train both on the "
                             f"same data")
        if (tokenizer_from_dict(ck.caption).to_dict()
                != tokenizer_from_dict(base.caption).to_dict()):
            raise ValueError(f"{run} has another caption vocabulary than {first}: train both on "
                             f"the same data")
