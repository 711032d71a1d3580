"""`mmtag compare`: overlay the per-epoch curves of runs or ablation variants (a band over
seeds), the baseline against each variant (the COMP5329 report's Figures 4.5-4.7), and a bar
chart of the final figures with error bars."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmtag.outputs import check_output, check_output_folder
from mmtag.reporting.ablation import SPEC_FILE, load_ablation, run_row, run_state
from mmtag.reporting.figures import colors, new_figure, save_figure
from mmtag.reporting.tables import METRICS
from mmtag.run_files import METRICS_FILE, SUMMARY_FILE, RunNotFoundError, read_metrics_rows

# metrics.csv columns drawn per epoch, after train_ / val_
CURVES = [("loss", "loss"), ("precision", "precision"), ("recall", "recall"),
          ("micro_f1", "micro-F1"), ("samples_f1", "samples-F1")]
# the bar chart's figures: the ablation tables' F1 figures, labels broken for the x axis
FINALS = [(m.column, m.label.replace(" (", "\n(").replace(", ", ",\n"))
          for m in METRICS if m.scale == 100]


@dataclass
class Group:
    """Runs drawn as one line: an ablation variant's seeds, or a single run."""

    name: str
    runs: list[Path]
    baseline: bool = False


def groups_of(paths: list[Path | str]) -> tuple[list[Group], list[tuple[Group, Group]]]:
    """The groups to draw, and the (baseline, variant) pairs of each ablation among them."""
    groups, pairs = [], []
    prefix = len(paths) > 1
    for path in map(Path, paths):
        if (path / SPEC_FILE).exists():
            abl = load_ablation(path)
            mine = []
            for variant in abl.grid.variants:
                runs = [abl.run_dir(variant, s) for s in abl.seeds]
                runs = [r for r in runs if run_state(r) == "done"]
                if runs:
                    name = f"{path.name}/{variant}" if prefix else variant
                    mine.append(Group(name, runs, variant == abl.grid.baseline))
            if not mine:
                raise RunNotFoundError(f"ablation {path} has no finished run yet")
            base = next((g for g in mine if g.baseline), None)
            pairs += [(base, g) for g in mine if base is not None and g is not base]
            groups += mine
        elif (path / METRICS_FILE).exists():
            groups.append(Group(path.name, [path]))
        else:
            raise RunNotFoundError(f"{path} is neither a run folder (metrics.csv) nor an "
                                    f"ablation folder ({SPEC_FILE})")
    return groups, pairs


def epoch_band(runs: list[Path], column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(epochs, mean, sd) of a metrics.csv column over runs, epoch by epoch (runs that
    stopped early count only for their epochs)."""
    per_epoch: dict[int, list[float]] = {}
    for run in runs:
        for row in read_metrics_rows(run / METRICS_FILE):
            per_epoch.setdefault(int(row["epoch"]), []).append(float(row[column]))
    epochs = np.array(sorted(per_epoch))
    values = [np.array(per_epoch[e]) for e in epochs]
    return (epochs, np.array([v.mean() for v in values]),
            np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in values]))


def _draw_band(ax, group: Group, column: str, color) -> None:
    ep, mean, sd = epoch_band(group.runs, column)
    n = len(group.runs)
    ax.plot(ep, mean, "o-", ms=3, color=color,
            label=f"{group.name} ({n} seeds)" if n > 1 else group.name)
    if n > 1:
        ax.fill_between(ep, mean - sd, mean + sd, color=color, alpha=0.2, lw=0)


def plot_curves(groups: list[Group], out: Path) -> Path:
    """Train (top) and validation (bottom) loss, precision, recall, micro- and samples-F1 per
    epoch (at threshold 0.5, as metrics.csv has them); each group's mean with a ±1 sd band."""
    fig, axes = new_figure(2, len(CURVES), (4 * len(CURVES), 7))
    palette = colors(len(groups))
    for r, split in enumerate(("train", "val")):
        for c, (key, title) in enumerate(CURVES):
            ax = axes[r][c]
            for g, color in zip(groups, palette, strict=True):
                _draw_band(ax, g, f"{split}_{key}", color)
            ax.set_title(f"{'training' if split == 'train' else 'validation'} {title}")
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, out)


def plot_pair(base: Group, variant: Group, out: Path) -> Path:
    """The baseline against one variant: training and validation loss, validation micro-F1
    and samples-F1 per epoch (the report's Figures 4.5-4.7 are of this kind)."""
    panels = [("train_loss", "training loss"), ("val_loss", "validation loss"),
              ("val_micro_f1", "validation micro-F1 (at 0.5)"),
              ("val_samples_f1", "validation samples-F1 (at 0.5)")]
    fig, axes = new_figure(1, len(panels), (4 * len(panels), 3.4))
    for ax, (column, title) in zip(axes[0], panels, strict=True):
        for g, color in zip((base, variant), colors(2), strict=True):
            _draw_band(ax, g, column, color)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{base.name} against {variant.name}")
    return save_figure(fig, out)


def final_figures(group: Group) -> list[list[float]]:
    """Per FINALS entry, the group's finished runs' values (points)."""
    rows = [run_row(r) for r in group.runs if (r / SUMMARY_FILE).exists()]
    return [[100 * row[column] for row in rows if row.get(column) is not None]
            for column, _ in FINALS]


def plot_finals(groups: list[Group], out: Path) -> Path | None:
    """Bars of the final figures per group: the mean over seeds, error bars ±1 sd, and each
    seed as a dot."""
    values = [final_figures(g) for g in groups]
    if not any(v for vals in values for v in vals):
        return None
    fig, axes = new_figure(1, 1, (max(6.0, 1.6 * len(groups) * len(FINALS) / 2), 4),
                           epochs=False)
    ax = axes[0][0]
    width = 0.8 / len(groups)
    lows = []
    for i, (g, vals, color) in enumerate(zip(groups, values, colors(len(groups)), strict=True)):
        x = np.arange(len(FINALS)) + (i - (len(groups) - 1) / 2) * width
        means = [np.mean(v) if v else np.nan for v in vals]
        sds = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in vals]
        ax.bar(x, means, width, yerr=sds, capsize=3, color=color, alpha=0.8, label=g.name)
        for xi, v in zip(x, vals, strict=True):
            ax.plot([xi] * len(v), v, "k.", ms=3)
        lows += [m - s for m, s in zip(means, sds, strict=True) if not np.isnan(m)]
    ax.set_xticks(np.arange(len(FINALS)), [label for _, label in FINALS], fontsize=8)
    ax.set_ylabel("points (validation rows)")
    # bars that all sit near the top would hide their differences: start the axis below them
    ax.set_ylim(max(0.0, min(lows) - 3), None)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return save_figure(fig, out)


def compare(paths: list[Path | str], out: Path | str) -> list[Path]:
    """Draw every comparison figure of `paths` (runs and ablation folders) into `out`."""
    out = Path(out)
    check_output_folder(out, "--out")
    groups, pairs = groups_of(paths)
    names = {"curves": out / "curves.png", "final": out / "final.png"} | {
        (b.name, v.name): out / f"{_slug(b.name)}_vs_{_slug(v.name)}.png" for b, v in pairs}
    for path in names.values():  # never a run's own curves.png, a link's target checked too
        check_output(path, "--out")
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_curves(groups, names["curves"])]
    for base, variant in pairs:
        written.append(plot_pair(base, variant, names[(base.name, variant.name)]))
    finals = plot_finals(groups, names["final"])
    return written + ([finals] if finals else [])


def _slug(name: str) -> str:
    return name.replace("/", "-")
