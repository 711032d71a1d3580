"""`mmtag report`: report.md and a self-contained report.html for a run or an ablation.

Everything in a report is read from the run folder (config.yaml, metrics.csv, summary.json,
val_probs.csv, best.pt) and, for the data summary and the error gallery, from the data folder
the run was trained on. Figures go to `report_files/` beside report.md; report.html embeds them
(data: URIs), so that it opens anywhere without network or other files.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmtag.atomic import atomic_write, atomic_write_many, read_json
from mmtag.config import TrainConfig, first_difference, load_config
from mmtag.data.images import ImageReadError, load_image
from mmtag.data.labels import LabelMap
from mmtag.data.sources import KAGGLE_IMAGES, KAGGLE_ROWS, DataSourceError, Source, open_data
from mmtag.data.tokenizers import tokenizer_from_dict
from mmtag.evaluation.estimate import METRIC_COLUMNS, RULE_WORDS
from mmtag.evaluation.metrics import multilabel_metrics
from mmtag.evaluation.probs_csv import read_val_probs
from mmtag.evaluation.thresholds import apply_thresholds, decide
from mmtag.models.build import build_tagger
from mmtag.outputs import check_output_folder
from mmtag.prediction.checkpoint import BestCheckpoint
from mmtag.reporting.ablation import (
    SPEC_FILE,
    collect,
    command,
    diverged,
    load_ablation,
)
from mmtag.reporting.compare import compare
from mmtag.reporting.figures import new_figure, relative, save_figure
from mmtag.reporting.render import render
from mmtag.reporting.tables import machine_facts, results_context
from mmtag.run_files import (
    BEST_FILE,
    CONFIG_FILE,
    CURVES_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    RunInvalidError,
    RunNotFoundError,
    read_metrics_rows,
)

log = logging.getLogger("mmtag.report")

ASSETS = "report_files"
GALLERY_SIZE = 12
THUMB_PX = 192
# the per-epoch table's columns: (metrics.csv column, heading)
EPOCH_COLUMNS = [("epoch", "epoch"), ("lr", "lr"), ("train_loss", "train loss"),
                 ("train_micro_f1", "train micro-F1"), ("val_loss", "val loss"),
                 ("val_precision", "val precision"), ("val_recall", "val recall"),
                 ("val_micro_f1", "val micro-F1"), ("val_macro_f1", "val macro-F1"),
                 ("val_samples_f1", "val samples-F1"), ("seconds", "seconds")]
FINAL_FIGURES = METRIC_COLUMNS[1:]  # precision, recall, micro-, macro-, samples-F1


def write_report(path: Path | str, *, data_dir: Path | str | None = None,
                 out: Path | str | None = None) -> tuple[Path, Path]:
    """Write report.md and report.html for a run folder or an ablation folder into `out`
    (default: that folder); returns their paths."""
    path = Path(path)
    out = Path(out) if out else path
    check_report_folder(out, path, data_dir)
    if (path / SPEC_FILE).exists():
        context = ablation_context(path, out)
        names = ("ablation_report.md.j2", "ablation_report.html.j2")
    elif (path / SUMMARY_FILE).exists():
        if "members" in read_json(path / SUMMARY_FILE):
            raise ValueError(f"{path} is an ensemble: report on each of its members (the run "
                             f"folders it averages)")
        context = run_context(path, out, data_dir)
        names = ("report.md.j2", "report.html.j2")
    else:
        raise RunNotFoundError(f"{path} is neither a finished run (summary.json) nor an "
                                f"ablation folder ({SPEC_FILE}); a run writes summary.json "
                                f"when it ends")
    md, html = out / "report.md", out / "report.html"
    # both pages at once (a full disk leaves both old or both new), and only then the figures
    # of an earlier report go: report.md never links a deleted file
    atomic_write_many([(md, render(names[0], **context)), (html, render(names[1], **context))])
    remove_unlinked_figures(out / ASSETS, context.get("gallery", []))
    return md, html


def check_report_folder(out: Path, path: Path, data_dir: Path | str | None) -> None:
    """`out` is a folder, not an input folder, and any report.md or report.html in it is one
    an earlier mmtag report wrote (a user's own file of that name is never replaced)."""
    inputs = [Path(data_dir), Path(data_dir).parent, Path(data_dir) / "data"] if data_dir else []
    check_output_folder(out, "--out", inputs)
    for name in ("report.md", "report.html"):
        f = out / name
        if f.is_symlink() or (f.exists() and not _written_by_report(f)):
            raise FileExistsError(f"--out {out} holds a {name} that mmtag report did not write; "
                                  f"it is not replaced: give another --out")


def _written_by_report(f: Path) -> bool:
    if not f.is_file():
        return False
    # an ablation's report.md names mmtag report only on its last line: read the whole page
    # (a report is kilobytes; a large foreign file is not one)
    if f.stat().st_size > 8 * 2**20:
        return False
    return b"mmtag report" in f.read_bytes()


def remove_unlinked_figures(assets: Path, gallery: list) -> None:
    """Gallery thumbnails of an earlier report that this one does not show."""
    keep = {item.thumb.name for item in gallery if item.thumb is not None}
    for old in assets.glob("gallery_*.jpg"):
        if old.name not in keep:
            old.unlink()


# -- a run -------------------------------------------------------------------------------------


def run_context(run_dir: Path, out: Path, data_dir: Path | str | None) -> dict:
    """Everything the run templates show."""
    summary = read_json(run_dir / SUMMARY_FILE)
    source = report_source(summary, data_dir)
    assets = out / ASSETS
    assets.mkdir(parents=True, exist_ok=True)
    vp = read_val_probs(run_dir)
    ckpt = BestCheckpoint.load(run_dir / BEST_FILE)
    labels = LabelMap.from_dict(ckpt.labels)  # val_probs.csv's columns are labels: show names
    named = dict(zip(labels.labels, labels.display, strict=True))
    vp.label_names = [named.get(lab, lab) for lab in vp.label_names]
    cfg, thresholds = checked_metadata(run_dir, ckpt, summary)
    model = model_facts(ckpt, summary)
    decision = decision_facts(summary, cfg)
    epochs = epoch_rows(run_dir)
    return {
        "title": f"mmtag report: run {run_dir}", "run": run_dir, "out": out,
        "written": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "summary": summary, "config_yaml": (run_dir / CONFIG_FILE).read_text(encoding="utf-8"),
        "cfg": cfg, "model": model,
        "wall_minutes": summary["wall_seconds"] / 60 if "wall_seconds" in summary else None,
        "epochs": epochs, "epoch_columns": EPOCH_COLUMNS,
        "finals": final_rows(summary, epochs), "final_figures": FINAL_FIGURES,
        "per_class": per_class_rows(summary, thresholds),
        "decision": decision,
        "model_card": model_card(summary, model, decision, source.shown if source else None),
        "curves": copy_into(run_dir / CURVES_FILE, assets),
        "threshold_plot": plot_threshold_curve(vp, summary, cfg, assets / "thresholds.png"),
        "data": data_facts(source) if source else None,
        "data_dir": source.shown if source else None,
        "gallery": (error_gallery(vp, thresholds, cfg, source, assets,
                                  summary.get("decision", cfg.decision)) if source else []),
        "machine": machine_facts(summary), "assets": ASSETS,
        "rel": lambda p: relative(p, out),
    }


def report_source(summary: dict, given: Path | str | Source | None) -> Source | None:
    """--data, else the data the run was trained on (when it is still there), shown as the
    user named it. A table given as --data is read with the columns the run was trained with."""
    saved = (Source.from_dict(summary["data"]) if summary.get("data") else
             Source(Path(summary["data_dir"]) / KAGGLE_ROWS, Path(summary["data_dir"]) /
                    KAGGLE_IMAGES, None, summary["data_dir"]) if summary.get("data_dir")
             else None)
    if isinstance(given, Source):
        return given
    if given is not None:
        return open_data(given, None, saved.columns if saved else None)
    if saved and saved.rows.exists():
        return saved
    if saved:
        log.warning("the run's data %s is gone: no data summary and no error gallery "
                    "(give --data)", saved.shown)
    elif summary.get("data"):
        log.warning("the run was trained on a DataFrame: save it as a table and give --data "
                    "TABLE for the data summary and the error gallery")
    return None


def checked_metadata(run_dir: Path, ckpt: BestCheckpoint, summary: dict) -> tuple[TrainConfig, np.ndarray]:
    """The config and thresholds the report shows: best.pt's, which predict uses. config.yaml
    and summary.json must say the same (an edit or a copy from another run would make the
    report describe a model that is not the one predicting): else an error naming the file."""
    best = run_dir / BEST_FILE
    if not ckpt.finished:
        raise RunInvalidError(f"{ckpt.unfinished_message(best)}; then report on it")
    cfg = TrainConfig.from_dict(ckpt.config)
    saved = load_config(run_dir / CONFIG_FILE)
    diff = first_difference(saved.to_dict(), cfg.to_dict())
    if diff:
        raise RunInvalidError(f"{run_dir / CONFIG_FILE} does not match the config in {best} "
                         f"({diff}): it was edited or copied from another run; restore it "
                         f"(the report describes the model predict uses)")
    thresholds = np.asarray(ckpt.thresholds, dtype=float)
    given = np.asarray(summary.get("thresholds", []), dtype=float)
    if given.shape != thresholds.shape or not np.allclose(given, thresholds, rtol=0, atol=1e-9):
        raise RunInvalidError(f"{run_dir / SUMMARY_FILE} does not match {best}: its thresholds "
                         f"differ from the ones predict uses; it was edited or copied from "
                         f"another run: restore it, or train the run again")
    return cfg, thresholds


def model_facts(ckpt: BestCheckpoint, summary: dict) -> dict:
    """Parameters (all, and those that train) of the run's network, built as best.pt holds it."""
    cfg = TrainConfig.from_dict(ckpt.config)
    labels = LabelMap.from_dict(ckpt.labels)
    model = build_tagger(cfg.model, labels.num_classes, tokenizer_from_dict(ckpt.caption),
                         load_pretrained=False)
    params = list(model.parameters())
    return {"total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "saved_mb": summary.get("saved_model_mb"), "image": cfg.model.image_encoder,
            "text": cfg.model.text_encoder, "fusion": cfg.model.fusion,
            "freeze_image": cfg.model.freeze_image, "freeze_text": cfg.model.freeze_text,
            "labels": labels.labels}


def epoch_rows(run_dir: Path) -> list[dict]:
    return [{k: float(v) for k, v in r.items()} for r in read_metrics_rows(run_dir / METRICS_FILE)]


def final_rows(summary: dict, epochs: list[dict]) -> list[dict]:
    """The report's Table 4.2: loss, precision, recall, micro-, macro- and samples-F1, time;
    at threshold 0.5, under the run's decision rule (chosen on these rows) and its honest
    cross-fit estimate."""
    best = next((e for e in epochs if int(e["epoch"]) == summary["best_epoch"]), {})
    seconds = sum(e["seconds"] for e in epochs)
    rule = RULE_WORDS[summary.get("decision", "threshold")]
    rows = [("threshold 0.5", "val_at_0.5"), (f"{rule} (chosen on these rows)", "val"),
            (f"{rule}, cross-fit estimate", "val_crossfit")]
    other = summary.get("val_crossfit_other_rule")
    if other:
        rows.append((f"{RULE_WORDS[other['decision']]}, cross-fit estimate",
                     "val_crossfit_other_rule"))
    return [{"name": name, "loss": best.get("val_loss"), "minutes": seconds / 60,
             **{f: (summary.get(key) or {}).get(f) for f in FINAL_FIGURES}}
            for name, key in rows]


def per_class_rows(summary: dict, thresholds: np.ndarray) -> list[dict]:
    rows = summary.get("per_class", [])
    thr = np.broadcast_to(thresholds, (len(rows),)) if thresholds.size in (1, len(rows)) else None
    return [{**r, "threshold": float(thr[i]) if thr is not None else None}
            for i, r in enumerate(rows)]


def decision_facts(summary: dict, cfg) -> dict:
    """The run's decision rule and its cross-fit figures (None where summary.json lacks one:
    a validation split too small to cross-fit)."""
    thr = summary["thresholds"]
    other = summary.get("val_crossfit_other_rule") or {}

    def figures(d: dict) -> dict:
        return {f: d.get(f) for f in FINAL_FIGURES}

    return {"expected_f1": summary.get("decision") == "expected_f1",
            "mode": cfg.threshold_mode, "metric": cfg.threshold_metric,
            "global": len(set(thr)) == 1, "threshold": thr[0] if thr else None,
            "at_least_one": cfg.at_least_one,
            "crossfit": figures(summary.get("val_crossfit") or {}),
            "other": {**figures(other), "rule": RULE_WORDS[other["decision"]]} if other else None,
            "why": summary.get("decision_why")}


def model_card(summary: dict, model: dict, decision: dict, data_dir: str | None) -> list:
    """(heading, text) items of the model card: the one source of both templates' card."""
    text = {"minilm": "embedded by MiniLM",
            "glove_lstm": "read as GloVe words (words outside its vocabulary are dropped)",
            "none": "not used"}[model["text"]]
    cf = decision["crossfit"]
    return [
        ("Intended use", f"tagging a photo and its one-line caption with a set of its "
                         f"{len(model['labels'])} labels, for data like the training data. Not "
                         f"for decisions about people."),
        ("Training data", f"{summary['train_rows']} labelled rows"
                          + (f" of {data_dir}" if data_dir else "")
                          + f"; {summary['val_rows']} held-out validation rows (split.json) "
                            f"give every figure in this report."),
        ("Metrics", f"cross-fit micro-F1 {_fmt(cf['micro_f1'])}, samples-F1 "
                    f"{_fmt(cf['samples_f1'])} on the validation rows, under the run's "
                    f"decision rule."),
        ("Limitations", "the figures hold for photos and captions like the training data's; "
                        "labels with little support (the per-class table) are predicted less "
                        "reliably; the model knows only its own labels"
                        + ("" if decision["at_least_one"] else
                           ", and may predict none for an image")
                        + f"; captions are {text}."),
    ]


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def plot_threshold_curve(vp, summary: dict, cfg, out: Path) -> Path:
    """Micro- and samples-F1 of one global threshold from 0.02 to 0.98 on the validation rows
    (val_probs.csv), with the run's chosen threshold marked."""
    grid = np.round(np.arange(0.02, 0.99, 0.02), 2)
    scores = {"micro_f1": [], "samples_f1": []}
    for t in grid:
        m = multilabel_metrics(vp.targets, apply_thresholds(vp.probs, t, cfg.at_least_one))
        for k in scores:
            scores[k].append(m[k])
    fig, axes = new_figure(1, 1, (6.5, 3.6), epochs=False)
    ax = axes[0][0]
    ax.plot(grid, scores["micro_f1"], "-", label="micro-F1")
    ax.plot(grid, scores["samples_f1"], "--", label="samples-F1")
    thr = summary["thresholds"]
    if summary.get("decision") != "expected_f1" and len(set(thr)) == 1:
        ax.axvline(thr[0], color="k", lw=1, ls=":", label=f"chosen threshold {thr[0]:.2f}")
    elif summary.get("decision") == "expected_f1":
        ax.axhline(summary["val"]["samples_f1"], color="k", lw=1, ls=":",
                   label="expected-F1 sets: samples-F1")
    ax.set_xlabel("global decision threshold")
    ax.set_ylabel("F1 on the validation rows")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out)


