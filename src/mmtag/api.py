"""The Python API: train from a config, load a run, predict on (image, caption) pairs.

    import mmtag
    summary = mmtag.train("path/to/comp5329", "runs/a", config="cpu", overrides=["optim.epochs=5"])
    tagger = mmtag.load_run("runs/a")
    tagger.predict([("photo.jpg", "A man riding a horse")])   # -> [(1, 19)]
"""

from __future__ import annotations

from pathlib import Path

from mmtag.config import TrainConfig, apply_overrides, load_config, recipe_path


def train(data_dir: Path | str, out: Path | str, config: TrainConfig | str | Path | None = None,
          overrides: list[str] | tuple[str, ...] = (), *, resume: bool = False,
          restart: bool = False, progress: bool | None = None) -> dict:
    """Train on a Kaggle-layout folder into the run folder `out`; returns the summary dict.
    `config` is a TrainConfig, a YAML path or a built-in recipe name ('cpu', 'report', ...);
    `resume` continues an interrupted run, `restart` starts over one that stopped before its
    first epoch ended."""
    from mmtag.training.loop import fit

    if resume:
        if config is not None or overrides:
            raise ValueError("resume=True continues the run with its saved config: config and "
                             "overrides cannot change it (start a new run for that)")
        saved = Path(out) / "config.yaml"
        if not saved.exists():
            raise FileNotFoundError(f"cannot resume {out}: it holds no run (no config.yaml); "
                                    f"start one there with mmtag train --out {out}")
        cfg = load_config(saved)
    elif isinstance(config, TrainConfig):
        cfg = TrainConfig.from_dict(apply_overrides(config.to_dict(), overrides))
    else:
        cfg = load_config(recipe_path(config) if config else None, overrides)
    return fit(cfg, data_dir, out, resume=resume, restart=restart, progress=progress)


def load_run(run: Path | str, device: str = "auto", tta_sizes: list[int] | None = None):
    """A `mmtag.inference.predictor.Predictor` for a run folder or a best.pt file; `tta_sizes`
    replaces the run's extra sizes of multi-scale TTA ([]: one size, the fastest)."""
    from mmtag.inference.predictor import Predictor

    return Predictor.load(run, device, tta_sizes)
