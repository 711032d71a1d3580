"""Markdown tables of what tools/gpu_bundle/speed.sh measured, for docs/performance.md.

    python tools/gpu_bundle/speed_table.py OUT   # OUT: the folder speed.sh wrote

One row per `mmtag bench` measurement (bench.jsonl) and one per training (NAME.tgz: its
summary.json and metrics.csv).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import tarfile
from pathlib import Path


def _or_dash(value) -> str:
    return "-" if value is None else str(value)


def bench_rows(path: Path) -> list[str]:
    out = ["| measurement | GPU | px | batch | pipeline | data alone | model alone | whole | "
           "whole / model | bound by | first step s | host syncs | peak MB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for line in path.read_text().splitlines():
        r = json.loads(line)
        ips = r["images_per_second"]
        out.append(
            f"| {r['label']} | {r['machine'].get('gpu') or r['device']} | {r['image_size']} | "
            f"{r['batch_size']} | {r['pipeline']}{' compiled' if r.get('compile') else ''} | "
            f"{ips['data']:,.0f} | {ips['step']:,.0f} | {ips['whole']:,.0f} | "
            f"{r['whole_over_step']:.0%} | {r['bound_by']} | {_or_dash(r.get('first_step_seconds'))} | "
            f"{_or_dash(r.get('host_syncs'))} | {r['peak_memory_mb']:,.0f} |")
    return out


def training_rows(folder: Path) -> list[str]:
    out = ["| training | train / val rows | epochs | micro-F1 | samples-F1 | training images/s "
           "(epochs incl. validation) | wall s | first step s |", "|---|---|---|---|---|---|---|---|"]
    for tgz in sorted(folder.glob("*.tgz")):
        name = tgz.stem
        with tarfile.open(tgz) as tar:
            names = tar.getnames()
            if f"{name}/summary.json" not in names:
                out.append(f"| {name} | (did not finish) | | | | | | |")
                continue
            s = json.load(tar.extractfile(f"{name}/summary.json"))
            rows = list(csv.DictReader(io.TextIOWrapper(tar.extractfile(f"{name}/metrics.csv"))))
        seconds = sum(float(r["seconds"]) for r in rows)
        rate = s["train_rows"] * len(rows) / seconds if seconds else 0
        out.append(f"| {name} | {s['train_rows']} / {s['val_rows']} | {len(rows)} | "
                   f"{s['val']['micro_f1']:.4f} | {s['val']['samples_f1']:.4f} | {rate:,.0f} | "
                   f"{s['wall_seconds']:.0f} | {s.get('first_step_seconds')} |")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the folder speed.sh wrote ($OUT)")
    a = p.parse_args(argv)
    print("\n".join([*bench_rows(a.out / "bench.jsonl"), "", *training_rows(a.out)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