@dataclass
class GalleryItem:
    image_id: str
    caption: str
    true: list[str]
    predicted: list[str]
    missed: list[str]
    spurious: list[str]
    probs: list[tuple[str, float]]   # the labels involved (true or predicted), most probable first
    thumb: Path | None
    error: float


def error_gallery(vp, thresholds: np.ndarray, cfg, source: Source, assets: Path,
                  rule: str) -> list[GalleryItem]:
    """The validation rows with the largest errors under the run's decision rule: each missed
    label counts 1 - p, each spurious one p."""
    pred = decide(vp.probs, thresholds, at_least_one=cfg.at_least_one, rule=rule)
    y = vp.targets.astype(bool)
    pred = pred.astype(bool)
    error = ((y & ~pred) * (1 - vp.probs) + (pred & ~y) * vp.probs).sum(axis=1)
    captions = {r.image_id: r.caption for r in source.read()}
    missing = [i for i in vp.image_ids if i not in captions]
    if missing:
        raise DataSourceError(f"{len(missing)} of the run's validation images (e.g. "
                              f"{missing[0]}) are not in {source.shown}: give --data the data "
                              f"the run was trained on")
    names = vp.label_names
    items = []
    for i in np.argsort(-error, kind="stable")[:GALLERY_SIZE]:
        if error[i] <= 0:
            break
        involved = sorted(np.flatnonzero(y[i] | pred[i]), key=lambda c: -vp.probs[i, c])
        image_id = vp.image_ids[i]
        items.append(GalleryItem(
            image_id, captions.get(image_id, ""),
            [names[c] for c in np.flatnonzero(y[i])], [names[c] for c in np.flatnonzero(pred[i])],
            [names[c] for c in np.flatnonzero(y[i] & ~pred[i])],
            [names[c] for c in np.flatnonzero(pred[i] & ~y[i])],
            [(names[c], float(vp.probs[i, c])) for c in involved],
            thumbnail(source.images / image_id, assets / f"gallery_{_file_stem(image_id)}.jpg"),
            float(error[i])))
    return items


