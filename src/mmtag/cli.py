"""The `mmtag` command line: a thin shell over importable functions.

Exit codes (the README lists them): 0 done; 1 check-data found problems; 2 a usage error (a
flag, a config value, an output that may not be written); 3 bad input data (a CSV or table, a
label, a photo); 4 a run that is missing, unfinished, in use or damaged; 5 another failure (the
disk, the machine, a diverged training); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import signal
import sys
import threading
from pathlib import Path

from mmtag.process import configure_process, configure_training

log = logging.getLogger("mmtag")

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_DATA, EXIT_RUN, EXIT_FAILED = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


class UsageError(ValueError):
    """The flags given do not make a command (exit 2)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: stop as Ctrl-C does (files are written atomically), exit 143."""


def _q(path: object) -> str:
    return shlex.quote(str(path))


def _next(*commands: str) -> None:
    """The line every command ends with: what to run next."""
    print("next: " + "\n      ".join(commands))


def _columns(args: argparse.Namespace):
    """The table columns the flags name (None: every flag at its default)."""
    from mmtag.data.sources import Columns

    given = {k: getattr(args, f) for k, f in (("image", "image_col"), ("caption", "caption_col"),
                                              ("labels", "labels_col"), ("sep", "label_sep"))
             if getattr(args, f, None) is not None}
    return Columns(**given) if given else None


def _data_source(args: argparse.Namespace, data: str):
    """The Source of --data (a Kaggle folder or a table) with --images and the column flags."""
    import dataclasses

    from mmtag.data.labels import read_label_names
    from mmtag.data.sources import open_data

    source = open_data(data, getattr(args, "images", None), _columns(args))
    if getattr(args, "label_names", None):  # over labels.txt beside the data
        source = dataclasses.replace(source, names=read_label_names(Path(args.label_names)))
    return source


def _rows_source(args: argparse.Namespace, path: str):
    """The Source of --csv (a Kaggle CSV or a table) with --images and the column flags."""
    from mmtag.data.sources import open_rows

    return open_rows(path, args.images, _columns(args))


def _cmd_check_data(args: argparse.Namespace) -> int:
    from mmtag.data.check import check_data, format_report

    data = _data_source(args, args.dir) if Path(args.dir).is_file() else args.dir
    report = check_data(data, workers=args.workers, progress=not args.json and not args.quiet,
                        limit=args.limit, images_dir=None if Path(args.dir).is_file()
                        else args.images)
    print(json.dumps(report) if args.json else format_report(report))
    if not args.json:
        if report["ok"]:
            _next(f"mmtag train --data {_q(args.dir)} --out runs/first --config cpu  "
                  f"(a quick try first: add --set data.limit_train=500 --set optim.epochs=2)")
        else:
            _next(f"fix the problems above, then mmtag check-data {_q(args.dir)} again")
    return EXIT_OK if report["ok"] else EXIT_PROBLEMS


def _cmd_make_demo_data(args: argparse.Namespace) -> int:
    from mmtag.data.demo import make_demo_data, make_table_demo

    if args.style == "table":
        s = make_table_demo(args.dir, n=args.n, seed=args.seed)
        print(json.dumps(s, indent=2, default=str))
        _next(f"mmtag train --data {_q(s['catalogue'])} --image-col path --caption-col title "
              f"--labels-col tags --images {_q(s['images'])} --out runs/catalogue --config cpu")
        return 0
    summary = make_demo_data(args.dir, n=args.n, seed=args.seed)
    print(json.dumps(summary, indent=2, default=str))
    _next(f"mmtag check-data {_q(args.dir)}")
    return 0


def _cmd_setup_wordnet(args: argparse.Namespace) -> int:
    from mmtag.data.text import setup_wordnet

    print(f"WordNet ready in {setup_wordnet(args.target)}")
    _next("mmtag train ... --set data.lemmatizer=wordnet")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mmtag.api import resolve_config, train

    # what the flags mean is checked here; which config a run gets is api.resolve_config's rule
    if args.resume is not None and args.data is None:
        raise UsageError("--resume also needs --data DIR (the folder the run was trained on)")
    if args.data is None or (args.out is None and args.resume is None):
        raise UsageError("train needs --data DIR and --out RUN (or --resume RUN --data DIR)")
    configure_training()
    run = Path(args.resume or args.out)
    # a config mistake is named before the data is read (train resolves it again: cheap)
    resolve_config(run, args.config, args.set or (), resume=args.resume is not None,
                   restart=args.restart)
    source = _data_source(args, args.data)
    summary = train(source, run, args.config, args.set or (), resume=args.resume is not None,
                    restart=args.restart)
    if summary is not None:  # under torchrun, rank 0 speaks for all
        _print_summary(summary, run)
        _next_after_training(run, source)
    return 0


def _next_after_training(run: Path, source) -> None:
    test = source.rows.parent / "test.csv" if source.kaggle else None
    rows = (f"--csv {_q(test)} --images {_q(source.images)}" if test and test.is_file()
            else f"--csv ROWS.csv --images {_q(source.images)}")
    _next(f"mmtag evaluate {_q(run)} {source.flags()}    (its validation rows, in detail)",
          f"mmtag report {_q(run)}    (report.html: curves, per-label figures, errors)",
          f"mmtag predict {_q(run)} {rows} --out predictions.csv")


def _cmd_distill(args: argparse.Namespace) -> int:
    from mmtag.api import distill

    if args.resume is None and (args.teacher is None or args.out is None):
        raise UsageError("distill needs TEACHER --data DIR --out RUN (or --resume RUN --data DIR)")
    configure_training()
    run = Path(args.resume or args.out)
    summary = distill(args.teacher, args.data, run, args.config, args.set or (),
                      unlabeled=args.unlabeled, resume=args.resume is not None,
                      restart=args.restart)
    if summary is not None:
        _print_summary(summary, run)
        print(f"next: mmtag benchmark {run} --csv {Path(args.data) / 'test.csv'} --images "
              f"{Path(args.data) / 'data'} --engine torch,onnx  (after mmtag export {run})")
    return 0


def _print_summary(summary: dict, run: Path) -> None:
    v, z = summary["val"], summary["val_at_0.5"]
    expected_f1 = summary.get("decision") == "expected_f1"
    rule = "expected-F1 label sets" if expected_f1 else "tuned thresholds"
    what = (f"best epoch {summary['best_epoch']}" if "best_epoch" in summary
            else f"ensemble of {len(summary['members'])} runs")
    print(f"{what}: validation ({summary['val_rows']} rows) "
          f"micro-F1 {v['micro_f1']:.4f}, samples-F1 {v['samples_f1']:.4f}, macro-F1 "
          f"{v['macro_f1']:.4f} with {rule} (at 0.5: micro-F1 {z['micro_f1']:.4f}); "
          f"saved model {summary['saved_model_mb']:.1f} MB")
    c = summary.get("val_crossfit")
    if c:
        how = ("each half of the validation rows scored on its own (the rule tunes nothing)"
               if expected_f1 else
               "thresholds tuned on one half of the validation rows, scored on the other")
        print(f"{how}: micro-F1 {c['micro_f1']:.4f}, samples-F1 {c['samples_f1']:.4f}")
    o = summary.get("val_crossfit_other_rule")
    if o and "micro_f1" in o:
        print(f"the same for decision={o['decision']} (not used by this run): micro-F1 "
              f"{o['micro_f1']:.4f}, samples-F1 {o['samples_f1']:.4f}")
    if summary.get("decision_why"):
        print(summary["decision_why"])
    files = ("best.pt, metrics.csv, curves.png, summary.json" if "best_epoch" in summary
             else "best.pt, summary.json, val_probs.csv")
    print(f"run folder: {run}  ({files})")


def _cmd_ensemble(args: argparse.Namespace) -> int:
    from mmtag.inference.ensemble import build_ensemble

    summary = build_ensemble(args.runs, args.out)
    _print_summary(summary, Path(args.out))
    _next(f"mmtag evaluate {_q(args.out)} --data DIR", f"mmtag report {_q(args.out)}")
    return 0


def _predict_options(args: argparse.Namespace):
    """The PredictOptions of evaluate's, predict's or benchmark's flags (those it has)."""
    from mmtag.inference.predictor import PredictOptions

    given = {"engine": "engine", "device": "device", "threshold": "threshold",
             "decision": "decision", "batch_size": "batch_size", "num_workers": "workers",
             "caption_only_missing": "caption_only_missing"}
    return PredictOptions(**{k: getattr(args, flag) for k, flag in given.items()
                             if hasattr(args, flag)})


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from mmtag.evaluation.metrics import format_per_class_table
    from mmtag.inference.predictor import evaluate_run, optimism_note

    if args.data is None and args.csv is None:
        raise UsageError("evaluate needs --data DIR (the run's validation split) or --csv FILE")
    m = evaluate_run(args.run, data_dir=_data_source(args, args.data) if args.data else None,
                     csv_path=_rows_source(args, args.csv) if args.csv else None,
                     options=_predict_options(args))
    if args.json:
        print(json.dumps(m))
        return 0
    print(f"{m['source']}: {m['rows']} rows; decision: {m['decision']}; images at "
          f"{'+'.join(map(str, m['image_sizes']))} px; engine {m['engine']}")
    for k in ("precision", "recall", "micro_f1", "macro_f1", "samples_f1"):
        print(f"  {k:<11} {m[k]:.4f}")
    if note := optimism_note(m):
        print(f"  {note}")
    if m["unfinished"]:
        print(f"  (not the run's final figures: {m['unfinished']})")
    print(format_per_class_table(m))
    _next(f"mmtag report {_q(args.run)}    (curves, the decision rule, the worst errors)",
          f"mmtag predict {_q(args.run)} --csv ROWS --out predictions.csv")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from mmtag.inference.predictor import predict_csv

    res = predict_csv(args.run, _rows_source(args, args.csv), None, args.out,
                      probs_out=args.probs, options=_predict_options(args))
    if res is None:  # under torchrun, rank 0 writes and speaks for all
        return 0
    print(f"wrote {res['rows']} rows to {res['out']} (decision: {res['decision']})"
          + (f" and probabilities to {res['probs']}" if res["probs"] else ""))
    if res["caption_only"]:
        print(f"{len(res['caption_only'])} row(s) predicted from the caption alone, by "
              f"{res['caption_only_via']}:")
        for msg in res["caption_only"]:
            print(f"  {msg}")
    _next(f"mmtag serve {_q(args.run)}    (the model as an HTTP service, with a page)",
          f"mmtag export {_q(args.run)} --int8    (a faster engine: then --engine onnx-int8)")
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from mmtag.inference.benchmark import bench_predict, benchmark, rows_with_images

    rows = rows_with_images(args.csv, args.images, args.n)
    res = benchmark(args.run, rows, engines=args.engines, single=args.single,
                    options=_predict_options(args))
    if args.parts:
        configure_training()  # cuDNN autotuning for the fixed batch shape
        res["parts"] = bench_predict(args.run, rows, batch_size=args.batch_size,
                                     device=args.device)
    if args.json:
        print(json.dumps(res))
        return 0
    m = res["machine"]
    print(f"{res['rows']} samples, batch {res['batch_size']}, on {m['gpu'] or m['cpu']} "
          f"(JPEG decoding and preprocessing included in samples/s)")
    print(f"  {'engine':<10} {'samples/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'load s':>7} "
          f"{'threads':>7}  flip TTA  sizes")
    for e in res["engines"]:
        if "refused" in e:
            print(f"  {e['engine']:<10} refused: {e['refused']}")
            continue
        print(f"  {e['engine']:<10} {e['samples_per_second']:>9.1f} "
              f"{e['single_latency_ms_median']:>8.1f} {e['single_latency_ms_p90']:>8.1f} "
              f"{e['load_seconds']:>7.1f} {e['threads']:>7}  {str(e['tta_flip']):<8}  "
              f"{'+'.join(map(str, e['image_sizes']))}")
    if args.parts:
        from mmtag.training.bench import format_bench

        print(format_bench(res["parts"], "predict"))
    _next(f"mmtag predict {_q(args.run)} --csv {_q(args.csv)} --engine ENGINE    (the fastest)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from mmtag.api import resolve_config
    from mmtag.training.bench import bench_train, format_bench

    configure_training()
    cfg = resolve_config("", args.config, args.set or ())
    res = bench_train(cfg, args.data, steps=args.steps, warmup=args.warmup)
    print(json.dumps(res) if args.json else format_bench(res, "train"))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from mmtag.inference.export import export_run

    out = Path(args.out) if args.out else _run_dir(args.run) / "export"
    meta = export_run(args.run, out, int8=args.int8)
    files = ", ".join(f"{meta['files'][k]} ({meta['files_mb'][k]:.1f} MB)" for k in meta["files"])
    print(f"exported to {out}: {files}, {Path(out) / 'model.json'}; ONNX Runtime agrees with "
          f"PyTorch to {meta['parity_max_abs_diff']['fp32_vs_torch_random_inputs']:.1e}")
    engine = "onnx-int8" if args.int8 else "onnx"
    _next(f"mmtag benchmark {_q(args.run)} --csv ROWS --images DIR --engine torch,{engine}",
          f"mmtag serve {_q(args.run)}    (uses the export)")
    return 0


def _run_dir(run: str) -> Path:
    path = Path(run)
    return path if path.is_dir() else path.parent


def _cmd_serve(args: argparse.Namespace) -> int:
    from mmtag.serving.server import ServeOptions, serve

    budget = {} if args.max_decode_mb is None else {"max_decode_mb": args.max_decode_mb}
    serve(args.path, ServeOptions(**budget, engine=args.engine, host=args.host, port=args.port,
                                  max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                                  max_image_mb=args.max_image_mb,
                                  max_pixels=args.max_pixels, max_caption_chars=args.max_caption,
                                  max_batch_items=args.max_batch_items,
                                  max_queue=args.max_queue,
                                  allow_hosts=tuple(args.allow_host or ()),
                                  api_key=args.api_key), args.label_names, args.no_auth)
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    from mmtag.reporting.ablation import (
        RESULTS_MD,
        load_grid,
        prepare_ablation,
        run_ablation,
        saved_base,
    )

    configure_training()
    # a rerun resumes with the base it began with, whatever this machine's default
    base = args.base or saved_base(args.out) or _default_base()
    abl = prepare_ablation(args.data, base, load_grid(args.grid), args.seeds, args.out)
    rows = run_ablation(abl)
    print(f"{len(rows)} runs; results: {abl.out / RESULTS_MD}")
    _next(f"mmtag report {_q(abl.out)}    (the tables with figures)",
          f"mmtag compare {_q(abl.out)} --out {_q(abl.out / 'figures')}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from mmtag.reporting.compare import compare

    for path in compare(args.paths, args.out):
        print(path)
    _next(f"open the figures in {_q(args.out)}; mmtag report PATH for the tables")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from mmtag.reporting.report import write_report

    md, html = write_report(args.path, data_dir=args.data, out=args.out)
    print(md)
    print(html)
    _next(f"open {_q(html)} in a browser")
    return 0


def _default_base() -> str:
    """The report's recipe where it can run (a CUDA GPU), else its cached variant."""
    import torch

    base = "report" if torch.cuda.is_available() else "report-cached"
    log.info("--base not given: the %s recipe (%s)", base,
             "a CUDA GPU is available" if base == "report" else
             "no CUDA GPU: image encoder frozen and cached")
    return base


def _cmd_demo(args: argparse.Namespace) -> int:
    from mmtag.demo import run_demo

    configure_training()
    run_demo(Path(args.out), n=args.n, seed=args.seed, epochs=args.epochs)
    run = Path(args.out) / "run"
    _next(f"open {_q(Path(args.out) / 'report' / 'report.html')} in a browser",
          f"mmtag serve {_q(run)}    (try the model on a page)",
          "mmtag check-data DIR    (then train on your own data: README, 'Your own data')")
    return 0


def _threshold(text: str) -> float:
    """--threshold: a probability strictly between 0 and 1."""
    from mmtag.evaluation.thresholds import check_threshold

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    try:
        return check_threshold(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_decision_args(c: argparse.ArgumentParser) -> None:
    g = c.add_mutually_exclusive_group()
    g.add_argument("--threshold", type=_threshold,
                   help="one global threshold in (0, 1) instead of the run's rule")
    g.add_argument("--decision", choices=["threshold", "expected_f1"],
                   help="decision rule instead of the run's: its tuned thresholds, or per image "
                        "the label set of highest expected F1 (samples-F1, Kaggle's metric)")


ENGINES = ("torch", "onnx", "onnx-int8", "openvino")


def recipe_names() -> list[str]:
    from mmtag.config import RECIPES_DIR

    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _add_engine_arg(c: argparse.ArgumentParser) -> None:
    c.add_argument("--engine", choices=ENGINES, default="torch",
                   help="torch: the run's best.pt; onnx / onnx-int8 (ONNX Runtime) and openvino "
                        "(OpenVINO, pip install openvino): its export (mmtag export), an export "
                        "folder or a run folder with export/ inside (default torch)")


def _engines(text: str) -> list[str]:
    """benchmark's --engine: one engine or a comma-separated list."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in ENGINES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown engine {', '.join(bad) or text!r}; choose "
                                         f"from {', '.join(ENGINES)} (comma-separated)")
    return names


def _add_rows_args(c: argparse.ArgumentParser, csv_help: str) -> None:
    """A run and the rows it predicts: RUN --csv CSV --images DIR, and a table's columns."""
    c.add_argument("run", help="run folder (or a best.pt file)")
    c.add_argument("--csv", required=True, help=csv_help)
    c.add_argument("--images", help="the photos' folder (default: data/ beside a Kaggle CSV, "
                                    "the table's own folder for a table)")
    _add_column_args(c)


def _add_column_args(c: argparse.ArgumentParser) -> None:
    """A table's column names and label separator (a Kaggle CSV ignores them)."""
    g = c.add_argument_group("table columns (a CSV with a header, .jsonl or .parquet)")
    g.add_argument("--image-col", metavar="NAME",
                   help="the column of photo paths, relative to --images (default image)")
    g.add_argument("--caption-col", metavar="NAME",
                   help="the column of captions or titles (default caption)")
    g.add_argument("--labels-col", metavar="NAME",
                   help="the column of labels (default labels)")
    g.add_argument("--label-sep", metavar="TEXT",
                   help="the text between two labels in one field (default '|')")


DATA_HELP = ("a Kaggle-layout folder (train.csv, data/) or a table: a CSV with a header, "
             ".jsonl or .parquet, one row per photo (see --image-col)")


def _add_bench_parser(sub) -> None:
    c = sub.add_parser("bench", help="images/s of data loading, the model alone and the whole "
                                     "training pipeline; the bound; memory (prediction: mmtag "
                                     "benchmark --parts)")
    bench = c.add_subparsers(dest="what", required=True, metavar="train")
    b = bench.add_parser("train", help="a recipe's training on a Kaggle-layout folder")
    b.add_argument("--data", required=True, help=DATA_HELP)
    b.add_argument("--config", help="YAML config file, or a built-in recipe name: "
                                    + ", ".join(recipe_names()))
    b.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.batch_size=256 (repeatable)")
    b.add_argument("--steps", type=int, default=30, help="timed steps per part (default 30)")
    b.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=_cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmtag",
        description="Train lightweight image + caption multi-label taggers on a Kaggle "
                    "COMP5329-layout folder or a table of photos, captions and labels.",
        epilog="exit codes: 0 done, 1 check-data found problems, 2 usage error, 3 bad input "
               "data, 4 missing, unfinished or damaged run, 5 other failure, 130 interrupted, "
               "143 terminated")
    p.add_argument("--version", action="version", version=f"mmtag {_version()}")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging, and a traceback with every error")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="warnings and errors only: no progress bars or log lines")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("check-data", help="check a Kaggle-layout folder or a table before "
                                          "training: counts, labels, photos")
    c.add_argument("dir", help="a folder with train.csv, data/ and optionally test.csv, or a "
                               "table file")
    c.add_argument("--images", help="the photos' folder (default DIR/data, or the table's "
                                    "folder)")
    _add_column_args(c)
    c.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    c.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    c.add_argument("--limit", type=int, default=None,
                   help="decode only the first N referenced images (quick look; says so)")
    c.set_defaults(func=_cmd_check_data)

    c = sub.add_parser("make-demo-data", help="write the synthetic demo dataset (Kaggle layout, "
                                              "or a product table with --style table)")
    c.add_argument("dir", help="output folder")
    c.add_argument("--n", type=int, default=2000, help="labelled rows (default 2000)")
    c.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    c.add_argument("--style", choices=["kaggle", "table"], default="kaggle",
                   help="kaggle: train.csv, test.csv, data/ (default); table: a product "
                        "catalogue (catalogue.csv path,title,tags with string tags, photos/ in "
                        "subfolders)")
    c.set_defaults(func=_cmd_make_demo_data)

    c = sub.add_parser("setup-wordnet", help="install WordNet for NLTK from Debian's files, offline (for data.lemmatizer=wordnet)")
    c.add_argument("--target", type=Path, default=None,
                   help="NLTK data folder (default $MMTAG_NLTK_DATA or ~/.cache/mmtag/nltk_data)")
    c.set_defaults(func=_cmd_setup_wordnet)

    c = sub.add_parser("train", help="train a tagger on a Kaggle-layout folder or a table")
    c.add_argument("--data", help=DATA_HELP)
    c.add_argument("--images", help="the photos' folder (default: DATA/data for a Kaggle "
                                    "folder, the table's own folder for a table)")
    _add_column_args(c)
    c.add_argument("--label-names", metavar="FILE",
                   help="a file of 'label name' lines (e.g. '1 person'): the run shows the "
                        "names in every output (default: labels.txt beside the data, if any)")
    c.add_argument("--out", help="new run folder")
    c.add_argument("--config", help="YAML config file, or a built-in recipe name: "
                                    + ", ".join(recipe_names()))
    c.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=1e-3, or try the tool on "
                        "a subset first: --set data.limit_train=500 --set optim.epochs=2 "
                        "(repeatable)")
    c.add_argument("--resume", metavar="RUN", help="continue an interrupted run with its "
                                                   "saved settings")
    c.add_argument("--restart", action="store_true",
                   help="--out holds a run that stopped before its first epoch ended (no "
                        "checkpoint to resume): delete its files and start over with the "
                        "settings given now")
    c.set_defaults(func=_cmd_train)

    c = sub.add_parser("distill", help="train a fast student on a teacher run's probabilities")
    c.add_argument("teacher", nargs="?", help="the teacher: a finished run or ensemble folder")
    c.add_argument("--data", required=True, help="the teacher's data: " + DATA_HELP)
    c.add_argument("--out", help="new run folder for the student")
    c.add_argument("--config", default="student",
                   help="the student's recipe: a YAML file or a built-in recipe name (default "
                        "student)")
    c.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set distill.alpha=0.7 (repeatable)")
    c.add_argument("--unlabeled", metavar="CSV",
                   help="rows without labels (e.g. test.csv) whose photos are in DATA/data: "
                        "the student learns the teacher's probabilities on them too")
    c.add_argument("--resume", metavar="RUN", help="continue an interrupted distillation")
    c.add_argument("--restart", action="store_true",
                   help="--out holds a run that stopped before its first epoch ended: delete "
                        "its files and start over")
    c.set_defaults(func=_cmd_distill)

    c = sub.add_parser("evaluate", help="metrics of a run on its validation split or a labelled CSV")
    c.add_argument("run", help="run folder (or a best.pt file)")
    c.add_argument("--data", help="the data the run was trained on (a Kaggle folder or a "
                                  "table): scores its saved validation rows")
    c.add_argument("--csv", help="a labelled Kaggle CSV or table instead: scores every row")
    c.add_argument("--images", help="the photos' folder (default: data/ beside a Kaggle CSV, "
                                    "the table's own folder for a table)")
    _add_column_args(c)
    _add_decision_args(c)
    c.add_argument("--batch-size", type=int, default=64, help="samples per batch (default 64)")
    c.add_argument("--workers", type=int, default=0,
                   help="DataLoader decoding processes (default %(default)s)")
    c.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    _add_engine_arg(c)
    c.set_defaults(func=_cmd_evaluate)

    c = sub.add_parser("predict", help="predict the labels of every row of a CSV or table "
                                       "(the Kaggle submission for a Kaggle CSV)")
    _add_rows_args(c, "a Kaggle CSV with ImageID and Caption (e.g. test.csv), or a table with "
                      "image and caption columns")
    c.add_argument("--out", default="Predicted_labels.csv",
                   help="the predictions (default %(default)s): ImageID,Labels for a Kaggle "
                        "CSV, else the table's image and labels columns")
    c.add_argument("--probs", help="also write every label's probability (one column per label "
                                   "name) to this CSV")
    _add_decision_args(c)
    c.add_argument("--caption-only-missing", action="store_true",
                   help="predict rows whose image is missing/corrupt from the caption alone (listed)")
    c.add_argument("--batch-size", type=int, default=64, help="samples per batch (default 64)")
    c.add_argument("--workers", type=int, default=0,
                   help="DataLoader decoding processes (default %(default)s: decode in the main "
                        "process, the fastest on 2 cores)")
    c.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda")
    _add_engine_arg(c)
    c.set_defaults(func=_cmd_predict)

    c = sub.add_parser("benchmark", help="prediction speed of a run: samples/s and latency")
    _add_rows_args(c, "CSV of rows to predict (e.g. test.csv)")
    c.add_argument("--n", type=int, default=512, help="rows for the batch measurement")
    c.add_argument("--batch-size", type=int, default=64, help="samples per batch (default 64)")
    c.add_argument("--single", type=int, default=30, help="single-sample calls to time")
    c.add_argument("--workers", type=int, default=0,
                   help="DataLoader decoding processes (default %(default)s, as predict)")
    c.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument("--engine", dest="engines", type=_engines, default=["torch"], metavar="ENGINES",
                   help="torch, onnx, onnx-int8, openvino, or several side by side: "
                        "torch,onnx,openvino (all but torch read the run's export/; default "
                        "torch)")
    c.add_argument("--parts", action="store_true",
                   help="also the parts of torch batch prediction in images/s: decoding and "
                        "resizing alone (nvJPEG on a GPU), the model alone, both; the bound")
    c.set_defaults(func=_cmd_benchmark)

    _add_bench_parser(sub)

    c = sub.add_parser("export", help="the run as ONNX files (and int8) that predict without "
                                      "mmtag's PyTorch code; model.json beside them")
    c.add_argument("run", help="run folder (or a best.pt file)")
    c.add_argument("--format", choices=["onnx"], default="onnx", help="only onnx so far")
    c.add_argument("--int8", action="store_true",
                   help="also model-int8.onnx: the matrix products and embedding tables in "
                        "int8 (dynamic quantisation), the convolutions in fp32")
    c.add_argument("--out", help="export folder (default RUN/export, where --engine onnx looks)")
    c.set_defaults(func=_cmd_export)

    c = sub.add_parser("serve", help="an HTTP service that tags images + captions (FastAPI), "
                                     "with a page to try it at /")
    c.add_argument("path", help="a run folder (with export/ for the onnx engines) or an export "
                                "folder")
    c.add_argument("--engine", choices=ENGINES, default=None,
                   help="default: onnx-int8 when the export has it, else onnx, else torch")
    c.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default %(default)s: this machine only; 0.0.0.0 "
                        "opens it to the network, with --api-key or --no-auth)")
    c.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    c.add_argument("--max-batch", type=int, default=16,
                   help="concurrent requests run as one batch of up to this many samples")
    c.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a request waits for others to join its batch")
    c.add_argument("--max-image-mb", type=float, default=10.0, help="largest upload per image")
    c.add_argument("--max-pixels", type=int, default=40_000_000,
                   help="largest decoded image (width x height): bigger ones are refused as "
                        "possible decompression bombs")
    c.add_argument("--max-caption", type=int, default=1000, help="longest caption, characters")
    c.add_argument("--max-queue", type=int, default=256,
                   help="samples that may wait for the model; beyond, requests get 503")
    c.add_argument("--label-names", help="a file of 'label name' lines for the page, over the "
                                         "names the run was trained with (default: labels.txt "
                                         "of the run's data folder, if any)")
    c.add_argument("--max-batch-items", type=int, default=64,
                   help="most samples in one /v1/tag/batch request")
    c.add_argument("--max-decode-mb", type=float, default=None,
                   help="memory one photo's decoding may take (pixels x bytes per pixel): a "
                        "JPEG over it is decoded at a reduced scale, another image refused "
                        "(default 512)")
    c.add_argument("--api-key", help="the key every API request must carry (Authorization: "
                                     "Bearer KEY or X-API-Key: KEY); default $MMTAG_API_KEY. "
                                     "Required when --host is not this machine's")
    c.add_argument("--no-auth", action="store_true",
                   help="serve another --host without a key (anyone who reaches it can use it)")
    c.add_argument("--allow-host", action="append", metavar="NAME",
                   help="a host name the service answers besides 127.0.0.1 and localhost "
                        "(the Host header; repeatable; '*' for any)")
    c.set_defaults(func=_cmd_serve)

    c = sub.add_parser("ensemble", help="average several runs (e.g. seeds of one recipe) into "
                                        "one model, with its own thresholds")
    c.add_argument("runs", nargs="+", help="finished run folders: the same model, preprocessing "
                                           "and validation rows (e.g. --set seed=1, seed=2)")
    c.add_argument("--out", required=True, help="folder for the ensemble (a run folder for "
                                                "evaluate, predict and benchmark)")
    c.set_defaults(func=_cmd_ensemble)

    c = sub.add_parser("ablate", help="train every variant of a grid for several seeds; "
                                      "tables with paired tests (resumable)")
    c.add_argument("--data", required=True, help="a Kaggle-layout folder (train.csv, data/)")
    c.add_argument("--base", help="the recipe the variants modify: a built-in name or a YAML "
                                  "file (default: report on a CUDA GPU, else report-cached)")
    c.add_argument("--grid", default="report",
                   help="a grid YAML file (variants: name -> [key=value, ...]) or a built-in "
                        "grid: report, the COMP5329 report's three ablations (default)")
    c.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per variant (default 3)")
    c.add_argument("--out", required=True,
                   help="ablation folder; run the same command again to resume it")
    c.set_defaults(func=_cmd_ablate)

    c = sub.add_parser("compare", help="figures that overlay runs or ablation variants per "
                                       "epoch, and a bar chart of their final figures")
    c.add_argument("paths", nargs="+", help="run folders and ablation folders")
    c.add_argument("--out", required=True, help="folder for the PNG figures")
    c.set_defaults(func=_cmd_compare)

    c = sub.add_parser("report", help="report.md and a self-contained report.html for a run "
                                      "or an ablation")
    c.add_argument("path", help="a finished run folder or an ablation folder")
    c.add_argument("--data", help="the data folder the run was trained on, for the data summary "
                                  "and the error gallery (default: the one its summary.json names)")
    c.add_argument("--out", help="folder for the report (default: the run or ablation folder)")
    c.set_defaults(func=_cmd_report)

    c = sub.add_parser("demo", help="generate the demo dataset, train, evaluate and predict on it")
    c.add_argument("--out", default="demo_run", help="output folder (default demo_run)")
    c.add_argument("--n", type=int, default=2000, help="labelled demo rows (default 2000)")
    c.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    c.add_argument("--epochs", type=int, default=None, help="override the demo's epochs")
    c.set_defaults(func=_cmd_demo)
    for command in sub.choices.values():  # -q and -v also after the command's name
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                             help="warnings and errors only: no progress bars or log lines")
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="debug logging, and a traceback with every error")
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmtag")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def _resume_hint(args: argparse.Namespace) -> str:
    """What to run after Ctrl-C or SIGTERM, for the commands that resume."""
    if args.command in ("train", "distill") and (args.resume or args.out):
        data = " ".join(_q(a) for a in _data_flags(args))
        return (f"; continue with mmtag {args.command} --resume {_q(args.resume or args.out)} "
                f"{data}")
    if args.command == "ablate":
        return "; run the same command again to resume"
    return ""


