"""The COMP5329 rows as a product-style table with string tags: how an engineer's own data
looks (`path,title,tags`, tags by COCO class name, '|' between them).

    python tools/comp5329_table.py --data ../shared/data/comp5329 --out /tmp/coco --n 3000

writes OUT/catalogue.csv (the first N rows), OUT/holdout.csv (the next N // 6, labelled) and
OUT/new.csv (the same rows without tags); the photos stay in DATA/data (pass it as --images).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from mmtag.data.csv_io import read_csv

COCO_NAMES = {1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus",
              7: "train", 8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant",
              13: "stop sign", 14: "parking meter", 15: "bench", 16: "bird", 17: "cat",
              18: "dog", 19: "horse"}


def write(path: Path, rows, tags: bool) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "title", "tags"] if tags else ["path", "title"])
        for r in rows:
            named = "|".join(COCO_NAMES[lab] for lab in r.labels)
            w.writerow([r.image_id, r.caption, named] if tags else [r.image_id, r.caption])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, type=Path, help="the COMP5329 folder")
    p.add_argument("--out", required=True, type=Path, help="folder for the three tables")
    p.add_argument("--n", type=int, default=3000, help="catalogue rows (default 3000)")
    args = p.parse_args()
    rows = read_csv(args.data / "train.csv")
    held = rows[args.n: args.n + args.n // 6]
    args.out.mkdir(parents=True, exist_ok=True)
    write(args.out / "catalogue.csv", rows[: args.n], tags=True)
    write(args.out / "holdout.csv", held, tags=True)
    write(args.out / "new.csv", held, tags=False)
    print(f"wrote {args.out}/catalogue.csv ({args.n} rows), holdout.csv and new.csv "
          f"({len(held)} rows); photos: {args.data / 'data'}")


if __name__ == "__main__":
    main()