def _file_stem(image_id: str) -> str:
    """A thumbnail's name for a photo path (a table's may name subfolders: a/1.jpg, b/1.jpg)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(Path(image_id).with_suffix("")))


def copy_into(src: Path, folder: Path) -> Path | None:
    """`src` copied into `folder` (a report links only files beside it), or None if missing."""
    if not src.exists():
        return None
    dst = folder / src.name
    atomic_write(dst, src.read_bytes())
    return dst


def thumbnail(src: Path, dst: Path) -> Path | None:
    """A small JPEG of `src`, or None when it is missing or unreadable (the gallery says so)."""
    try:
        im = load_image(src, min_side=THUMB_PX)
    except ImageReadError:
        return None
    im.thumbnail((THUMB_PX, THUMB_PX))
    atomic_write(dst, lambda f: im.save(f, format="JPEG", quality=80))
    return dst


def data_facts(data_dir: Path | Source) -> dict | None:
    """check-data's counts, label table and caption lengths (images are not decoded here:
    `mmtag check-data` does that)."""
    from mmtag.data.check import check_data

    try:
        rep = check_data(data_dir, limit=0, progress=False, workers=1)
    except (OSError, ValueError):
        return None
    return {"rows": rep["rows"], "labels": rep["labels"], "captions": rep["captions"],
            "images": rep["images"], "ok": rep["ok"], "problems": rep["problems"]}


# -- an ablation -------------------------------------------------------------------------------


def ablation_context(path: Path, out: Path) -> dict:
    abl = load_ablation(path)
    rows = collect(abl)
    if not rows:
        raise RunNotFoundError(f"ablation {path} has no finished run yet")
    return {**results_context(abl, rows, command(abl), diverged(abl)),
            "title": f"mmtag report: ablation {path}", "out": out,
            "written": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "figures": compare([path], out / ASSETS), "rel": lambda p: relative(p, out)}
