"""The training augmentation of `build_transform(spec, train=True)` on a whole batch at once.

The per-image pipeline in `images.py` runs PIL ops in DataLoader workers, one image at a time.
Here the same steps (horizontal flip -> colour jitter -> random affine -> normalise) are tensor
ops on a uint8 batch already resized to `spec.size`, on whatever device the batch lives on, with
one random draw per image. Nothing here synchronises with the host (no `.item()`, no `.cpu()`,
no python branching on tensor values, no host->device copies of python lists), so a training
loop can call `augment_batch` every step without stalling the GPU.

Differences from the torchvision pipeline, all small at the strengths we train with:
- colour jitter applies brightness, contrast, saturation, hue in this fixed order (torchvision
  draws a random order per image) and works on float pixels (PIL rounds to uint8 between steps,
  and quantises the hue shift to 1/256 of the wheel);
- the affine is bilinear (RandomAffine defaults to nearest); translations are whole pixels as in
  torchvision.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from mmtag.data.images import NORMALISATIONS, ImageTransformSpec

# ITU-R 601 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale use
_GREY_WEIGHTS = (0.299, 0.587, 0.114)

__all__ = ["augment_batch", "normalise_batch"]

# (B,) uniform columns each step takes from the batch's one draw
_DRAWS_PER_STEP = {"flip": 1, "jitter": 3, "hue": 1, "affine": 4}


def normalise_batch(images: torch.Tensor, normalisation: str) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (B, 3, H, W): /255, then (x - mean) / std with
    `NORMALISATIONS[normalisation]` (what `ToTensor` + `Normalize` do to one image)."""
    _check_batch(images)
    return _normalise_unit(_to_unit(images), normalisation)


def augment_batch(images: torch.Tensor, spec: ImageTransformSpec,
                  generator: torch.Generator) -> torch.Tensor:
    """uint8 (B, 3, H, W) already at `spec.size` -> float32 normalised (B, 3, H, W).

    Each image gets its own draw: horizontal flip with probability `spec.hflip`; brightness,
    contrast and saturation factors uniform in [max(0, 1 - jitter), 1 + jitter]; a hue shift
    uniform in [-hue, hue] of the colour wheel; a random affine (rotation uniform in +/-degrees,
    translation uniform in +/-translate of the side, scale uniform in `spec.scale`), bilinear,
    with black (0 pixels, before normalisation) outside the image; then `normalise_batch`.
    A step whose strength is 0 is skipped, under the same conditions as `build_transform`.
    Every random number comes from `generator`, which must live on `images.device`, so one
    seed gives one batch.
    """
    _check_batch(images)
    if images.shape[-2:] != (spec.size, spec.size):
        raise ValueError(f"augment_batch expects images already resized to {spec.size}x"
                         f"{spec.size}, got {tuple(images.shape[-2:])}; resize them first")
    if generator.device.type != images.device.type:
        raise ValueError(f"generator is on {generator.device} but the images are on "
                         f"{images.device}; create it with torch.Generator(device=images.device)")
    steps = _active_steps(spec)
    x = _to_unit(images)  # (B, 3, H, W) float32 in [0, 1]
    # every random number of the batch in one draw, a (B,) column per parameter: one kernel,
    # and under torch.compile one graph break (dynamo cannot trace a generator argument)
    # rather than one per parameter, leaving the rest to compile as a single graph
    n = sum(_DRAWS_PER_STEP[step] for step in steps)
    u = torch.rand(x.shape[0], n, generator=generator, device=x.device)  # (B, n)
    return _augment_unit(x, spec, steps, iter(u.unbind(1)))


def _active_steps(spec: ImageTransformSpec) -> tuple[str, ...]:
    """The steps `build_transform(spec, train=True)` includes, under the same conditions."""
    on = {"flip": spec.hflip > 0, "jitter": spec.jitter > 0, "hue": spec.hue > 0,
          "affine": spec.degrees > 0 or spec.translate > 0 or tuple(spec.scale) != (1.0, 1.0)}
    return tuple(step for step, active in on.items() if active)


def _augment_unit(x: torch.Tensor, spec: ImageTransformSpec, steps: tuple[str, ...],
                  draws: Iterator[torch.Tensor]) -> torch.Tensor:
    """0..1 (B, 3, H, W) -> augmented and normalised, taking (B,) uniforms from `draws`."""
    if "flip" in steps:
        x = _random_flip(x, spec.hflip, draws)
    if "jitter" in steps:
        x = _random_jitter(x, spec.jitter, draws)
    if "hue" in steps:
        x = _adjust_hue(x, _uniform(-spec.hue, spec.hue, draws))
    if "affine" in steps:
        x = _random_affine(x, spec.degrees, spec.translate, tuple(spec.scale), draws)
    return _normalise_unit(x, spec.normalisation)


def _check_batch(images: torch.Tensor) -> None:
    # shape and dtype are metadata: checking them costs no host synchronisation
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a uint8 batch of shape (B, 3, H, W), got {images.dtype} "
                         f"{tuple(images.shape)}")


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.to(torch.float32) / 255.0


def _normalise_unit(x: torch.Tensor, normalisation: str) -> torch.Tensor:
    """float 0..1 (B, 3, H, W) -> (x - mean) / std."""
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {normalisation!r}; choose from "
                         f"{sorted(NORMALISATIONS)}")
    mean, std = NORMALISATIONS[normalisation]
    return (x - _channel_constant(mean, x)) / _channel_constant(std, x)


