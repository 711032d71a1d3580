"""Time of one training step of the `cpu` recipe on cached-shape inputs, and its kernel time.

Builds the recipe's model (overrides as KEY=VALUE arguments), feeds it random inputs of the
cached activations' shape (batch 64, 384 px, bf16 autocast) and prints the median of 20 steps
and the kernel (system) CPU time they took. The allocator setting (mmtag.allocator) is applied
unless MMTAG_MALLOC=default.

    python tools/analysis/train_step_time.py                          # the recipe as it is
    MMTAG_MALLOC=default python tools/analysis/train_step_time.py     # glibc's defaults
    python tools/analysis/train_step_time.py model.freeze_image=6     # another overrides

Run against commit 6d8870a (2026-11-27), from the repository root (it reads configs/cpu.yaml).
Later measurements used it with data.image_size read from the config instead of 384 and, for
the stride-16 map, a second input. It imports mmtag.models.build and the private
mmtag.training.loop._make_optimizer, which may have moved since: check that commit out to rerun
it exactly. Results: docs/experiments.md, "Speed".
"""

import os
import statistics
import sys
import time

import torch

from mmtag.allocator import keep_freed_memory
from mmtag.config import load_config
from mmtag.models.build import build_tagger, fit_caption_encoder
from mmtag.training.loop import _make_optimizer

keep_freed_memory()
cfg = load_config("configs/cpu.yaml", sys.argv[1:])
m = build_tagger(cfg.model, 18, fit_caption_encoder(cfg.model, cfg.data, ["a cat"]),
                 load_pretrained=True)
st = m.image_encoder.frozen_stages
m.image_encoder.to(memory_format=torch.channels_last)
m.image_input_stage, m.text_input_stage = st, 5
with torch.no_grad():
    shape = m.image_encoder.run_stages(torch.randn(1, 3, 384, 384), 0, st).shape[1:]
x = torch.randn(64, *shape).contiguous(memory_format=torch.channels_last)
txt, lens = torch.randn(64, 24, 384), torch.full((64,), 16)
y = (torch.rand(64, 18) < 0.1).float()
opt, bce = _make_optimizer(cfg, m), torch.nn.BCEWithLogitsLoss()


def step():
    with torch.autocast("cpu", torch.bfloat16):
        out = m.forward_all(x, txt, lens)
    loss = bce(out["fused"].float(), y) + 0.5 * (bce(out["image"].float(), y)
                                                 + bce(out["text"].float(), y))
    opt.zero_grad()
    loss.backward()
    opt.step()


m.train()
step()
step()
t0, times = os.times(), []
for _ in range(20):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
t1 = os.times()
print(f"median step {statistics.median(times):.3f} s; kernel CPU time {t1.system - t0.system:.1f} s of "
      f"{t1.user + t1.system - t0.user - t0.system:.1f} s")
