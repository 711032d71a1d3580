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

`--commands ensemble,export,report` aims the kills instead at the commands that write several
files: each is run once under strace to count its renames (every file mmtag writes appears by
a rename), then killed with SIGKILL at each of them (at most --kills a command, spread evenly;
strace's syscall fault injection, `-e inject=...:signal=KILL:when=k`, before that rename
happens), over an earlier complete output. After each kill the output must be the earlier one or a complete
new one (never a part), and the same command run again must succeed, leave no staging folder
behind and give the uninterrupted run's result. Needs strace (Debian's package).

    python tools/fault_inject.py --out /tmp/fo --commands ensemble,export,report --kills 20
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


# -- the commands that write several files: kills aimed at their renames ----------------------

RENAMES = "rename,renameat,renameat2"


def traced(cmd: list[str], trace: Path) -> list[str]:
    """`cmd` under strace, logging its renames (and its threads' and children's) to `trace`."""
    return ["strace", "-f", "-qq", "-o", str(trace), "-e", f"trace={RENAMES}", *cmd]


def killed_at_rename(cmd: list[str], calls: list[str], k: int) -> list[str]:
    """`cmd` under strace, which sends it SIGKILL at its k-th rename (before the rename).
    strace counts each system call apart, so the k-th rename is named as the i-th call of its
    own kind (`calls`: the kinds in order, from `renames`)."""
    kind = calls[k - 1]
    nth = calls[:k].count(kind)
    return ["strace", "-f", "-qq", "-o", os.devnull, "-e", f"trace={RENAMES}", "-e",
            f"inject={kind}:signal=KILL:when={nth}", *cmd]


def renames(cmd: list[str], log: Path) -> list[str]:
    """The rename system calls `cmd`'s main process makes, in order (rename, renameat2...)."""
    trace = log.with_suffix(".strace")
    if run_to_end(traced(cmd, trace), log) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed under strace; see {log}")
    lines = [x.split(None, 1) for x in trace.read_text().splitlines() if "rename" in x]
    main_pid = lines[0][0] if lines else ""
    return [rest.split("(", 1)[0] for pid, rest in lines
            if pid == main_pid and rest.startswith("rename") and "= 0" in rest]


def output_commands(work: Path, data: Path, runs: list[Path]) -> dict:
    """name -> (the command, its output, what to check, what to compare with a reference)."""
    ens, exp, rep = work / "ensemble", work / "export", work / "report"
    return {
        "ensemble": (mmtag("ensemble", *map(str, runs), "--out", str(ens)), ens,
                     check_ensemble, ensemble_result),
        "export": (mmtag("export", str(runs[0]), "--out", str(exp)), exp, check_export,
                   export_result),
        "report": (mmtag("report", str(runs[0]), "--data", str(data), "--out", str(rep)), rep,
                   check_report, report_result),
    }


def check_ensemble(out: Path) -> str:
    """'' when `out` is absent or a complete ensemble; else what is wrong."""
    if not out.exists():
        return ""
    need = {"best.pt", "summary.json", "val_probs.csv", "config.yaml", "split.json"}
    missing = need - {p.name for p in out.iterdir()}
    return f"an ensemble folder without {sorted(missing)}" if missing else ""


def ensemble_result(out: Path) -> dict:
    import torch

    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    return {"thresholds": best["thresholds"], "val_probs.csv": (out / "val_probs.csv").read_bytes()}


def check_export(out: Path) -> str:
    """'' when `out` is absent or an export ONNX Runtime loads; else what is wrong."""
    if not out.exists():
        return ""
    from mmtag.inference.onnx_engine import OnnxPredictor

    try:
        OnnxPredictor.load(out)
    except Exception as e:  # any failure to load is the finding
        return f"an export that does not load: {e}"
    return ""


def export_result(out: Path) -> dict:
    meta = json.loads((out / "model.json").read_text())
    return {k: meta[k] for k in ("labels", "decision", "image", "caption", "checkpoint")}


def check_report(out: Path) -> str:
    """'' when report.md and report.html are absent or a pair from one rendering and every
    file report.md links exists; else what is wrong."""
    import re

    md, html = out / "report.md", out / "report.html"
    if not md.exists() and not html.exists():
        return ""
    if md.exists() != html.exists():
        return "report.md without report.html (or the reverse)"
    stamp = re.compile(r"Written (\d{4}-\d\d-\d\d \d\d:\d\d)")
    a, b = stamp.search(md.read_text()), stamp.search(html.read_text())
    if not a or not b or a.group(1) != b.group(1):
        return "report.md and report.html are from different renderings"
    gone = [x for x in re.findall(r"\]\((report_files/[^)]+)\)", md.read_text())
            if not (out / x).exists()]
    return f"report.md links deleted files: {gone[:3]}" if gone else ""


