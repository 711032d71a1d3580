import pytest
import torch
from PIL import Image

from mmtag.data.images import ImageReadError, ImageTransformSpec, build_transform, load_image


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("size", [64, 96])
def test_transform_shapes_and_dtypes(train, size):
    img = Image.new("RGB", (50, 30), (255, 0, 0))
    x = build_transform(ImageTransformSpec(size=size), train=train)(img)
    assert x.shape == (3, size, size) and x.dtype == torch.float32


def test_normalisations_match_their_formulas():
    img = Image.new("RGB", (8, 8), (255, 127, 0))
    x = build_transform(ImageTransformSpec(size=8, normalisation="tf"), train=False)(img)
    torch.testing.assert_close(x[:, 4, 4], torch.tensor([1.0, 0.0, -127 / 128]), atol=1e-5, rtol=0)
    x = build_transform(ImageTransformSpec(size=8, normalisation="imagenet"), train=False)(img)
    torch.testing.assert_close(x[0, 4, 4], torch.tensor((1 - 0.485) / 0.229), atol=1e-4, rtol=0)


def test_bad_spec_and_bad_images(tmp_path):
    with pytest.raises(ValueError, match="choose from"):
        ImageTransformSpec(normalisation="nope")
    with pytest.raises(ImageReadError, match="does not exist"):
        load_image(tmp_path / "x.jpg", "train.csv line 3")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ImageReadError, match=r"bad.jpg \(row 9\) cannot be decoded"):
        load_image(bad, "row 9")
