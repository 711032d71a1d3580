"""`mmtag demo`: the whole job on the built-in synthetic dataset, in a few CPU minutes."""

from __future__ import annotations

from pathlib import Path

from mmtag.atomic import atomic_write
from mmtag.config import load_config, recipe_path
from mmtag.data.csv_io import read_csv
from mmtag.data.demo import DEMO_DATA_MARKER, demo_data_complete, make_demo_data
from mmtag.run_files import LOCK_FILE, is_run_file
from mmtag.training.run_folder import run_lock

_OWNED = ".mmtag-demo-run"  # in --out: this folder was made by `mmtag demo`


def claim_demo_folder(out: Path) -> None:
    """Create `out` for the demo, or accept one an earlier demo made; refuse anything else
    before touching it."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"demo --out {out} is a file; choose a new folder for --out")
    earlier_demo = (out / _OWNED).exists() or (out / "data" / DEMO_DATA_MARKER).exists()
    if out.is_dir() and any(out.iterdir()) and not earlier_demo:
        raise FileExistsError(f"demo --out {out} is not empty and was not made by mmtag demo; "
                              f"nothing in it was touched: choose a new or empty folder for --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / _OWNED, "made by mmtag demo: it may replace run/ and Predicted_labels.csv\n")


def clear_demo_run(run_dir: Path) -> None:
    """Empty an earlier demo's run folder: only the files a run writes, only when nothing else
    is in it (a file of the user's there stops the demo before anything is deleted), and only
    while no other process trains there (its lock)."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise FileExistsError(f"{run_dir} is a file, not a demo run: move it away or choose a "
                              f"new --out")
    foreign = sorted(p.name for p in run_dir.iterdir() if not is_run_file(p))
    if foreign:
        raise FileExistsError(f"{run_dir} holds {', '.join(foreign[:3])}, which mmtag demo did "
                              f"not write; nothing was deleted: move it elsewhere, or choose a "
                              f"new --out")
    with run_lock(run_dir):
        for p in run_dir.iterdir():
            if p.name != LOCK_FILE:  # the lock stays with the folder (fit accepts it)
                p.unlink()


def run_demo(out: Path, n: int = 2000, seed: int = 0, epochs: int | None = None,
             progress: bool | None = None) -> dict:
    """Generate data (once), train the demo recipe, evaluate, predict the test rows and score
    the predictions against the demo's hidden test labels. Returns the figures."""
    from mmtag.evaluation.metrics import multilabel_metrics
    from mmtag.inference.predictor import evaluate_run, optimism_note, predict_csv
    from mmtag.reporting.report import write_report
    from mmtag.training.loop import fit

    data_dir, run_dir = out / "data", out / "run"
    claim_demo_folder(out)
    clear_demo_run(run_dir)  # the demo always trains afresh; refused before anything is made
    if not demo_data_complete(data_dir):
        make_demo_data(data_dir, n=n, seed=seed)
        print(f"demo dataset written to {data_dir}")
    overrides = [f"seed={seed}"] + ([f"optim.epochs={epochs}"] if epochs else [])
    cfg = load_config(recipe_path("demo"), overrides)
    summary = fit(cfg, data_dir, run_dir, progress=progress)
    val = evaluate_run(run_dir, data_dir=data_dir)
    sub = out / "Predicted_labels.csv"
    predict_csv(run_dir, data_dir / "test.csv", data_dir / "data", sub)
    truth = {r.image_id: r.labels for r in read_csv(data_dir / "test_labels.csv")}
    pred = {r.image_id: r.labels for r in read_csv(sub)}
    labels = sorted({lab for labs in truth.values() for lab in labs})
    ids = list(truth)

    def onehot(sets):
        return [[int(lab in s) for lab in labels] for s in sets]

    import numpy as np

    test = multilabel_metrics(np.array(onehot(truth[i] for i in ids)),
                              np.array(onehot(pred[i] for i in ids)))
    note = optimism_note(val)
    print(f"\nvalidation ({val['rows']} rows): micro-F1 {val['micro_f1']:.4f}, "
          f"samples-F1 {val['samples_f1']:.4f}" + (f" {note}" if note else ""))
    print(f"demo test set ({len(ids)} rows, labels hidden from training): micro-F1 "
          f"{test['micro_f1']:.4f}, samples-F1 {test['samples_f1']:.4f}")
    _, html = write_report(run_dir, data_dir=data_dir, out=out / "report")
    print(f"\ndata:        {data_dir}\nrun:         {run_dir}  (best.pt, metrics.csv, curves.png, "
          f"summary.json)\nsubmission:  {sub}\nreport:      {html}  (and report.md beside it)")
    return {"summary": summary, "val": val, "test": test, "report": html}