def report_result(out: Path) -> dict:
    import re

    md = (out / "report.md").read_text()
    return {"links": sorted(re.findall(r"\]\((report_files/[^)]+)\)", md)),
            "body": re.sub(r"Written [^\n]*", "", md)}


def leftovers(out: Path) -> list[str]:
    """Staging folders and temporary files of `out`'s command still there after a clean run."""
    names = [p.name for p in out.parent.glob(f".{out.name}.*")]
    if out.is_dir():
        names += [p.name for p in out.rglob(".*.tmp")]
    return names


def output_trials(args, data: Path) -> int:
    """Kill ensemble, export and report at their renames; see the module docstring."""
    if shutil.which("strace") is None:
        raise SystemExit("--commands needs strace (apt install strace)")
    overrides = ["optim.epochs=1", "data.num_workers=0", "cache.num_workers=0"]
    runs = []
    for seed in (0, 1):
        run = args.out / f"run-{seed}"
        if not (run / "summary.json").exists():
            shutil.rmtree(run, ignore_errors=True)
            cmd = train_command(data, run, args.out / "cache", [*overrides, f"seed={seed}"])
            if run_to_end(cmd, args.out / f"run-{seed}.log") != 0:
                raise SystemExit(f"training {run} failed; see {args.out / f'run-{seed}.log'}")
        runs.append(run)
    results = []
    for name in [c.strip() for c in args.commands.split(",") if c.strip()]:
        results += command_trials(args.out / name, data, runs, name, args.kills)
    ok = sum(r["ok"] for r in results)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{ok}/{len(results)} kills left a whole output (the earlier one or the new one), "
          f"and the rerun succeeded with the uninterrupted result and no leftovers")
    return 0 if ok == len(results) else 1


def command_trials(work: Path, data: Path, runs: list[Path], name: str, trials: int) -> list:
    """Kill `name` at each of its renames (at most `trials` of them, spread evenly)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cmd, out, check, result = output_commands(work, data, runs)[name]
    log = work / "command.log"
    calls = renames(cmd, log)  # into an empty place
    reference = result(out)
    if name == "ensemble":
        shutil.rmtree(out)  # an ensemble is made into a new folder; the others over an old one
    else:
        calls = renames(cmd, log)
    n = len(calls)
    m = min(trials, n)
    picks = sorted({round(1 + i * (n - 1) / max(1, m - 1)) for i in range(m)})
    out_rows = []
    for k in picks:
        code = run_to_end(killed_at_rename(cmd, calls, k), log)
        after_kill = check(out)
        # an ensemble folder that is there is complete (checked above): a rerun would refuse it
        done = name == "ensemble" and out.exists()
        rerun = 0 if done else run_to_end(cmd, log)
        after_rerun = check(out) or ("" if result(out) == reference else "a result other than "
                                     "the uninterrupted run's")
        left = leftovers(out)
        ok = code != 0 and not after_kill and rerun == 0 and not after_rerun and not left
        out_rows.append({"command": name, "kill at rename": f"{k}/{n}", "exit": code,
                         "after the kill": after_kill or "whole", "rerun exit": rerun,
                         "after the rerun": after_rerun or "as uninterrupted",
                         "leftovers": left, "ok": ok})
        print(f"{name:<8} kill at rename {k:>2}/{n}: after the kill {after_kill or 'whole'}; "
              f"rerun {'ok' if rerun == 0 and not after_rerun else after_rerun or rerun}; "
              f"leftovers {left or 'none'}", flush=True)
        if name == "ensemble":
            shutil.rmtree(out, ignore_errors=True)  # the next trial starts from no ensemble
    return out_rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="work folder (created)")
    p.add_argument("--kills", type=int, default=20, help="trials (default 20)")
    p.add_argument("--n", type=int, default=300, help="demo rows (default 300)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--commands", help="kill these commands at their renames instead of train: "
                                      "ensemble,export,report (any of them)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    overrides = [f"optim.epochs={args.epochs}", "data.num_workers=0", "cache.num_workers=0"]
    data = make_data(args.out, args.n)
    if args.commands:
        return output_trials(args, data)

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
