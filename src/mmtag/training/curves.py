"""A run's learning curves (curves.png), drawn from its `metrics.csv` (never from logs)."""

from __future__ import annotations

from pathlib import Path

from mmtag.atomic import atomic_write
from mmtag.run_files import read_metrics_rows


def read_metrics(path: Path | str) -> dict[str, list[float]]:
    """metrics.csv as columns of floats."""
    rows = read_metrics_rows(Path(path))
    if not rows:
        raise ValueError(f"{path} has no epochs")
    return {k: [float(r[k]) for r in rows] for k in rows[0]}


def plot_curves(metrics_csv: Path | str, out_png: Path | str) -> Path:
    """Loss, micro-F1, samples-F1 and precision/recall per epoch, train vs validation."""
    # a Figure with its own Agg canvas: no pyplot, so the process's matplotlib backend is left
    # as the caller set it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = read_metrics(metrics_csv)
    ep = m["epoch"]
    fig = Figure(figsize=(16, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4)
    panels = [("loss", "loss"), ("micro_f1", "micro-F1 (threshold 0.5, no TTA)"),
              ("samples_f1", "samples-F1 (Kaggle; threshold 0.5, no TTA)")]
    for ax, (key, title) in zip(axes, panels, strict=False):
        ax.plot(ep, m[f"train_{key}"], "o-", label="train")
        ax.plot(ep, m[f"val_{key}"], "o-", label="validation")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes[3]
    for split in ("train", "val"):
        ax.plot(ep, m[f"{split}_precision"], "o-", label=f"{split} precision")
        ax.plot(ep, m[f"{split}_recall"], "s--", label=f"{split} recall")
    ax.set_title("precision / recall (threshold 0.5)")
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(out_png, lambda f: fig.savefig(f, format="png", dpi=100))
    return Path(out_png)
