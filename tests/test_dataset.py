import pytest
import torch
from PIL import Image

from mmtag.data.batching import Pass
from mmtag.data.csv_io import Record
from mmtag.data.dataset import ImageRows, Split, TaggingDataset, make_loader
from mmtag.data.images import ImageTransformSpec, build_transform
from mmtag.data.labels import LabelMap
from mmtag.data.text import CaptionEncoder


def test_split_is_reproducible_and_saved(tmp_path):
    ids = [f"{i}.jpg" for i in range(100)]
    a, b = Split.make(ids, 0.8, seed=3), Split.make(ids, 0.8, seed=3)
    assert a == b and len(a.train) == 80 and len(a.val) == 20
    assert set(a.train).isdisjoint(a.val) and set(a.train) | set(a.val) == set(ids)
    assert Split.make(ids, 0.8, seed=4) != a
    a.save(tmp_path / "split.json")
    assert Split.load(tmp_path / "split.json") == a


def test_validation_blocks_are_disjoint_folds_and_block_0_is_the_default_split():
    ids = [f"{i}.jpg" for i in range(100)]
    blocks = [Split.make(ids, 0.75, seed=3, block=k) for k in range(4)]
    assert blocks[0] == Split.make(ids, 0.75, seed=3)
    vals = [set(b.val) for b in blocks]
    assert all(len(v) == 25 for v in vals) and set().union(*vals) == set(ids)
    for b in blocks:
        assert set(b.train).isdisjoint(b.val) and len(b.train) == 75
    # four blocks of 5 % tile the last 20 %: the 0.8 split's validation rows
    fine = [set(Split.make(ids, 0.95, seed=3, block=k).val) for k in range(4)]
    assert set().union(*fine) == set(Split.make(ids, 0.8, seed=3).val)
    with pytest.raises(ValueError, match="block 4 does not exist"):
        Split.make(ids, 0.75, seed=3, block=4)


def test_dataset_and_loader_yield_the_four_tensors(tmp_path):
    for i in range(6):
        Image.new("RGB", (40 + i, 30), (40 * i, 0, 0)).save(tmp_path / f"{i}.jpg")
    recs = [Record(f"{i}.jpg", (1,) if i % 2 else (1, 3), f"a dog number {i}", i + 2) for i in range(6)]
    enc = CaptionEncoder.fit([r.caption for r in recs], max_len=4)
    lm = LabelMap.from_records(recs)
    ds = TaggingDataset(ImageRows(recs, tmp_path), enc, lm, build_transform(ImageTransformSpec(size=32), True))
    loader = make_loader(ds, Pass(4, shuffle=True, seed=0))
    img, tok, length, target = next(iter(loader))
    assert img.shape == (4, 3, 32, 32) and tok.shape == (4, 4) and tok.dtype == torch.long
    assert length.shape == (4,) and target.shape == (4, 2) and target.dtype == torch.float32
    # the shuffling order is fixed by the seed
    assert list(make_loader(ds, Pass(2, shuffle=True, seed=5)).sampler) == \
        list(make_loader(ds, Pass(2, shuffle=True, seed=5)).sampler)
    assert list(make_loader(ds, Pass(2, shuffle=True, seed=5)).sampler) != \
        list(make_loader(ds, Pass(2, shuffle=True, seed=6)).sampler)