def _data_flags(args: argparse.Namespace) -> list[str]:
    """--data and the flags that qualify it, as given."""
    out = ["--data", args.data]
    for flag in ("images", "image_col", "caption_col", "labels_col", "label_sep"):
        if getattr(args, flag, None) is not None:
            out += ["--" + flag.replace("_", "-"), getattr(args, flag)]
    return out


def exit_code(e: BaseException) -> int:
    """The exit code of an error a user can act on (the module docstring lists them)."""
    from mmtag.config import ConfigError
    from mmtag.data.check import DataLayoutError
    from mmtag.data.csv_io import CSVFormatError
    from mmtag.data.images import ImageReadError
    from mmtag.data.labels import UnknownLabelError
    from mmtag.data.sources import DataSourceError
    from mmtag.run_files import RunError

    if isinstance(e, CSVFormatError | DataSourceError | UnknownLabelError | ImageReadError
                  | DataLayoutError):
        return EXIT_DATA
    if isinstance(e, RunError):
        return EXIT_RUN
    # an output that may not be written (a user's file, another run's folder) is a usage error
    if isinstance(e, UsageError | ConfigError | ValueError | FileExistsError):
        return EXIT_USAGE
    return EXIT_FAILED


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    configure_process()  # OpenMP waiting, the allocator, cuDNN autotuning: before torch loads
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("mmtag").setLevel(level)
    # SIGTERM stops as Ctrl-C does (a handler can only be set from the main thread)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        return args.func(args)
    except KeyboardInterrupt as e:
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"mmtag {args.command}: {what}{_resume_hint(args)}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED
    except (ValueError, OSError, RuntimeError) as e:
        # Known failure modes carry messages meant for the user: print them, not a traceback.
        if args.verbose:
            raise
        print(f"mmtag {args.command}: error: {e}", file=sys.stderr)
        return exit_code(e)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