def _channel_constant(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    """A (1, C, 1, 1) tensor of `values` on `like`'s device, made by fill kernels: copying a
    python list to the GPU (`torch.tensor(values, device=...)`) would synchronise the stream."""
    parts = [torch.full((), float(v), dtype=like.dtype, device=like.device) for v in values]
    return torch.stack(parts).view(1, -1, 1, 1)


def _uniform(low: float, high: float, draws: Iterator[torch.Tensor]) -> torch.Tensor:
    """The next (B,) column of uniforms, stretched from [0, 1) to [low, high)."""
    return low + (high - low) * next(draws)


def _random_flip(x: torch.Tensor, p: float, draws: Iterator[torch.Tensor]) -> torch.Tensor:
    flip = next(draws) < p  # (B,) bool
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def _random_jitter(x: torch.Tensor, jitter: float, draws: Iterator[torch.Tensor]) -> torch.Tensor:
    """ColorJitter's brightness, contrast, saturation with per-image factors, in this fixed
    order (torchvision shuffles the order of its four adjustments per image)."""
    low, high = max(0.0, 1.0 - jitter), 1.0 + jitter
    x = _adjust_brightness(x, _uniform(low, high, draws))
    x = _adjust_contrast(x, _uniform(low, high, draws))
    return _adjust_saturation(x, _uniform(low, high, draws))


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma; python-scalar weights keep it free of host copies."""
    r, g, b = x.unbind(1)
    return (_GREY_WEIGHTS[0] * r + _GREY_WEIGHTS[1] * g + _GREY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other per image, clamped to [0, 1] as torchvision does."""
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1.0 - f) * other).clamp(0.0, 1.0)


def _adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale 0..1 pixels of each image by its (B,) factor (a blend with black)."""
    return _blend(x, torch.zeros_like(x), factor)


def _adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each image with the mean of its greyscale by its (B,) factor."""
    return _blend(x, _grey(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def _adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each pixel with its greyscale by the image's (B,) factor."""
    return _blend(x, _grey(x), factor)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Shift each image's HSV hue by its (B,) shift (a fraction of the colour wheel), as
    torchvision's `adjust_hue` does on float tensors.

    Written without an HSV round trip: a hue shift keeps each pixel's max (V) and min, so only
    where each channel sits between them changes. Every step is elementwise, with no branching
    on values, so it neither synchronises nor breaks a compiled graph.
    """
    top = x.amax(dim=1, keepdim=True)  # (B, 1, H, W): V
    span = top - x.amin(dim=1, keepdim=True)  # V * S
    safe = torch.where(span > 0, span, torch.ones_like(span))  # greys: any hue gives the grey
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    hue6 = torch.where(r == top, (g - b) / safe,
                       torch.where(g == top, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue6 = torch.remainder(hue6 + 6.0 * shift.view(-1, 1, 1, 1), 6.0)  # hue in sixths, [0, 6)
    # HSV -> RGB in closed form: channel n (r, g, b = 5, 3, 1) is
    # V - V * S * clamp(min(k, 4 - k), 0, 1) with k = (n + hue6) mod 6
    k = torch.remainder(_channel_constant((5.0, 3.0, 1.0), x) + hue6, 6.0)  # (B, 3, H, W)
    return top - span * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def _random_affine(x: torch.Tensor, degrees: float, translate: float,
                   scale: tuple[float, float], draws: Iterator[torch.Tensor]) -> torch.Tensor:
    """RandomAffine(degrees, (translate, translate), scale) with per-image parameters."""
    height, width = x.shape[-2:]
    angle = _uniform(-degrees, degrees, draws)
    # whole pixels, as torchvision's RandomAffine.get_params rounds them
    tx = torch.round(_uniform(-translate * width, translate * width, draws))
    ty = torch.round(_uniform(-translate * height, translate * height, draws))
    s = _uniform(scale[0], scale[1], draws)
    return _warp_affine(x, angle, tx, ty, s)


def _warp_affine(x: torch.Tensor, angle: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
    """torchvision's `F.affine(img, angle, [tx, ty], scale, shear=0)` for each image, bilinear.

    (B,) angle in degrees (clockwise on screen), tx / ty in pixels, scale; rotation and scale
    are about the image centre; outside the image is 0.
    """
    theta = _inverse_affine_theta(angle, tx, ty, scale, x.shape[-2], x.shape[-1])  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _inverse_affine_theta(angle: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor,
                          scale: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 2, 3) matrices taking output to input positions in affine_grid's [-1, 1] coordinates.

    In pixels about the centre the forward map is p -> s R p + t with R = [[cos, -sin],
    [sin, cos]], so the input seen at p is R^-1 (p - t) / s. affine_grid's coordinates are
    pixels divided by (W / 2, H / 2), which rescales the off-diagonal terms by the aspect.
    """
    rad = angle * (math.pi / 180.0)
    # R^-1 / s = [[cos, sin], [-sin, cos]] with the 1 / s folded into cos and sin
    cos, sin = torch.cos(rad) / scale, torch.sin(rad) / scale
    bx = -(cos * tx + sin * ty)  # R^-1 (-t) / s, in pixels
    by = -(-sin * tx + cos * ty)
    row_x = torch.stack([cos, sin * (height / width), bx * (2.0 / width)], dim=-1)
    row_y = torch.stack([-sin * (width / height), cos, by * (2.0 / height)], dim=-1)
    return torch.stack([row_x, row_y], dim=1)
