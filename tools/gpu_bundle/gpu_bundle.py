"""A compact bundle for running recipes on a GPU machine that has PyTorch, torchvision and
transformers but none of mmtag's offline weight packages, and that takes only a few tens of MiB
of files along (this project's lent GPU machines: 64 MiB per call, no network).

    python tools/gpu_bundle/gpu_bundle.py --data ../shared/data/comp5329 --out .gpu \
        --recipes gpu,cpu,report --rows 4000 --max-side 320 --quality 80

writes into OUT (git-ignored; never commit it):

- ``data/train.csv`` + ``data/data/*.jpg``: the first ROWS rows of train.csv as mmtag reads them
  (written back as standard CSV; ``data/test.csv`` holds the same rows without labels, for the
  benchmarks) and their images, scaled down so that the longer side is at
  most ``--max-side`` px;
- ``minilm/``: all-MiniLM-L6-v2 in fp16 with its vocabulary cut to the word pieces these
  captions use (the tokenizer splits every one of them into the same pieces; checked here);
- ``glove/``: GloVe's rows for these captions' words (for a recipe with the GloVe BiLSTM);
- ``weights/efficientnet_liteN.pth``: the recipes' image backbones' ImageNet weights in fp16;
- ``site/``: the small code packages that build the backbones (and lemminflect, for GloVe);
- ``run.sh``: the command for the GPU machine (train, then benchmark; results under $OUT);
- ``compare.sh``: one device call that trains the gpu and the cpu recipe on these rows, two seeds
  each while its time lasts (docs/experiments.md);
- ``speed.sh``: one device call that makes every speed measurement of docs/performance.md's GPU
  section and trains the gpu and report recipes (tools/gpu_bundle/speed.sh says how).

``data/`` and the rest each fit one call's carry (``--budget-mib``); when both together do not
(bundle.json's ``device_calls`` is 2), a first call carries the models and a second, made
while the machine is still warm, carries ``data/`` and runs the script.

The bundle is for those checks only: a model trained with the cut vocabulary needs ``minilm/``
beside it (MMTAG_MINILM_DIR) to be loaded again.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from PIL import Image

from mmtag.data.csv_io import read_csv
from mmtag.data.images import to_rgb, upright

SCRIPTS = Path(__file__).parent  # run.sh and compare.sh, copied into each bundle


def folder_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


def _write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def write_subset(data: Path, out: Path, rows: int, max_side: int, quality: int) -> list[str]:
    """The first `rows` rows of data/train.csv and their images (scaled down) into out/;
    returns their captions."""
    records = read_csv(data / "train.csv")[:rows]
    (out / "data").mkdir(parents=True, exist_ok=True)
    _write_csv(out / "train.csv", ["ImageID", "Labels", "Caption"],
               ([r.image_id, " ".join(map(str, r.labels)), r.caption] for r in records))
    _write_csv(out / "test.csv", ["ImageID", "Caption"],  # for the benchmark
               ([r.image_id, r.caption] for r in records))
    for r in records:
        src = data / "data" / r.image_id
        with Image.open(src) as im:
            im = to_rgb(upright(im))
            im.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
            im.save(out / "data" / r.image_id, "JPEG", quality=quality)
    return [r.caption for r in records]


def write_trimmed_minilm(captions: list[str], out: Path) -> int:
    """all-MiniLM-L6-v2 with only the word pieces `captions` use, in fp16; returns the vocabulary
    size. Raises RuntimeError if the cut tokenizer would split any caption differently."""
    from transformers import AutoModel, AutoTokenizer, BertTokenizerFast

    from mmtag.data.tokenizers import MINILM_NAME, quiet_transformers, resolve_minilm_source

    src = resolve_minilm_source(MINILM_NAME)
    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(src, local_files_only=Path(src).is_dir())
    original = tok(captions)["input_ids"]
    used = {i for ids in original for i in ids}
    keep = sorted(used | set(tok.all_special_ids))  # ascending: [PAD] (0) stays first
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("".join(t + "\n" for t in tok.convert_ids_to_tokens(keep)),
                                   encoding="utf-8")
    pieces = {t: i for i, t in enumerate(tok.convert_ids_to_tokens(keep))}
    try:  # transformers >= 5 takes the vocabulary itself, 4.x a vocab.txt path
        small = BertTokenizerFast(vocab=pieces, do_lower_case=True,
                                  model_max_length=tok.model_max_length)
    except TypeError:
        small = BertTokenizerFast(vocab_file=str(out / "vocab.txt"), do_lower_case=True,
                                  model_max_length=tok.model_max_length)
    small.save_pretrained(out)
    new_to_old = torch.tensor(keep)
    for caption, ids in zip(captions, original, strict=True):
        again = new_to_old[small(caption)["input_ids"]].tolist()
        if again != ids:
            raise RuntimeError(f"the cut vocabulary splits {caption!r} differently: {again} "
                               f"instead of {ids}")
    with quiet_transformers():
        model = AutoModel.from_pretrained(src, add_pooling_layer=False,
                                          local_files_only=Path(src).is_dir())
    weight = model.get_input_embeddings().weight.data[new_to_old].clone()
    model.resize_token_embeddings(len(keep))
    model.get_input_embeddings().weight.data.copy_(weight)
    model.config.vocab_size = len(keep)
    with quiet_transformers():
        model.half().save_pretrained(out)
    return len(keep)


def recipe_needs(recipes: list[str]) -> dict:
    """What the recipes' models need on a machine without mmtag's offline packages: Lite
    weights, MiniLM, GloVe, lemminflect."""
    from mmtag.config import load_config, recipe_path
    from mmtag.models.image_encoders import LITE_ENCODERS

    needs = {"image_encoders": [], "minilm": False, "glove": False, "lemminflect": False}
    for name in recipes:
        cfg = load_config(recipe_path(name))
        enc = cfg.model.image_encoder
        if enc not in (*LITE_ENCODERS, "none"):
            raise ValueError(f"recipe {name} uses {enc}: only {list(LITE_ENCODERS)} can be bundled "
                             f"(torchvision backbones download their weights on the GPU machine)")
        if enc != "none" and enc not in needs["image_encoders"]:
            needs["image_encoders"].append(enc)
        glove = cfg.model.text_encoder == "glove_lstm"
        needs["minilm"] |= cfg.model.text_encoder == "minilm"
        needs["glove"] |= glove
        needs["lemminflect"] |= glove and cfg.data.lemmatizer == "lemminflect"
    return needs


def write_trimmed_glove(captions: list[str], out: Path, lemmatizers: list[str]) -> int:
    """GloVe's rows for the words of `captions` (as each lemmatizer reads them), as words.txt +
    emb.npy for $MMTAG_GLOVE_DIR; returns the number of words."""
    import numpy as np

    from mmtag.data.text import caption_tokens, load_glove

    words = {w for c in captions for lem in lemmatizers
             for w in caption_tokens(c, stopwords=False, lemmatizer=lem)}
    index, table = load_glove()
    keep = sorted(w for w in words if w in index)
    out.mkdir(parents=True)
    (out / "words.txt").write_text("\n".join(keep), encoding="utf-8")
    np.save(out / "emb.npy", np.asarray(table[[index[w] for w in keep]], dtype=np.float32))
    return len(keep)


def _copy_package(name: str, site: Path) -> None:
    package = Path(importlib.import_module(name).__file__).parent
    shutil.copytree(package, site / package.name, ignore=shutil.ignore_patterns("__pycache__"))


def write_bundle(data: Path, out: Path, *, rows: int = 1600, max_side: int = 448,
                 quality: int = 85, recipes: tuple[str, ...] = ("gpu", "cpu"),
                 config: str = "gpu", budget_mib: float = 60.0) -> dict:
    """Write the bundle (see the module docstring) for `recipes`; returns what it holds. The
    data/ folder and the rest (models) each travel in one device call: raises ValueError when
    either is larger than `budget_mib` (then use fewer rows, a smaller --max-side or
    --quality, or fewer recipes)."""
    from mmtag.models.image_encoders import lite_weights_path

    needs = recipe_needs(list(dict.fromkeys([config, *recipes])))
    for var in ("MMTAG_MINILM_DIR", "MMTAG_LITE_WEIGHTS_DIR", "MMTAG_GLOVE_DIR"):
        if os.environ.get(var):
            raise ValueError(f"{var} is set ({os.environ[var]}): a bundle is cut from the installed "
                             f"weight packages, not from another copy; unset it first")
    data, out = Path(data), Path(out)
    if out.exists():
        if any(out.iterdir()) and not (out / "bundle.json").is_file():
            raise ValueError(f"{out} exists and is not a bundle (no bundle.json): choose a new or "
                             f"empty folder for --out, it is replaced")
        shutil.rmtree(out)
    captions = write_subset(data, out / "data", rows, max_side, quality)
    info = {"rows": len(captions), "max_side": max_side, "quality": quality,
            "recipes": list(dict.fromkeys([config, *recipes])), "config": config,
            "image_encoders": needs["image_encoders"]}
    if needs["minilm"]:
        info["minilm_vocab"] = write_trimmed_minilm(captions, out / "minilm")
    if needs["glove"]:
        lemmatizers = ["none", "lemminflect"] if needs["lemminflect"] else ["none"]
        info["glove_words"] = write_trimmed_glove(captions, out / "glove", lemmatizers)
    (out / "weights").mkdir()
    for enc in needs["image_encoders"]:
        state = torch.load(lite_weights_path(enc), map_location="cpu", weights_only=True)
        torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()},
                   out / "weights" / f"{enc}.pth")
    _copy_package("efficientnet_lite_pytorch", out / "site")
    if needs["lemminflect"]:
        _copy_package("lemminflect", out / "site")
    for script in SCRIPTS.glob("*.sh"):
        shutil.copy(script, out / script.name)
    (out / "recipe.txt").write_text(config)
    return _sized(out, info, budget_mib)


def _sized(out: Path, info: dict, budget_mib: float) -> dict:
    """bundle.json with the MiB of each folder and of the two carries (data/, the rest)."""
    info["mib"] = {p.name: round(folder_mib(p), 1) for p in sorted(out.iterdir()) if p.is_dir()}
    info["mib"]["total"] = round(folder_mib(out), 1)
    carries = {"data": info["mib"]["data"],
               "models": round(info["mib"]["total"] - info["mib"]["data"], 1)}
    info["device_calls"] = 1 if info["mib"]["total"] <= budget_mib else 2
    (out / "bundle.json").write_text(json.dumps(info, indent=2))
    for name, mib in carries.items():
        if mib > budget_mib:
            raise ValueError(f"the bundle's {name} in {out} is {mib} MiB, over --budget-mib "
                             f"{budget_mib:g}: use fewer --rows, a smaller --max-side or "
                             f"--quality, or fewer --recipes")
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/gpu_bundle/gpu_bundle.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="Kaggle-layout folder (train.csv, data/)")
    p.add_argument("--out", required=True, type=Path, help="bundle folder (replaced; git-ignore it)")
    p.add_argument("--rows", type=int, default=1600, help="first rows of train.csv to take")
    p.add_argument("--max-side", type=int, default=448, help="longest image side kept, px")
    p.add_argument("--quality", type=int, default=85, help="JPEG quality of the scaled images")
    p.add_argument("--recipes", default="gpu,cpu",
                   help="the recipes whose models the bundle must build (default gpu,cpu; "
                        "speed.sh also trains report)")
    p.add_argument("--config", default="gpu", help="recipe run.sh trains")
    p.add_argument("--budget-mib", type=float, default=60.0)
    a = p.parse_args(argv)
    info = write_bundle(a.data, a.out, rows=a.rows, max_side=a.max_side, quality=a.quality,
                        recipes=tuple(a.recipes.split(",")), config=a.config,
                        budget_mib=a.budget_mib)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
