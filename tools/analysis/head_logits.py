"""Each head's validation logits (fused, image, caption), averaged over the original and mirror
image, computed from a run's cached features; saved to /tmp/heads-RUN.npz (with the labels) for
head_weights.py, head_weights_pooled.py and per_class_head_weights.py.

    COMP5329_DATA=path/to/comp5329 python tools/analysis/head_logits.py RUN ...

Run against commit 371121f (2026-11-30) on v5's three seeds; at ebd3f09 it also recorded a
"pooled" head where cfg.model.pooled_head was set (that option is gone: it exists up to commit
c54b680). It uses many mmtag internals (prepare_data, image_spec, encoder_normalisation,
plan_cache, cached_dataset, Tagger.forward_all), which have moved since: check that commit out to
rerun it. Results: docs/experiments.md, "Heads".
"""

import os
import sys
from pathlib import Path

import numpy as np
import torch

from mmtag.allocator import keep_freed_memory
from mmtag.config import load_config
from mmtag.data.dataset import TaggingDataset
from mmtag.data.images import build_transform
from mmtag.models.build import build_tagger
from mmtag.training.cached import cached_dataset, plan_cache
from mmtag.training.loop import encoder_normalisation, image_spec, prepare_data

keep_freed_memory()
D = Path(os.environ.get("COMP5329_DATA", "comp5329"))  # the Kaggle folder: train.csv, data/
for run in sys.argv[1:]:
    rd = Path("runs") / run
    cfg = load_config(rd / "config.yaml")
    data = prepare_data(cfg, D, rd, resume=True)
    ck = torch.load(rd / "best.pt", map_location="cpu", weights_only=True)
    model = build_tagger(cfg.model, data.label_map.num_classes, data.caption_enc,
                         load_pretrained=False)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in ck["model"].items()})
    model.eval()
    norm = encoder_normalisation(model)
    ds = TaggingDataset(data.val_rows, data.image_dir, data.caption_enc, data.label_map,
                        build_transform(image_spec(cfg, norm), train=False), source="train.csv")
    stage, tstage = plan_cache(cfg, model)
    cds = cached_dataset(cfg, model, ds, image_spec(cfg, norm), train=False, stage=stage,
                         text_stage=tstage, progress=False, dtype=torch.bfloat16)
    model.image_input_stage, model.text_input_stage = stage, tstage
    cds.both_views = True
    out, ys = {k: [] for k in ("fused", "image", "text")}, []
    with torch.inference_mode():
        for s in range(0, len(cds), 128):
            items = [cds[i] for i in range(s, min(s + 128, len(cds)))]
            img = torch.stack([it[0] for it in items])
            txt = torch.stack([it[1] for it in items])
            ln = torch.stack([it[2] for it in items])
            ys.append(torch.stack([it[3] for it in items]))
            per = {k: [] for k in out}
            for v in range(img.shape[1]):
                with torch.autocast("cpu", torch.bfloat16):
                    o = model.forward_all(img[:, v].contiguous(memory_format=torch.channels_last),
                                          txt, ln)
                for k in out:
                    per[k].append(o[k].float())
            for k in out:
                out[k].append(torch.stack(per[k]).mean(0))
    np.savez(f"/tmp/heads-{run}.npz", y=torch.cat(ys).numpy(),
             **{k: torch.cat(v).numpy() for k, v in out.items()})
