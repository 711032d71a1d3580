"""`mmtag ablate`: every variant of a grid, for each seed, on one data split; resumable.

An ablation folder holds `ablation.yaml` (what was asked: base config, variants, seeds, data),
one run folder per variant and seed (`runs/<variant>/seed<k>/`), and the tables
`results.csv` (one row per run) and `results.md` (per variant: mean and standard deviation over
seeds; per variant and metric: the paired difference to the baseline with a paired t-test).

Run the same command again after an interruption: finished runs (those with a summary.json)
are read, not rerun; a run that was cut short continues from its last.pt (`train --resume`).
"""

from __future__ import annotations

import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from mmtag.api import resolve_config, train
from mmtag.atomic import atomic_write, read_json
from mmtag.config import ConfigError, TrainConfig, builtin_or_file, load_config
from mmtag.data.csv_io import train_csv_path
from mmtag.evaluation.estimate import METRIC_COLUMNS
from mmtag.reporting.tables import ablation_markdown, rows_csv
from mmtag.run_files import (
    CONFIG_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    RunNotFoundError,
    read_metrics_rows,
)
from mmtag.training.engine import TrainingDivergedError

log = logging.getLogger("mmtag.ablate")

GRIDS_DIR = Path(__file__).parent / "grids"
SPEC_FILE = "ablation.yaml"
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
RUNS_DIR = "runs"
DIVERGED = "diverged.txt"  # in a run folder: its loss became NaN; the rerun does not retry it
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")

# the summary.json sections whose figures become results.csv columns, and their figures
SECTIONS = ("val", "val_at_0.5", "val_crossfit", "val_crossfit_other_rule")
FIGURES = METRIC_COLUMNS[1:]  # precision, recall, micro-, macro-, samples-F1


@dataclass
class Grid:
    """Named variants, each a list of `--set` overrides (the grid's `common` ones first)."""

    name: str       # as given: a built-in grid's name or a file's path
    baseline: str
    variants: dict[str, list[str]]


@dataclass
class Ablation:
    out: Path
    data_dir: Path
    base: str                # the recipe name or YAML path, as given
    base_config: TrainConfig
    grid: Grid
    seeds: list[int]

    def run_dir(self, variant: str, seed: int) -> Path:
        return self.out / RUNS_DIR / variant / f"seed{seed}"

    def variant_config(self, variant: str, seed: int) -> TrainConfig:
        return resolve_config(self.out, self.base_config,
                              [*self.grid.variants[variant], f"seed={seed}"])


def grid_path(name_or_path: str | Path) -> Path:
    """A grid YAML file, or the name of a built-in grid ('report')."""
    return builtin_or_file(name_or_path, GRIDS_DIR, "grid", "grid")


