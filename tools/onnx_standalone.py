"""Tag one photo with an exported model using nothing of mmtag: only numpy, Pillow,
onnxruntime and Hugging Face `tokenizers`, reading model.json for everything besides the graph.
It shows what a program in any language has to do with an export (docs/deploy.md).

    python tools/onnx_standalone.py runs/cpu/export photo.jpg "A man riding a bike" [--int8]

Prints the chosen labels and every label's probability as JSON. Exports with a MiniLM caption
encoder or none; the GloVe tokenizer (lemmas, stop words) is mmtag's own and not redone here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps


def image_input(path: Path, spec: dict) -> np.ndarray:
    """(1, 3, S, S) float32: upright (EXIF orientation applied, as viewers show a phone photo),
    RGB, resized to S x S bilinearly, scaled and normalised."""
    size = spec["size"]
    img = ImageOps.exif_transpose(Image.open(path)).convert("RGB").resize((size, size),
                                                                          Image.BILINEAR)
    a = np.asarray(img, dtype=np.float32) / 255.0
    a = (a - np.array(spec["mean"], np.float32)) / np.array(spec["std"], np.float32)
    return a.transpose(2, 0, 1)[None]


def caption_input(folder: Path, caption: str, spec: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """(ids (1, T) int64, lengths (1,) int64): [CLS] word pieces [SEP], cut to T, zero-padded."""
    if spec is None or spec["kind"] == "none":
        return np.zeros((1, 1), np.int64), np.ones(1, np.int64)
    if spec["kind"] != "minilm":
        sys.exit(f"this example reads MiniLM exports; this one's tokenizer is {spec['kind']!r} "
                 f"(use mmtag predict --engine onnx)")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / spec["source"] / "tokenizer.json"))
    tok.enable_truncation(spec["max_len"])
    tok.no_padding()
    ids = tok.encode(caption).ids
    out = np.zeros((1, spec["max_len"]), np.int64)
    out[0, : len(ids)] = ids
    return out, np.array([len(ids)], np.int64)


def count_distribution(p: np.ndarray) -> np.ndarray:
    """P(exactly a of these independent labels are present), a = 0..len(p)."""
    dist = np.zeros(len(p) + 1)
    dist[0] = 1.0
    for q in p:
        dist[1:] = dist[1:] * (1 - q) + dist[:-1] * q
        dist[0] *= 1 - q
    return dist


def expected_f1_set(p: np.ndarray, at_least_one: bool) -> np.ndarray:
    """The k most probable labels, k chosen for the highest expected F1 (smallest k on ties)."""
    order = np.argsort(-p, kind="stable")
    ps = p[order]
    best, best_k = -1.0, 0
    for k in range(1 if at_least_one else 0, len(p) + 1):
        inside, outside = count_distribution(ps[:k]), count_distribution(ps[k:])
        a = np.arange(k + 1)[:, None]
        b = np.arange(len(p) - k + 1)[None, :]
        den = k + a + b
        f1 = np.divide(2.0 * a, den, out=np.ones(den.shape), where=den > 0)
        expected = inside @ f1 @ outside
        if expected > best + 1e-12:
            best, best_k = expected, k
    chosen = np.zeros(len(p), bool)
    chosen[order[:best_k]] = True
    return chosen


def decide(p: np.ndarray, decision: dict) -> np.ndarray:
    if decision["rule"] == "expected_f1":
        return expected_f1_set(p, decision["at_least_one"])
    chosen = p >= np.array(decision["thresholds"])
    if decision["at_least_one"] and not chosen.any():
        chosen[np.argmax(p)] = True
    return chosen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("image", type=Path)
    ap.add_argument("caption")
    ap.add_argument("--int8", action="store_true")
    args = ap.parse_args()
    meta = json.loads((args.export / "model.json").read_text())
    sess = ort.InferenceSession(str(args.export / meta["files"]["int8" if args.int8 else "fp32"]),
                                providers=["CPUExecutionProvider"])
    ids, lengths = caption_input(args.export, args.caption, meta["caption"])
    feeds = {"images": image_input(args.image, meta["image"]) if meta["image"] else None,
             "ids": ids, "lengths": lengths}
    probs = sess.run(None, {name: feeds[name] for name in meta["inputs"]})[0][0]
    chosen = decide(probs.astype(np.float64), meta["decision"])
    print(json.dumps({"labels": [lab for lab, c in zip(meta["labels"], chosen, strict=True) if c],
                      "probabilities": {str(lab): round(float(p), 6)
                                        for lab, p in zip(meta["labels"], probs, strict=True)}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
