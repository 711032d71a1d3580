"""Image loading and the report's transforms, with size and normalisation as parameters.

Train: resize -> random horizontal flip -> colour jitter -> random affine -> tensor -> normalise.
Eval:  resize -> tensor -> normalise.
Backbones differ in what they expect: torchvision's ImageNet models use the ImageNet mean/std,
the TensorFlow-trained EfficientNet-Lite weights use (x - 127) / 128 on 0..255 pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mmtag.config import DataConfig

# name -> (mean, std) on 0..1 pixels
NORMALISATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "tf": ((127 / 255,) * 3, (128 / 255,) * 3),  # (x - 127) / 128 on 0..255
    "none": ((0.0,) * 3, (1.0,) * 3),
}


class ImageReadError(OSError):
    """An image is missing or cannot be decoded."""


@dataclass(frozen=True)
class ImageTransformSpec:
    """Parameters of the image pipeline (saved with a run so predict rebuilds it exactly)."""

    size: int = 256
    normalisation: str = "imagenet"
    hflip: float = 0.5
    jitter: float = 0.2          # brightness/contrast/saturation strength; 0 turns it off
    hue: float = 0.02
    degrees: float = 10.0        # random affine rotation range (+/-)
    translate: float = 0.1       # fraction of width/height
    scale: tuple[float, float] = (0.9, 1.1)

    def __post_init__(self) -> None:
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {self.normalisation!r}; choose from "
                             f"{sorted(NORMALISATIONS)}")
        if self.size < 8:
            raise ValueError(f"image size must be at least 8, got {self.size}")


def transform_spec(d: DataConfig, normalisation: str, size: int | None = None) -> ImageTransformSpec:
    """The image pipeline of a run's `data` config; `normalisation` is what the image encoder
    expects, used when data.normalisation is 'auto'. `size` replaces data.image_size (the other
    sizes of multi-scale TTA)."""
    norm = normalisation if d.normalisation == "auto" else d.normalisation
    return ImageTransformSpec(size=size or d.image_size, normalisation=norm, hflip=d.hflip,
                              jitter=d.jitter, hue=d.hue, degrees=d.degrees,
                              translate=d.translate, scale=(d.scale_min, d.scale_max))


def build_transform(spec: ImageTransformSpec, train: bool):
    """A torchvision transform: augmented when `train`, resize + normalise otherwise."""
    from torchvision import transforms as T

    mean, std = NORMALISATIONS[spec.normalisation]
    steps = [T.Resize((spec.size, spec.size), antialias=True)]
    if train:
        if spec.hflip > 0:
            steps.append(T.RandomHorizontalFlip(spec.hflip))
        if spec.jitter > 0 or spec.hue > 0:
            steps.append(T.ColorJitter(spec.jitter, spec.jitter, spec.jitter, spec.hue))
        if spec.degrees > 0 or spec.translate > 0 or tuple(spec.scale) != (1.0, 1.0):
            steps.append(T.RandomAffine(spec.degrees, translate=(spec.translate,) * 2,
                                        scale=tuple(spec.scale)))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def load_image(path: Path | str, where: str = "") -> Image.Image:
    """Decode an image as RGB, or raise ImageReadError naming it (and `where`, e.g. the CSV row)."""
    at = f" ({where})" if where else ""
    try:
        with Image.open(path) as im:
            return to_rgb(im)
    except FileNotFoundError:
        raise ImageReadError(f"image {path}{at} does not exist") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"image {path}{at} cannot be decoded: {e}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB. High-bit-depth greyscale (16-bit PNG/TIFF: modes I;16*, I) is scaled to 0-255
    first: `convert("RGB")` would clip it, turning nearly every pixel white."""
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        a = np.clip(a, 0, top) * (255.0 / top)
        return Image.fromarray(np.round(a).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":  # 32-bit float greyscale: 0-1 or 0-255
        a = np.asarray(im).astype(np.float64)
        a = a * 255.0 if a.max(initial=0) <= 1.0 else a
        return Image.fromarray(np.round(np.clip(a, 0, 255)).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")
