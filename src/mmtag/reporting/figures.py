"""Matplotlib figures drawn on their own Agg canvas (no pyplot: the process's backend is left
as the caller set it), saved atomically."""

from __future__ import annotations

from pathlib import Path

from mmtag.atomic import atomic_write


def new_figure(rows: int, cols: int, size: tuple[float, float], *, epochs: bool = True):
    """(figure, 2-D array of axes); `epochs`: the x axes count epochs (whole numbers)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat if epochs else ():
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, axes


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    return path


def colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def relative(path: Path | str, start: Path) -> str:
    """`path` as a link from a file in `start`: relative inside it, absolute elsewhere."""
    path, start = Path(path).resolve(), Path(start).resolve()
    return path.relative_to(start).as_posix() if path.is_relative_to(start) else str(path)
