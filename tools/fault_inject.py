"""Fault injection: SIGKILL `mmtag train` at many moments of a cached-feature run and resume it.

Each trial starts the same run (the demo recipe on generated demo data, its own empty feature
cache so the caching phase is part of it), kills it with SIGKILL at one moment, resumes it the
way a user would (`mmtag train --resume RUN --data DATA`), and checks that it ends
byte-identical to an uninterrupted reference run: val_probs.csv, metrics.csv (but its timings),
summary.json's figures and best.pt's thresholds.

Moments: most are drawn at random over the reference run's duration; a few are aimed at phases
a random time rarely hits: while the feature cache fills, while last.pt or best.pt is being
written, while the last epoch's checkpoint is written, and in the final evaluation (after it).

    python tools/fault_inject.py --out /tmp/fi --kills 20           # about 15 min on 2 cores
    python tools/fault_inject.py --out /tmp/fi --kills 4 --n 120    # a quick look

It prints one line per trial and a table, writes results.json, and exits 1 if any trial
differs. Not part of `make test` (tests/test_faults.py runs one kill there).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

# summary.json keys that describe the process, not the result
PROCESS_KEYS = {"wall_seconds", "first_step_seconds", "machine"}
TARGETS = ("caching", "last.pt write", "best.pt write", "the last checkpoint",
           "final evaluation")


def mmtag(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmtag", *args]


def train_command(data: Path, run: Path, cache: Path, overrides: list[str]) -> list[str]:
    sets = [x for o in [*overrides, f"cache.dir={cache}"] for x in ("--set", o)]
    return mmtag("train", "--data", str(data), "--config", "demo", "--out", str(run), *sets)


def run_to_end(cmd: list[str], log: Path) -> int:
    with log.open("ab") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode


def _hit(target: str, run: Path, cache: Path, epochs: int, log: Path) -> bool:
    """Whether the moment `target` has come, from what the run has written so far."""
    if target == "caching":
        return cache.exists() and any(cache.rglob("*.npy"))
    if target in ("last.pt write", "best.pt write"):
        stem = target.split()[0]
        return run.exists() and any(p.name.startswith(f".{stem}.") for p in run.iterdir())
    if target == "final evaluation":  # logged once the last epoch's last.pt is written
        return f"epoch {epochs}/{epochs} " in log.read_text(errors="replace")
    metrics = run / "metrics.csv"  # "the last checkpoint": the last epoch's row is in
    return metrics.exists() and len(metrics.read_text().splitlines()) == epochs + 1


def kill_at(cmd: list[str], log: Path, *, seconds: float | None = None,
            target: str | None = None, run: Path | None = None, cache: Path | None = None,
            epochs: int = 0, limit: float = 600.0) -> bool:
    """Start `cmd`, SIGKILL it after `seconds` or when `target` is hit; False when it ended
    on its own first."""
    with log.open("ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        t0 = time.time()
        while proc.poll() is None and time.time() - t0 < limit:
            due = (time.time() - t0 >= seconds if seconds is not None
                   else _hit(target, run, cache, epochs, log))
            if due:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.002 if target else 0.01)
        proc.wait()
        return False


def last_log_line(log: Path) -> str:
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    return lines[-1][:110] if lines else "(nothing logged yet)"


def resume(data: Path, run: Path, cmd: list[str], log: Path) -> str:
    """Continue the killed run as a user would; returns how."""
    if run_to_end(mmtag("train", "--resume", str(run), "--data", str(data)), log) == 0:
        return "--resume"
    # killed before its config was saved: nothing to resume; the error says to start again
    if run_to_end([*cmd, "--restart"], log) == 0:
        return "--restart"
    raise RuntimeError(f"neither --resume nor --restart finished the run; see {log}")


def fingerprint(run: Path) -> dict:
    """What must be identical between two runs of the same config."""
    import torch

    summary = json.loads((run / "summary.json").read_text())
    with (run / "metrics.csv").open(newline="") as f:
        metrics = [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]
    best = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    return {"val_probs.csv": (run / "val_probs.csv").read_bytes(),
            "metrics.csv": metrics,
            "summary.json": {k: v for k, v in summary.items() if k not in PROCESS_KEYS},
            "best.pt thresholds": best["thresholds"], "best.pt epoch": best["epoch"]}


def differences(a: dict, b: dict) -> list[str]:
    return [k for k in a if a[k] != b[k]]


def make_data(out: Path, n: int) -> Path:
    data = out / "data"
    if not (data / "test_labels.csv").exists():  # written last
        subprocess.run(mmtag("make-demo-data", str(data), "--n", str(n)), check=True,
                       stdout=subprocess.DEVNULL)
    return data


def reference_run(out: Path, data: Path, overrides: list[str]) -> tuple[Path, float]:
    """The uninterrupted run (made once, with its own empty cache) and how long it took."""
    ref, timing = out / "reference", out / "reference-seconds.txt"
    if not timing.exists():
        shutil.rmtree(ref, ignore_errors=True)
        shutil.rmtree(out / "reference-cache", ignore_errors=True)
        t0 = time.time()
        if run_to_end(train_command(data, ref, out / "reference-cache", overrides),
                      out / "reference.log") != 0:
            raise SystemExit(f"the reference run failed; see {out / 'reference.log'}")
        timing.write_text(f"{time.time() - t0:.1f}\n")
    return ref, float(timing.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="work folder (created)")
    p.add_argument("--kills", type=int, default=20, help="trials (default 20)")
    p.add_argument("--n", type=int, default=300, help="demo rows (default 300)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    overrides = [f"optim.epochs={args.epochs}", "data.num_workers=0", "cache.num_workers=0"]
    data = make_data(args.out, args.n)

    ref, duration = reference_run(args.out, data, overrides)
    expected = fingerprint(ref)

    rng = random.Random(args.seed)
    aimed = list(TARGETS[: min(len(TARGETS), args.kills // 4)])  # 20 kills: all 5 aimed
    plan = [("aimed", t) for t in aimed] + [
        ("random", round(rng.uniform(0.5, duration), 2)) for _ in range(args.kills - len(aimed))]
    results = []
    for i, (kind, when) in enumerate(plan):
        trial = args.out / f"trial-{i:02d}"
        shutil.rmtree(trial, ignore_errors=True)
        trial.mkdir()
        run, cache, log = trial / "run", trial / "cache", trial / "train.log"
        cmd = train_command(data, run, cache, overrides)
        killed = kill_at(cmd, log, seconds=when if kind == "random" else None,
                         target=when if kind == "aimed" else None, run=run, cache=cache,
                         epochs=args.epochs)
        phase = last_log_line(log) if killed else "(finished before the kill)"
        how = resume(data, run, cmd, log) if killed else "-"
        diff = differences(expected, fingerprint(run))
        results.append({"trial": i, "kill": f"{kind} {when}", "killed": killed,
                        "last log line before the kill": phase, "resumed with": how,
                        "identical": not diff, "differs in": diff})
        print(f"trial {i:2d}: kill at {kind} {when!s:>22}: {diff or 'identical'}"
              f" (resumed with {how}; {phase})", flush=True)
        shutil.rmtree(cache, ignore_errors=True)

    ok = sum(r["identical"] for r in results)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{ok}/{len(results)} trials ended byte-identical to the uninterrupted run "
          f"(reference: {duration:.0f} s; {args.n} demo rows, {args.epochs} epochs)")
    return 0 if ok == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
