"""What Lite2's pretrained ImageNet classifier says about each image: its stage 7, 1x1 conv head
and 1000-class layer, all pretrained and frozen, applied at every position of the cached stage-6
maps (original + mirror) of a run's training and validation rows; the maximum and mean logit of
each ImageNet class per image and view, saved to /tmp/imagenet-feats.npz for imagenet_probe.py
(about 5 minutes on 2 cores with the cache in place).

    COMP5329_DATA=path/to/comp5329 python tools/analysis/imagenet_features.py RUN

Run against commit 380839d (2026-11-30) on v6 (seed 0) ("imnet.py"; it wrote
/tmp/imnet-feats.npz). It uses mmtag internals (cache_image_features, build_image_encoder,
lite_weights_path, image_spec, run_stages) that have moved since: check that commit out to rerun
it. Results: docs/experiments.md, "Image encoder and resolution".
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from mmtag.config import load_config
from mmtag.data.csv_io import read_csv
from mmtag.data.feature_cache import cache_image_features
from mmtag.models.image_encoders import build_image_encoder, lite_weights_path
from mmtag.training.loop import image_spec

run = Path("runs") / sys.argv[1]
D = Path(os.environ.get("COMP5329_DATA", "comp5329"))  # the Kaggle folder: train.csv, data/
cfg, split = load_config(run / "config.yaml"), json.loads((run / "split.json").read_text())
recs = {r.image_id: r for r in read_csv(D / "train.csv")}
enc = build_image_encoder("efficientnet_lite2", pretrained=True).eval()
st = torch.load(lite_weights_path("efficientnet_lite2"), map_location="cpu", weights_only=True)
W, b = st["_fc.weight"], st["_fc.bias"]  # (1000, 1280)
out = {}
for part in ("train", "val"):
    feats = cache_image_features(enc, 7, [recs[i] for i in split[part]], D / "data",
                                 image_spec(cfg, "tf"), flip=True, dtype=torch.bfloat16)
    res = np.zeros((len(feats), 2, 2, 1000), np.float16)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for s in range(0, len(feats), 64):
            for v in range(2):
                f = enc.run_stages(torch.from_numpy(feats[s:s + 64, v]).to(torch.bfloat16), 7).float()
                lg = (torch.einsum("bchw,kc->bkhw", f, W) + b[None, :, None, None]).flatten(2)
                res[s:s + 64, v, 0], res[s:s + 64, v, 1] = lg.amax(2).numpy(), lg.mean(2).numpy()
    out[part] = res
np.savez("/tmp/imagenet-feats.npz", **out)
