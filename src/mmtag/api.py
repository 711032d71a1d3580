"""The Python API: train from a config, load a run, predict on (image, caption) pairs.

    import mmtag
    summary = mmtag.train("path/to/comp5329", "runs/a", config="cpu", overrides=["optim.epochs=5"])
    tagger = mmtag.load_run("runs/a")
    tagger.predict([("photo.jpg", "A man riding a horse")])   # -> [("1", "19")]
    mmtag.distill("runs/a", "path/to/comp5329", "runs/student")   # a faster model, taught by it

A table or a pandas DataFrame (columns image, caption, labels with "|" between labels) works
wherever a Kaggle folder does:

    mmtag.train(df, "runs/b", images="photos/")      # or "catalogue.csv", ".jsonl", ".parquet"
    tagger = mmtag.load_run("runs/b")
    tagger.predict(df, images="photos/")             # -> [("dress", "red"), ...]
    tagger.predict_proba(df, images="photos/")       # a DataFrame, one column per label
    tagger.evaluate(df, images="photos/")            # micro-F1, per-label figures, ...
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mmtag.config import TrainConfig, apply_overrides, load_config, recipe_path
from mmtag.data.sources import Source, frame_source, is_frame, open_data
from mmtag.run_files import CONFIG_FILE, RunNotFoundError

if TYPE_CHECKING:
    from pandas import DataFrame


def train(data: Path | str | Source | DataFrame, out: Path | str,
          config: TrainConfig | str | Path | None = None,
          overrides: list[str] | tuple[str, ...] = (), *, images: Path | str | None = None,
          resume: bool = False, restart: bool = False, progress: bool | None = None) -> dict:
    """Train into the run folder `out`; returns the summary dict. `data` is a Kaggle-layout
    folder, a table file (CSV with a header, .jsonl, .parquet), a pandas DataFrame with the
    columns image, caption, labels, or a `Source` (other column names); `images` the folder
    the table's image paths are relative to.
    `config` is a TrainConfig, a YAML path or a built-in recipe name ('cpu', 'report', ...);
    `resume` continues an interrupted run, `restart` starts over one that stopped before its
    first epoch ended.

    Process-wide speed settings are not made behind your back: call
    `mmtag.configure_training()` first, as `mmtag train` does (the allocator setting makes a
    cpu-recipe step about 30 % faster; cuDNN autotuning helps on GPUs).

    8 parameters on purpose: the public API names what `mmtag train`'s flags name, as
    keywords a user passes one by one, not an options object to build first."""
    from mmtag.training.loop import fit

    return fit(resolve_config(out, config, overrides, resume=resume, restart=restart),
               as_source(data, images), out, resume=resume, restart=restart, progress=progress)


def as_source(data: Path | str | Source | DataFrame, images: Path | str | None = None) -> Source:
    """The `Source` of what a user passed as data: a folder or table path, a DataFrame (its rows
    are read now; photos relative to `images`, default the working folder), or a Source."""
    if isinstance(data, Source):
        return data
    if isinstance(data, str | Path):
        return open_data(data, images)
    if is_frame(data):
        return frame_source(data, images)
    raise TypeError(f"data must be a folder, a table file, a pandas DataFrame or a Source, not "
                    f"{type(data).__name__}")


def distill(teacher: Path | str, data_dir: Path | str | Source, out: Path | str,
            config: TrainConfig | str | Path | None = "student",
            overrides: list[str] | tuple[str, ...] = (), *, unlabeled: Path | str | None = None,
            resume: bool = False, restart: bool = False, progress: bool | None = None) -> dict:
    """Train a student into `out` on the teacher's probabilities as well as the labels
    (`mmtag.training.distill`); `teacher` is a finished run or ensemble folder, `unlabeled` a CSV
    of rows without labels whose photos are in `data_dir`/data (e.g. its test.csv). The student
    validates on the teacher's validation rows (its split), so no row the teacher learned
    from scores the student. Returns the summary dict, as `train` does.

    9 parameters on purpose: `mmtag distill`'s flags as keywords, like `train`'s."""
    from mmtag.training.distill import load_teacher
    from mmtag.training.loop import fit

    if resume:
        cfg = resolve_config(out, None, (), resume=True)
    else:
        t = load_teacher(teacher)
        d = t.config.data
        same_split = [f"data.train_prop={d.train_prop}", f"data.split_seed={d.split_seed}",
                      f"data.val_block={d.val_block}", f"distill.teacher={Path(teacher).resolve()}"]
        if unlabeled is not None:
            same_split.append(f"distill.unlabeled={Path(unlabeled).resolve()}")
        cfg = resolve_config(out, config, [*overrides, *same_split], restart=restart)
    return fit(cfg, as_source(data_dir), out, resume=resume, restart=restart, progress=progress)


def resolve_config(out: Path | str, config: TrainConfig | str | Path | None = None,
                   overrides: list[str] | tuple[str, ...] = (), *, resume: bool = False,
                   restart: bool = False) -> TrainConfig:
    """The config a training into `out` runs with: the run's saved config.yaml on a resume
    (which nothing may change), else `config` (a TrainConfig, a YAML path, a built-in recipe
    name, or None for the defaults) with `overrides` applied. The one owner of these rules:
    the CLI calls it through `train`."""
    if resume and restart:
        raise ValueError("--resume continues a run, --restart starts one over: choose one")
    if resume:
        if config is not None or overrides:
            raise ValueError("--resume continues the run with its saved config.yaml, which "
                             "cannot change: drop --config/--set (config and overrides), or "
                             "start a new run for them")
        saved = Path(out) / CONFIG_FILE
        if not saved.exists():
            raise RunNotFoundError(f"cannot resume {out}: it holds no run (no config.yaml); "
                                    f"start one there with mmtag train --out {out}")
        return load_config(saved)
    if isinstance(config, TrainConfig):
        return TrainConfig.from_dict(apply_overrides(config.to_dict(), overrides))
    return load_config(recipe_path(config) if config else None, overrides)


def load_run(run: Path | str, device: str = "auto", engine: str = "torch"):
    """A predictor for a run folder or a best.pt file (`mmtag.inference.torch_engine.Predictor`);
    `engine` 'onnx' or 'onnx-int8' reads the run's export (`mmtag export`) instead."""
    from mmtag.inference.predictor import load_predictor

    return load_predictor(run, engine, device)