def load_grid(name_or_path: str | Path) -> Grid:
    """Read and check a grid file: `variants` maps names to lists of key=value overrides,
    `common` (optional) is applied to every variant first, `baseline` (optional, default the
    first variant) names the variant the others are compared with."""
    path = grid_path(name_or_path)
    if not path.exists():
        raise ConfigError(f"grid file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"grid file {path}: not valid YAML ({e})") from None
    return grid_from_dict(raw, str(name_or_path), str(path))


def grid_from_dict(raw: dict, name: str, where: str) -> Grid:
    if not isinstance(raw, dict) or not isinstance(raw.get("variants"), dict) or not raw["variants"]:
        raise ConfigError(f"{where}: a grid needs `variants:`, a mapping of variant names to "
                          f"lists of overrides (e.g. focal: [loss.name=focal])")
    unknown = set(raw) - {"baseline", "common", "variants"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; a grid has baseline, "
                          f"common and variants")
    common = _overrides(raw.get("common") or [], f"{where}: common")
    variants = {}
    for vname, sets in raw["variants"].items():
        vname = str(vname)
        if not _NAME.match(vname):
            raise ConfigError(f"{where}: variant name {vname!r} must be letters, digits and "
                              f"_ . + - (it names a folder)")
        variants[vname] = [*common, *_overrides(sets or [], f"{where}: variant {vname}")]
    baseline = str(raw.get("baseline", next(iter(variants))))
    if baseline not in variants:
        raise ConfigError(f"{where}: baseline {baseline!r} is not one of the variants "
                          f"{list(variants)}")
    return Grid(name, baseline, variants)


def _overrides(sets, where: str) -> list[str]:
    if not isinstance(sets, list) or not all(isinstance(s, str) and "=" in s for s in sets):
        raise ConfigError(f"{where} must be a list of key=value overrides, got {sets!r}")
    return [s.strip() for s in sets]


def prepare_ablation(data_dir: Path | str, base: str, grid: Grid, n_seeds: int,
                     out: Path | str) -> Ablation:
    """Check the data folder and every variant's config, then start `out` or check that it
    holds this same ablation (a rerun resumes it; more seeds extend it). Seeds are
    0 .. n_seeds-1."""
    out, data_dir = Path(out), Path(data_dir)
    if n_seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {n_seeds}")
    train_csv_path(data_dir)  # a mistyped --data is refused before anything is saved
    abl = Ablation(out, data_dir.resolve(), str(base), resolve_config(out, base), grid,
                   list(range(n_seeds)))
    check_variants(abl)
    spec = _spec(abl)
    saved = out / SPEC_FILE
    if saved.exists():
        abl.seeds = _same_ablation(yaml.safe_load(saved.read_text(encoding="utf-8")), spec, out)
        spec["seeds"] = abl.seeds
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty and holds no ablation ({SPEC_FILE}); "
                              f"choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(saved, yaml.safe_dump(spec, sort_keys=False))
    return abl


# the config fields that choose the validation rows: a paired comparison needs them equal
SPLIT_FIELDS = ("train_prop", "split_seed", "val_block", "limit_val")


def check_variants(abl: Ablation) -> None:
    """Every variant's config is valid and validates on the baseline's rows."""
    configs = {}
    for variant in abl.grid.variants:
        try:
            configs[variant] = abl.variant_config(variant, abl.seeds[0])
        except ConfigError as e:
            raise ConfigError(f"grid {abl.grid.name}, variant {variant}: {e}") from None
    base = configs[abl.grid.baseline].data
    for variant, cfg in configs.items():
        changed = [f"data.{f}" for f in SPLIT_FIELDS if getattr(cfg.data, f) != getattr(base, f)]
        if changed:
            raise ConfigError(f"grid {abl.grid.name}, variant {variant} changes "
                              f"{', '.join(changed)}: its validation rows would differ from "
                              f"the baseline's, and runs are compared on the same rows")


def _spec(abl: Ablation) -> dict:
    return {"data": str(abl.data_dir), "base": abl.base, "grid": abl.grid.name,
            "baseline": abl.grid.baseline, "variants": abl.grid.variants, "seeds": abl.seeds,
            "base_config": abl.base_config.to_dict()}


def _same_ablation(saved: dict, spec: dict, out: Path) -> list[int]:
    """The seeds of the resumed ablation (a rerun may add seeds); anything else that differs
    would mix two experiments. The saved base config is read as today's code reads it, so a
    field added to mmtag since does not block the resume."""
    saved = {**saved, "base_config": TrainConfig.from_dict(saved["base_config"]).to_dict()}
    for key, what in (("data", "data folder"), ("base_config", "base config"),
                      ("variants", "variants"), ("baseline", "baseline")):
        if saved.get(key) != spec[key]:
            raise ValueError(f"{out} holds an ablation with another {what} ({SPEC_FILE}); "
                             f"rerun it with its own arguments to resume it, or choose "
                             f"another --out")
    return list(range(max(len(saved.get("seeds", [])), len(spec["seeds"]))))


def saved_base(out: Path | str) -> str | None:
    """The base recipe an existing ablation folder was started with (a rerun resumes with it)."""
    path = Path(out) / SPEC_FILE
    return yaml.safe_load(path.read_text(encoding="utf-8")).get("base") if path.is_file() else None


def run_state(run_dir: Path) -> str:
    """'done' (summary.json written), 'diverged', 'resume' (a run began here), or 'new'."""
    if (run_dir / SUMMARY_FILE).exists():
        return "done"
    if (run_dir / DIVERGED).exists():
        return "diverged"
    if (run_dir / CONFIG_FILE).exists():
        return "resume"  # from last.pt, or started over when it never reached a checkpoint
    return "new"


def run_ablation(abl: Ablation, *, progress: bool | None = None) -> list[dict]:
    """Train every (variant, seed) run not finished yet, in seed-major order (so that the
    first seed of every variant is done first); results.csv and results.md are rewritten
    after each run. Returns results.csv's rows."""
    plan = [(v, s) for s in abl.seeds for v in abl.grid.variants]
    done = sum(run_state(abl.run_dir(v, s)) == "done" for v, s in plan)
    log.info("ablation %s: %d variants x %d seeds = %d runs; %d already finished",
             abl.out, len(abl.grid.variants), len(abl.seeds), len(plan), done)
    for i, (variant, seed) in enumerate(plan, 1):
        run_dir = abl.run_dir(variant, seed)
        state = run_state(run_dir)
        if (run_dir / CONFIG_FILE).exists():
            check_run_config(abl, variant, seed)
        if state in ("done", "diverged"):
            continue
        log.info("run %d/%d: %s, seed %d (%s)", i, len(plan), variant, seed,
                 "resuming" if state == "resume" else "new")
        train_one(abl, variant, seed, state, progress)
        write_results(abl)
    return write_results(abl)


def check_run_config(abl: Ablation, variant: str, seed: int) -> None:
    """A run folder of the ablation holds the run of its own variant and seed, nothing else."""
    run_dir = abl.run_dir(variant, seed)
    if load_config(run_dir / CONFIG_FILE).to_dict() != abl.variant_config(variant, seed).to_dict():
        raise ValueError(f"{run_dir} holds a run with another config than variant {variant}, "
                         f"seed {seed}: move it away (the ablation trains it afresh)")


def train_one(abl: Ablation, variant: str, seed: int, state: str, progress: bool | None) -> None:
    """Train (or resume) one run. A run whose loss diverges is a result of the grid, not a
    failure of the ablation: it is marked, listed in results.md, and the others go on."""
    run_dir = abl.run_dir(variant, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        # a new run may find the files of one killed before it saved its config: restart
        train(abl.data_dir, run_dir, None if state == "resume" else abl.variant_config(variant, seed),
              resume=state == "resume", restart=state == "new", progress=progress)
    except TrainingDivergedError as e:
        log.error("%s, seed %d diverged: %s", variant, seed, e)
        atomic_write(run_dir / DIVERGED, f"{e}\n")


def run_row(run_dir: Path) -> dict:
    """One results.csv row from a finished run folder: every final figure of summary.json,
    the best epoch's validation loss, the training time and the model size."""
    s = read_json(run_dir / SUMMARY_FILE)
    row: dict = {"best_epoch": s["best_epoch"], "decision": s.get("decision", "threshold")}
    for section in SECTIONS:
        for fig in FIGURES:
            if fig in s.get(section, {}):
                row[f"{section}.{fig}"] = s[section][fig]
    row.update(best_rule_figures(s))
    epochs = read_metrics_rows(run_dir / METRICS_FILE)
    best = next((r for r in epochs if int(r["epoch"]) == s["best_epoch"]), None)
    row["val_loss"] = float(best["val_loss"]) if best else None
    row["epochs"] = len(epochs)
    # the epochs' own time (training + validation), the same whether or not a run resumed
    row["train_seconds"] = round(sum(float(r["seconds"]) for r in epochs), 1)
    row["saved_model_mb"] = s.get("saved_model_mb")
    row["model_mb"] = s.get("model_mb")
    return row


def diverged(abl: Ablation) -> list[tuple[str, int, str]]:
    """(variant, seed, message) of the runs whose loss diverged."""
    return [(v, s, (abl.run_dir(v, s) / DIVERGED).read_text().strip())
            for v in abl.grid.variants for s in abl.seeds
            if run_state(abl.run_dir(v, s)) == "diverged"]


def best_rule_figures(summary: dict) -> dict:
    """Each figure under the rule that is best for it, cross-fit, whichever rule the run
    decides with: micro-F1 from the threshold rule, samples-F1 from expected-F1 label sets
    (summary.json holds both rules' cross-fit figures)."""
    by_rule = {summary.get("decision", "threshold"): summary.get("val_crossfit") or {}}
    other = summary.get("val_crossfit_other_rule") or {}
    if other:
        by_rule[other.get("decision")] = other
    return {"crossfit.threshold.micro_f1": by_rule.get("threshold", {}).get("micro_f1"),
            "crossfit.expected_f1.samples_f1": by_rule.get("expected_f1", {}).get("samples_f1")}


def collect(abl: Ablation) -> list[dict]:
    """results.csv's rows: one per finished run, in grid order then seed order."""
    rows = []
    for variant in abl.grid.variants:
        for seed in abl.seeds:
            run_dir = abl.run_dir(variant, seed)
            if run_state(run_dir) == "done":
                rows.append({"variant": variant, "seed": seed,
                             "run": str(run_dir.relative_to(abl.out)), **run_row(run_dir)})
    return rows


def write_results(abl: Ablation) -> list[dict]:
    rows = collect(abl)
    if rows:
        atomic_write(abl.out / RESULTS_CSV, rows_csv(rows))
        atomic_write(abl.out / RESULTS_MD,
                     ablation_markdown(abl, rows, command(abl), diverged(abl)))
    return rows


def command(abl: Ablation) -> str:
    """The command line that makes (or resumes) this ablation."""
    return (f"mmtag ablate --data {shlex.quote(str(abl.data_dir))} --base {shlex.quote(abl.base)} "
            f"--grid {shlex.quote(abl.grid.name)} --seeds {len(abl.seeds)} "
            f"--out {shlex.quote(str(abl.out))}")


def load_ablation(out: Path | str) -> Ablation:
    """An ablation folder as `prepare_ablation` left it (for compare and report)."""
    out = Path(out)
    spec_path = out / SPEC_FILE
    if not spec_path.exists():
        raise RunNotFoundError(f"{out} is not an ablation folder (no {SPEC_FILE})")
    spec = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    grid = Grid(spec["grid"], spec["baseline"], spec["variants"])
    return Ablation(out, Path(spec["data"]), spec["base"],
                    TrainConfig.from_dict(spec["base_config"]), grid, list(spec["seeds"]))
