"""Image loading and the report's transforms, with size and normalisation as parameters.

Train: resize -> random horizontal flip -> colour jitter -> random affine -> tensor -> normalise.
Eval:  resize -> tensor -> normalise.
Backbones differ in what they expect: torchvision's ImageNet models use the ImageNet mean/std,
the TensorFlow-trained EfficientNet-Lite weights use (x - 127) / 128 on 0..255 pixels.
"""

from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from PIL.JpegImagePlugin import JpegImageFile

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


# Decoding a photo costs width x height x (bytes per pixel of its mode, twice: the decoded
# pixels and a turned copy, + 4 for the 8-bit and RGB copies); above this budget a JPEG is
# decoded at a reduced scale (libjpeg's DCT scaling, `Image.draft`) and anything else is
# refused, so that one small file cannot take gigabytes (a 13000 x 13000 PNG: 1.9 GB).
DECODE_BUDGET_MB = 512
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "RGB": 3, "YCbCr": 3,
                    "LAB": 3, "HSV": 3, "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "I": 4,
                    "F": 4}
_ORIENTATION = 0x0112  # the EXIF tag a camera sets instead of turning the pixels


def decode_cost(im: Image.Image) -> int:
    """Bytes that decoding `im` (an opened, not yet loaded image) and making it RGB may take."""
    w, h = im.size
    bpp = 2 if im.mode.startswith("I;16") else _BYTES_PER_PIXEL.get(im.mode, 4)
    return w * h * (2 * bpp + 4)


def exif_orientation(im: Image.Image) -> int:
    """The image's EXIF orientation (1: as stored; 2-8: mirrored and/or turned), 1 when it has
    none or it cannot be read."""
    try:
        value = im.getexif().get(_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block: the pixels are still shown as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def load_image(path: Path | str, where: str = "", *, min_side: int | None = None,
               budget_mb: float = DECODE_BUDGET_MB) -> Image.Image:
    """Decode an image as RGB, the way a viewer shows it (EXIF orientation applied), or raise
    ImageReadError naming it (and `where`, e.g. the CSV row). Only regular files are opened: a
    FIFO would block forever, a device be read without end. A JPEG whose decoding would exceed
    `budget_mb` is decoded at a reduced scale, never below `min_side` px (the size the model
    reads it at); another format over the budget is refused."""
    at = f" ({where})" if where else ""
    try:
        st_mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ImageReadError(f"image {path}{at} does not exist") from None
    except OSError as e:
        raise ImageReadError(f"image {path}{at} cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(st_mode):
        raise ImageReadError(f"image {path}{at} is not a regular file (a folder, FIFO, device "
                             f"or socket); it was not opened: put the photo itself there")
    try:
        with warnings.catch_warnings():
            # PIL warns of images over 89 million pixels; the budget below is what decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            within_budget(im, f"image {path}{at}", min_side, budget_mb)
            return to_rgb(upright(im))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        if isinstance(e, ImageReadError):
            raise
        raise ImageReadError(f"image {path}{at} cannot be decoded: {e}") from None


def within_budget(im: Image.Image, name: str, min_side: int | None = None,
                  budget_mb: float = DECODE_BUDGET_MB) -> None:
    """Make an opened image's decoding fit `budget_mb` (a JPEG: decoded at 1/2, 1/4 or 1/8
    scale, never below `min_side`), or raise ImageReadError naming it (`name`)."""
    budget = budget_mb * 2**20
    if decode_cost(im) <= budget:
        return
    if isinstance(im, JpegImageFile):  # MPO (many phones' JPEGs) is one too
        # libjpeg scales by 1/2, 1/4 or 1/8, and Pillow's draft takes effect once: the first
        # scale that fits, never below min_side
        w, h = im.size
        for scale in (2, 4, 8):
            want = (max(1, w // scale), max(1, h // scale))
            if min_side and min(want) < min_side:
                break
            if decode_cost(im) // (scale * scale) <= budget:
                im.draft("RGB", want)
                if decode_cost(im) <= budget:
                    return
                break
    w, h = im.size
    raise ImageReadError(f"{name} is {w} x {h} pixels ({im.mode}): decoding it would take about "
                         f"{decode_cost(im) / 2**20:,.0f} MB, over the {budget_mb:g} MB budget; "
                         f"resize it (the model reads {min_side or 'a few hundred'} px)")


def upright(im: Image.Image) -> Image.Image:
    """The image as a viewer shows it: its EXIF orientation applied to the pixels."""
    if exif_orientation(im) == 1:
        return im
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # damaged EXIF: keep the pixels as stored rather than fail the image
        return im


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB. High-bit-depth greyscale (16-bit PNG/TIFF: modes I;16*, I) is scaled to 0-255
    first: `convert("RGB")` would clip it, turning nearly every pixel white."""
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im)
        top = 65535 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255
        return Image.fromarray(_scale_to_uint8(a, top), "L").convert("RGB")
    if im.mode == "F":  # 32-bit float greyscale: 0-1 or 0-255
        a = np.asarray(im).astype(np.float64)
        a = a * 255.0 if a.max(initial=0) <= 1.0 else a
        return Image.fromarray(np.round(np.clip(a, 0, 255)).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def _scale_to_uint8(a: np.ndarray, top: int) -> np.ndarray:
    """round(clip(a, 0, top) * 255 / top) as uint8, a block of rows at a time: the float64
    copy of a whole 16-bit photo would take 8 bytes per pixel (317 MB at 6300 x 6300)."""
    out = np.empty(a.shape, dtype=np.uint8)
    rows = max(1, (1 << 22) // max(1, a.shape[1] if a.ndim > 1 else 1))
    for s in range(0, a.shape[0], rows):
        block = np.clip(a[s:s + rows].astype(np.float64), 0, top) * (255.0 / top)
        out[s:s + rows] = np.round(block)
    return out
