"""Batched GPU-style augmentation: each step against torchvision, the skips, the seeding."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from mmtag.data.batch_augment import (
    _adjust_brightness,
    _adjust_contrast,
    _adjust_hue,
    _adjust_saturation,
    _warp_affine,
    augment_batch,
    normalise_batch,
)
from mmtag.data.images import NORMALISATIONS, ImageTransformSpec

OFF = dict(hflip=0.0, jitter=0.0, hue=0.0, degrees=0.0, translate=0.0, scale=(1.0, 1.0))


def spec_with(size: int = 16, normalisation: str = "imagenet", **strengths) -> ImageTransformSpec:
    """A spec with every augmentation off except `strengths`."""
    return ImageTransformSpec(size=size, normalisation=normalisation, **{**OFF, **strengths})


def random_batch(b: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, size, size), generator=g, dtype=torch.uint8)


def gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@pytest.mark.parametrize("normalisation", sorted(NORMALISATIONS))
def test_normalise_batch_matches_torchvision(normalisation):
    images = random_batch(2, 8)
    mean, std = NORMALISATIONS[normalisation]
    expected = torch.stack([
        T.Normalize(mean, std)(T.ToTensor()(Image.fromarray(im.permute(1, 2, 0).numpy())))
        for im in images])
    torch.testing.assert_close(normalise_batch(images, normalisation), expected)


def test_every_strength_zero_is_plain_normalisation():
    images = random_batch()
    out = augment_batch(images, spec_with(), gen())
    assert torch.equal(out, normalise_batch(images, "imagenet"))


def test_hflip_one_flips_every_image():
    images = random_batch()
    out = augment_batch(images, spec_with(hflip=1.0), gen())
    assert torch.equal(out, normalise_batch(images.flip(-1), "imagenet"))


def test_hflip_half_flips_about_half_each_image_on_its_own():
    images = random_batch(1).expand(64, -1, -1, -1)
    out = augment_batch(images, spec_with(hflip=0.5), gen())
    plain = normalise_batch(images[:1], "imagenet")
    flipped = normalise_batch(images[:1].flip(-1), "imagenet")
    was_flipped = (out == flipped).flatten(1).all(1)  # (B,)
    assert torch.equal(was_flipped, ~(out == plain).flatten(1).all(1))  # one or the other
    assert 16 <= was_flipped.sum() <= 48  # 64 fair tosses land outside this ~1e-4 of the time


def test_brightness_contrast_saturation_keep_greys_grey_and_within_their_range():
    # on a flat grey image contrast and saturation are identities, so only brightness shows
    images = torch.full((8, 3, 16, 16), 100, dtype=torch.uint8)
    out = augment_batch(images, spec_with(normalisation="none", jitter=0.4), gen())
    level = out[:, :1, :1, :1]  # (B, 1, 1, 1)
    torch.testing.assert_close(out, level.expand_as(out))  # flat and grey
    assert level.min() >= 100 / 255 * 0.6 - 1e-6 and level.max() <= 100 / 255 * 1.4 + 1e-6
    assert level.unique().numel() == 8  # each image its own factor


def test_full_augmentation_stays_within_pixel_range():
    spec = ImageTransformSpec(size=16, normalisation="none", jitter=0.8, hue=0.2)
    out = augment_batch(random_batch(8), spec, gen())
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert (out == 0).any()  # the affine's black border


@pytest.mark.parametrize(("ours", "theirs", "factors"), [
    (_adjust_brightness, TF.adjust_brightness, (0.6, 1.0, 1.4)),
    (_adjust_contrast, TF.adjust_contrast, (0.6, 1.0, 1.4)),
    (_adjust_saturation, TF.adjust_saturation, (0.6, 1.0, 1.4)),
    (_adjust_hue, TF.adjust_hue, (-0.3, 0.0, 0.02)),
])
def test_colour_steps_match_torchvision(ours, theirs, factors):
    x = random_batch(3).float() / 255
    x[0, :, :4] = 0.5  # greys, which have no hue
    expected = torch.stack([theirs(im, f) for im, f in zip(x, factors, strict=True)])
    # torchvision's tensor greyscale weighs red 0.2989, ours (and PIL's) 0.299
    torch.testing.assert_close(ours(x, torch.tensor(factors)), expected, atol=1e-4, rtol=0)


def test_affine_matches_torchvision_on_a_non_square_image():
    x = torch.rand(3, 3, 10, 18, generator=gen())
    params = [(0.0, 0, 0, 1.0), (17.0, 3, -2, 1.1), (-90.0, -4, 5, 0.85)]
    expected = torch.stack([
        TF.affine(im, angle, [tx, ty], s, [0.0, 0.0], interpolation=InterpolationMode.BILINEAR)
        for im, (angle, tx, ty, s) in zip(x, params, strict=True)])
    angle, tx, ty, s = (torch.tensor(v, dtype=torch.float32) for v in zip(*params, strict=True))
    torch.testing.assert_close(_warp_affine(x, angle, tx, ty, s), expected, atol=1e-5, rtol=0)


def test_whole_pipeline_is_torchvision_per_image_with_the_same_draws():
    spec = ImageTransformSpec(size=16, normalisation="none", hflip=0.5, jitter=0.4, hue=0.1,
                              degrees=20.0, translate=0.2, scale=(0.8, 1.2))
    images = random_batch(6)
    out = augment_batch(images, spec, gen(3))
    # the batch's one draw: flip, brightness, contrast, saturation, hue, angle, tx, ty, scale
    draws = torch.rand(6, 9, generator=gen(3)).tolist()
    for im, got, (f, b, c, s, h, a, tx, ty, sc) in zip(images.float() / 255, out, draws,
                                                       strict=True):
        x = im.flip(-1) if f < 0.5 else im
        x = TF.adjust_brightness(x, 0.6 + 0.8 * b)
        x = TF.adjust_contrast(x, 0.6 + 0.8 * c)
        x = TF.adjust_saturation(x, 0.6 + 0.8 * s)
        x = TF.adjust_hue(x, -0.1 + 0.2 * h)
        shift = [round(-3.2 + 6.4 * tx), round(-3.2 + 6.4 * ty)]  # +/- 0.2 of 16 px, whole px
        x = TF.affine(x, -20 + 40 * a, shift, 0.8 + 0.4 * sc, [0.0, 0.0],
                      interpolation=InterpolationMode.BILINEAR)
        torch.testing.assert_close(got, x, atol=1e-4, rtol=0)


def test_translation_moves_a_block_whole_and_fills_black():
    images = torch.zeros(16, 3, 16, 16, dtype=torch.uint8)
    images[:, :, 6:10, 6:10] = 255
    out = augment_batch(images, spec_with(translate=0.25), gen())
    black = normalise_batch(torch.zeros_like(images[:1]), "imagenet")  # (1, 3, 16, 16)
    white = normalise_batch(torch.full_like(images[:1], 255), "imagenet")
    is_white = torch.isclose(out, white, atol=1e-4).all(1)  # (B, H, W)
    is_black = torch.isclose(out, black, atol=1e-4).all(1)
    assert (is_white | is_black).all()  # whole-pixel shifts: nothing blurred
    assert (is_white.sum((1, 2)) == 16).all()  # the 4x4 block stays whole (shift <= 4 px)
    corners = {tuple(torch.argwhere(w)[0].tolist()) for w in is_white}
    assert len(corners) > 3 and all(2 <= r <= 10 and 2 <= c <= 10 for r, c in corners)


def test_translation_of_a_white_image_leaves_black_borders():
    images = torch.full((16, 3, 16, 16), 255, dtype=torch.uint8)
    out = augment_batch(images, spec_with(normalisation="none", translate=0.25), gen())
    white = torch.isclose(out, torch.ones_like(out), atol=1e-4).all(1)  # (B, H, W)
    assert torch.isclose(out, torch.zeros_like(out), atol=1e-4).all(1).logical_or(white).all()
    rows, cols = white.any(2), white.any(1)  # (B, H), (B, W)
    assert torch.equal(white, rows[:, :, None] & cols[:, None, :])  # white is one rectangle
    assert (~white).any()
    # the black is at the edges: every run of white rows / columns touches a side
    for line in (*rows, *cols):
        kept = torch.argwhere(line).flatten()
        assert kept.numel() == kept[-1] - kept[0] + 1 and (kept[0] == 0 or kept[-1] == 15)


def test_seeding_decides_the_batch_and_each_image_gets_its_own_draw():
    spec = ImageTransformSpec(size=16)
    images = random_batch(1).expand(6, -1, -1, -1).contiguous()
    first = augment_batch(images, spec, gen(1))
    assert torch.equal(first, augment_batch(images, spec, gen(1)))
    assert not torch.allclose(first, augment_batch(images, spec, gen(2)))
    flat = first.flatten(1)
    assert all(not torch.allclose(flat[i], flat[j])
               for i in range(6) for j in range(i + 1, 6))


def test_shape_dtype_and_input_left_alone():
    images = random_batch(3)
    before = images.clone()
    out = augment_batch(images, ImageTransformSpec(size=16, normalisation="tf"), gen())
    assert out.shape == images.shape and out.dtype == torch.float32
    assert torch.equal(images, before)


def test_bad_batches_fail_naming_the_fix():
    with pytest.raises(ValueError, match="uint8 batch"):
        normalise_batch(torch.zeros(2, 3, 8, 8), "imagenet")
    with pytest.raises(ValueError, match="choose from"):
        normalise_batch(random_batch(1, 8), "nope")
    with pytest.raises(ValueError, match="resize them first"):
        augment_batch(random_batch(1, 8), ImageTransformSpec(size=16), gen())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_runs_without_host_synchronisation():
    images = random_batch(4, 32).cuda()
    spec = ImageTransformSpec(size=32)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        out = augment_batch(images, spec, gen(0, "cuda"))
        again = augment_batch(images, spec, gen(0, "cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device == images.device and out.dtype == torch.float32
    assert torch.equal(out, again)
