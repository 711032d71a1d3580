"""Forward + backward time of the label-query decoder alone, at the `cpu` recipe's shapes.

Batch 64, Lite2's 352-channel map (144 positions = 12x12 at 384 px by default) and 24 caption
tokens of MiniLM's width 384; median of 15 steps after 3 warm-up steps, under bf16 autocast.

    python tools/analysis/decoder_time.py DIM DROPOUT bf16|f32 [IMAGE_TOKENS]
    python tools/analysis/decoder_time.py 256 0.1 bf16          # the recipe's decoder
    python tools/analysis/decoder_time.py 256 0.1 bf16 196      # at 448 px (14x14)

Run against commit efe5ccc (2026-11-27). It imports mmtag.models.tagger.LabelQueryDecoder,
whose signature may have changed since: check that commit out to rerun it exactly.
Results: docs/experiments.md, "Fusion" and "Speed".
"""

import statistics
import sys
import time

import torch

from mmtag.allocator import keep_freed_memory
from mmtag.models.tagger import LabelQueryDecoder

keep_freed_memory()
torch.manual_seed(0)
dim = int(sys.argv[1])
drop = float(sys.argv[2])
fp = sys.argv[3] == "f32"
dec = LabelQueryDecoder([352, 384], 18, dim=dim, layers=1, heads=8, dropout=drop).train()
img = torch.randn(64, int(sys.argv[4]) if len(sys.argv) > 4 else 144, 352, requires_grad=True)
txt = torch.randn(64, 24, 384, requires_grad=True)
if not fp:
    img = img.detach().bfloat16().requires_grad_()
masks = [torch.ones(64, img.shape[1], dtype=torch.bool),
         torch.arange(24)[None] < torch.randint(5, 24, (64, 1))]


def step():
    with torch.autocast("cpu", torch.bfloat16):
        out = dec([img, txt], masks)
    out.float().sum().backward()


for _ in range(3):
    step()
ts = []
for _ in range(15):
    t = time.perf_counter()
    step()
    ts.append(time.perf_counter() - t)
print(sys.argv[1:], f"{statistics.median(ts) * 1000:.1f} ms")
