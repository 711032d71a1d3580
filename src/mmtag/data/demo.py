"""Synthetic demo data in exactly the COMP5329 Kaggle layout.

``mmtag demo`` must show the whole pipeline (read the CSVs, train an image + caption model,
predict, score) on a fresh machine with no download and only a couple of CPU cores. This module
writes a small stand-in for the competition data that has the same *shape* as the real thing:

    out_dir/
        train.csv         ImageID,Labels,Caption   (0.jpg .. n-1.jpg)
        test.csv          ImageID,Caption          (n.jpg .. n+n_test-1.jpg, no labels)
        test_labels.csv   ImageID,Labels           (the held-back answers, submission format)
        data/<id>.jpg     RGB JPEGs
        labels.txt        "<id> <name>" per class
        README.txt        what this is and how it was made
        .mmtag-demo.json  marker: lets a later run recognise (and refresh) its own output

What the data is like, and why:

* Each image is a scene of coloured geometric shapes, one class per kind of shape, on a
  textured, noisy background with thin clutter (lines, zigzags, arcs, specks) that belongs to no
  class. Shapes vary in size, rotation and colour, can be small, partly occluded or cut by the
  border, so the image is informative but not trivially so.
* Class ids are integers starting at 1 with one id skipped (6), like the real data skips 12.
  Class 1 ("circle") is on about 70% of images, the way "person" dominates the real data; the
  other classes are imbalanced too. Images carry 1 to 4 labels, in no particular order.
* Every caption mentions *some* of the objects present (each with probability
  ``MENTION_PROB``), never one that is absent, and sometimes its colour or size. So the caption
  alone misses roughly half of the labels while the image alone has to be read through noise:
  a model that uses both modalities should beat either one.
* Each shape kind prefers two colours (half the time), so colour is a weak cue, as colour is
  in real photos; the shape itself is the reliable one.
* Captions come from varied templates (synonyms, word order, filler, capitalisation, optional
  final punctuation). A few contain an embedded quotation such as ``reads "no, not again."``;
  like in the Kaggle files every caption is wrapped in double quotes and the embedded quotes
  are written *raw*, not doubled. That is deliberate: the tool's reader must cope with the real
  files, so the demo exercises the same quirk. ``embedded_quotes=False`` writes single quotes
  instead, which any standard CSV reader accepts.
* Image sizes vary like the real data (longest side mostly 128, sometimes 100 or 64; several
  aspect ratios, landscape and portrait).

Everything is deterministic for a seed: sample ``i`` is drawn from its own
``numpy.random.default_rng([seed, i])``, PIL draws and encodes with a fixed JPEG quality and
nothing depends on the time, so the same ``(seed, n, n_test)`` gives byte-identical files with
the same numpy and Pillow builds (another libjpeg may encode the same pixels differently, and
numpy does not promise identical random streams across major versions).

Overwriting policy: ``make_demo_data`` writes into a missing or empty directory, or refreshes a
directory that holds the marker file of an earlier run; then it overwrites the files listed
above and deletes stale ``data/<number>.jpg`` files (from a larger earlier ``n``), and leaves
anything else there alone. Any other non-empty directory is refused with ``FileExistsError``
so that a wrong ``--out`` can never clobber real data.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mmtag.atomic import atomic_write, atomic_write_many

__all__ = [
    "DEMO_CLASS_WORDS",
    "DEMO_LABEL_NAMES",
    "DOMINANT_LABEL",
    "MENTION_PROB",
    "make_demo_data",
    "render_sample",
]

# -- the classes -----------------------------------------------------------------------------

#: Class id -> name. Id 6 is skipped on purpose, like the real data skips 12, so that code that
#: assumes ids are ``1..K`` contiguous fails on the demo as it would on the competition.
DEMO_LABEL_NAMES: dict[int, str] = {
    1: "circle",
    2: "square",
    3: "triangle",
    4: "star",
    5: "cross",
    7: "ring",
    8: "diamond",
    9: "hexagon",
}

#: The class that plays the role of "person": present on about 70% of images.
DOMINANT_LABEL = 1
DOMINANT_PROB = 0.7

#: Relative frequency of the other classes (they are imbalanced, as in the real data).
_OTHER_WEIGHTS: dict[int, float] = {2: 0.24, 3: 0.20, 4: 0.16, 5: 0.13, 7: 0.11, 8: 0.09, 9: 0.07}

#: How many non-dominant labels an image gets, depending on whether the dominant one is there:
#: (counts, probabilities). Keeps every image at 1 to 4 labels, mean about 1.7.
_K_OTHER_WITH_DOMINANT = ((0, 1, 2, 3), (0.45, 0.35, 0.15, 0.05))
_K_OTHER_WITHOUT_DOMINANT = ((1, 2, 3, 4), (0.60, 0.28, 0.10, 0.02))

#: Words a caption may use for each class, as (singular, plural). No word of one class occurs
#: in another class's words or in the caption filler, so a mention is never ambiguous (the
#: tests rely on that to check captions never name an absent class).
DEMO_CLASS_WORDS: dict[int, tuple[tuple[str, str], ...]] = {
    1: (
        ("circle", "circles"),
        ("disc", "discs"),
        ("ball", "balls"),
        ("round shape", "round shapes"),
    ),
    2: (("square", "squares"), ("box", "boxes"), ("block", "blocks")),
    3: (("triangle", "triangles"), ("wedge", "wedges")),
    4: (("star", "stars"), ("five-pointed star", "five-pointed stars")),
    5: (("cross", "crosses"), ("plus sign", "plus signs")),
    7: (("ring", "rings"), ("hoop", "hoops"), ("donut", "donuts"), ("loop", "loops")),
    8: (("diamond", "diamonds"), ("rhombus", "rhombuses"), ("lozenge", "lozenges")),
    9: (("hexagon", "hexagons"), ("six-sided shape", "six-sided shapes")),
}

#: Probability that a caption mentions a given present class.
MENTION_PROB = 0.55
_COLOUR_WORD_PROB = 0.4
_SIZE_WORD_PROB = 0.15
_QUOTE_PROB = 0.04

# Named colours the shapes are painted in (a caption may name them, so they must look it).
_PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 215, 35),
    "orange": (245, 135, 25),
    "purple": (135, 50, 185),
    "pink": (245, 115, 180),
    "cyan": (35, 200, 215),
    "white": (248, 248, 248),
    "black": (20, 20, 20),
    "brown": (125, 75, 35),
}
_COLOUR_NAMES = tuple(_PALETTE)
_PREFERRED_COLOURS: dict[int, tuple[str, str]] = {
    1: ("red", "orange"),
    2: ("blue", "cyan"),
    3: ("green", "yellow"),
    4: ("yellow", "orange"),
    5: ("red", "white"),
    7: ("purple", "blue"),
    8: ("pink", "red"),
    9: ("brown", "green"),
}
_PREFERRED_PROB = 0.5

# Image geometry: longest side and aspect ratios (real data: mostly 320, some 250, a few tiny).
_LONG_SIDES = ((128, 100, 64), (0.75, 0.20, 0.05))
_ASPECTS = (1.0, 5 / 4, 4 / 3, 3 / 2, 16 / 9)
_SS = 2  # supersampling factor: draw at 2x and downscale, for anti-aliased edges
_JPEG_QUALITY = 85

_BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "noise": ("noisy", "grainy", "speckled"),
    "stripes": ("striped", "stripy", "lined"),
    "gradient": ("smooth", "faded", "shaded"),
    "blotches": ("blotchy", "mottled", "cloudy"),
}
_BACKGROUND_KINDS = tuple(_BACKGROUND_WORDS)

DEMO_DATA_MARKER = ".mmtag-demo.json"  # a folder of demo data that make_demo_data may refresh
_GENERATOR = "mmtag.data.demo"  # written into the marker; not __name__, which may be "__main__"
_FORMAT_VERSION = 1


# -- rendering -------------------------------------------------------------------------------


@dataclass
class DemoObject:
    """One drawn shape: class, colour name, centre and radius (output pixels), size word."""

    label: int
    colour: str
    cx: float
    cy: float
    r: float
    size: str = "medium"  # "small", "medium" or "big": lets a caption say "a tiny star" truthfully
    angle: float = 0.0  # rotation in [-pi, pi] (squares, plus signs, diamonds only tilt a little)


@dataclass
class DemoSample:
    """One generated sample: the image, its labels (row order) and what a caption may use."""

    image: Image.Image
    labels: list[int]
    objects: list[DemoObject] = field(default_factory=list)
    background: str = "noise"


def _sample_labels(rng: np.random.Generator) -> list[int]:
    """Draw 1 to 4 distinct labels, dominant class with probability ``DOMINANT_PROB``."""
    has_dominant = rng.random() < DOMINANT_PROB
    counts, probs = _K_OTHER_WITH_DOMINANT if has_dominant else _K_OTHER_WITHOUT_DOMINANT
    k = int(rng.choice(counts, p=probs))
    ids = np.array(list(_OTHER_WEIGHTS))
    w = np.array(list(_OTHER_WEIGHTS.values()))
    others = [int(c) for c in rng.choice(ids, size=k, replace=False, p=w / w.sum())]
    labels = ([DOMINANT_LABEL] if has_dominant else []) + others
    # The real files list labels in no particular order; do not sort them either.
    return [labels[i] for i in rng.permutation(len(labels))]


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) with a real-data-like spread of sizes and orientations."""
    long_side = int(rng.choice(_LONG_SIDES[0], p=_LONG_SIDES[1]))
    aspect = float(rng.choice(_ASPECTS))
    short_side = max(24, round(long_side / aspect))
    return (long_side, short_side) if rng.random() < 0.7 else (short_side, long_side)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise (h, w, 3), roughly unit variance: a coarse random grid upsampled.

    PIL's bilinear resize does the interpolation because it is many times faster than numpy
    fancy indexing at these sizes; the 8-bit quantisation is irrelevant for a texture.
    """
    gw = max(2, round(cells * w / h))
    grid = rng.standard_normal((cells + 1, gw + 1, 3))
    small = Image.fromarray(np.clip(128 + 40 * grid, 0, 255).astype(np.uint8), "RGB")
    big = np.asarray(small.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
    return (big - 128) / 40


def _background(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, str]:
    """A muted, textured, noisy background (h, w, 3) uint8 and the name of its texture.

    Made at output resolution (the shapes are drawn at ``_SS`` times that): the texture needs no
    anti-aliasing, and the numpy work is what dominates generation time.
    """
    kind = _BACKGROUND_KINDS[int(rng.integers(len(_BACKGROUND_KINDS)))]
    # Muted colours (low saturation, mid brightness) so the saturated shapes stand out, but not
    # always by much: black, white and brown shapes on some backgrounds are hard on purpose.
    base = (rng.uniform(70, 190) + rng.uniform(-30, 30, size=3)).astype(np.float32)
    other = (base + rng.uniform(-60, 60) + rng.uniform(-20, 20, size=3)).astype(np.float32)
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    t = None  # where each pixel lies between the two colours, (h, w) in [0, 1]
    if kind == "stripes":
        theta = rng.uniform(0, math.pi)
        freq = 2 * math.pi / rng.uniform(6, 20)  # period 6 to 20 pixels
        t = 0.5 + 0.5 * np.sin(
            ys * np.float32(math.sin(theta) * freq) + xs * np.float32(math.cos(theta) * freq)
        )
    elif kind == "gradient":
        theta = rng.uniform(0, 2 * math.pi)
        proj = ys * np.float32(math.sin(theta)) + xs * np.float32(math.cos(theta))
        t = (proj - proj.min()) / max(1e-6, float(np.ptp(proj)))
    elif kind == "blotches":
        t = np.clip(0.5 + 0.6 * _smooth_noise(rng, h, w, int(rng.integers(3, 7)))[..., 0], 0, 1)
    # In-place arithmetic: this function is most of the generation time.
    img = np.empty((h, w, 3), dtype=np.float32)
    if t is None:
        img[:] = base
    else:
        np.multiply(t[..., None], other - base, out=img)
        img += base
    blotches = _smooth_noise(rng, h, w, int(rng.integers(2, 5)))
    blotches *= 18
    img += blotches
    # Per-pixel grain, uniform rather than Gaussian: looks the same and is 5x cheaper to draw.
    amp = int(rng.integers(10, 39))
    img += rng.integers(-amp, amp + 1, size=(h, w, 3), dtype=np.int16)
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8), kind


def _polygon(cx: float, cy: float, radii: list[float], start: float) -> list[tuple[float, float]]:
    """Points at the given radii, evenly spaced in angle from ``start`` (a star, a hexagon...)."""
    n = len(radii)
    return [
        (
            cx + rad * math.cos(start + 2 * math.pi * i / n),
            cy + rad * math.sin(start + 2 * math.pi * i / n),
        )
        for i, rad in enumerate(radii)
    ]


def _rotated(
    points: list[tuple[float, float]], cx: float, cy: float, angle: float
) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


_MAX_TILT = math.radians(15)
# Outline of a plus sign of radius 1 whose arms are 0.6 wide, clockwise from the top arm.
# fmt: off
_PLUS_UNIT = (
    (-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3),
    (0.3, 1), (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3),
)
# fmt: on


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    o: DemoObject,
    scale: float,
    fill: tuple[int, int, int] | int,
    outline: tuple[int, int, int] | int | None,
) -> None:
    """Draw one object, its coordinates multiplied by ``scale`` (the drawing's)."""
    label, cx, cy, r, angle = o.label, o.cx * scale, o.cy * scale, o.r * scale, o.angle
    width = max(1, round(r * 0.08)) if outline is not None else 0
    # Squares, plus signs and diamonds only tilt a little: turned by 45 degrees a square would be
    # a diamond and a plus sign an "x". ``angle`` is in [-pi, pi].
    tilt = angle * (_MAX_TILT / math.pi)
    if label == 1:  # circle: filled disc
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline, width=width)
        return
    if label == 7:  # ring: thick hollow circle; the hole shows what is behind it
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, round(r * 0.32)))
        return
    if label == 2:
        pts = _polygon(cx, cy, [r * 0.9] * 4, math.pi / 4 + tilt)
    elif label == 3:
        pts = _polygon(cx, cy, [r] * 3, -math.pi / 2 + angle)
    elif label == 4:
        pts = _polygon(cx, cy, [r, r * 0.42] * 5, -math.pi / 2 + angle)
    elif label == 5:  # plus sign: a 12-gon made of two bars
        pts = [(cx + x * r, cy + y * r) for x, y in _PLUS_UNIT]
        pts = _rotated(pts, cx, cy, tilt)
    elif label == 8:  # diamond: a tall rhombus, so that it differs from a square
        pts = _rotated(
            [(cx, cy - r), (cx + 0.62 * r, cy), (cx, cy + r), (cx - 0.62 * r, cy)],
            cx,
            cy,
            tilt,
        )
    elif label == 9:
        pts = _polygon(cx, cy, [r] * 6, angle)
    else:
        raise ValueError(f"unknown demo label {label}")
    draw.polygon(pts, fill=fill, outline=outline, width=width)


def _pick_colour(
    rng: np.random.Generator, label: int, bg_mean: np.ndarray
) -> tuple[str, tuple[int, int, int]]:
    """A named colour for a shape, biased per class, and not too close to the background."""
    for _ in range(6):
        if rng.random() < _PREFERRED_PROB:
            name = _PREFERRED_COLOURS[label][int(rng.integers(2))]
        else:
            name = _COLOUR_NAMES[int(rng.integers(len(_COLOUR_NAMES)))]
        rgb = np.clip(np.array(_PALETTE[name]) + rng.integers(-18, 19, size=3), 0, 255)
        if np.abs(rgb - bg_mean).sum() > 110:
            break
    return name, (int(rgb[0]), int(rgb[1]), int(rgb[2]))


def _place(
    rng: np.random.Generator, w: int, h: int, r: float, placed: list[DemoObject]
) -> tuple[float, float]:
    """A centre for a shape of radius ``r``: may poke a little over the border and overlap others
    a little, but keeps clear of other centres so nothing is hidden completely."""
    best, best_gap = (w / 2, h / 2), -math.inf
    for _ in range(25):
        cx = rng.uniform(0.75 * r, max(0.75 * r + 1, w - 0.75 * r))
        cy = rng.uniform(0.75 * r, max(0.75 * r + 1, h - 0.75 * r))
        gap = min(
            (math.hypot(cx - o.cx, cy - o.cy) - 0.8 * (r + o.r) for o in placed), default=math.inf
        )
        if gap > 0:
            return cx, cy
        if gap > best_gap:
            best, best_gap = (cx, cy), gap
    return best


def _draw_clutter(
    rng: np.random.Generator, draw: ImageDraw.ImageDraw, w: int, h: int, count: int
) -> None:
    """Thin distractors that belong to no class: lines, zigzags, arcs and specks."""
    for _ in range(count):
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        kind = int(rng.integers(4))
        if kind == 0:
            pts = [(rng.uniform(0, w), rng.uniform(0, h)) for _ in range(2)]
            draw.line(pts, fill=colour, width=int(rng.integers(1, 4)) * _SS // 2 + 1)
        elif kind == 1:
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            pts = [(x, y)]
            for _ in range(int(rng.integers(3, 7))):
                x, y = x + rng.uniform(-0.15, 0.15) * w, y + rng.uniform(-0.15, 0.15) * h
                pts.append((x, y))
            draw.line(pts, fill=colour, width=_SS)
        elif kind == 2:
            x, y, s = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.1, 0.3) * min(w, h)
            a0 = rng.uniform(0, 360)
            draw.arc(
                (x - s, y - s, x + s, y + s), a0, a0 + rng.uniform(40, 160), fill=colour, width=_SS
            )
        else:
            for _ in range(int(rng.integers(4, 12))):
                x, y = rng.uniform(0, w), rng.uniform(0, h)
                draw.rectangle((x, y, x + _SS, y + _SS), fill=colour)


def render_sample(rng: np.random.Generator) -> DemoSample:
    """Draw one sample (image, labels, objects) from ``rng``.

    Public so tests and the demo can inspect what was drawn; the drawing order of random
    numbers is part of the on-disk format (changing it changes every file for a seed).
    """
    labels = _sample_labels(rng)
    w, h = _image_size(rng)
    W, H = w * _SS, h * _SS
    bg, bg_kind = _background(rng, w, h)
    bg_mean = bg[::4, ::4].reshape(-1, 3).mean(axis=0)  # a subsample is plenty for a contrast check
    # Nearest-neighbour upscaling then box reduction gives the background back unchanged.
    canvas = Image.fromarray(bg, "RGB").resize((W, H), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    _draw_clutter(rng, draw, W, H, int(rng.integers(1, 4)))
    objects, fills = _lay_out_objects(rng, labels, w, h, bg_mean)
    _draw_objects(rng, draw, objects, fills)
    _draw_clutter(rng, draw, W, H, int(rng.integers(1, 5)))  # some clutter on top, too
    image = canvas.reduce(_SS)
    return DemoSample(image=image, labels=labels, objects=objects, background=bg_kind)


def _lay_out_objects(
    rng: np.random.Generator, labels: list[int], w: int, h: int, bg_mean: np.ndarray
) -> tuple[list[DemoObject], list[tuple[int, int, int]]]:
    """The instances of each label (size, place, colour, angle) and their fill colours."""
    objects: list[DemoObject] = []
    fills: list[tuple[int, int, int]] = []
    short = min(w, h)
    for label in labels:
        # Instances per class: the dominant class, like people in a photo, often comes in groups.
        n_inst = int(
            rng.choice(
                (1, 2, 3), p=(0.6, 0.25, 0.15) if label == DOMINANT_LABEL else (0.8, 0.2, 0.0)
            )
        )
        for _ in range(n_inst):
            small = bool(rng.random() < 0.15)
            r = short * (rng.uniform(0.06, 0.09) if small else rng.uniform(0.10, 0.21))
            cx, cy = _place(rng, w, h, r, objects)
            name, fill = _pick_colour(rng, label, bg_mean)
            size = "small" if small else ("big" if r >= 0.17 * short else "medium")
            angle = float(rng.uniform(-math.pi, math.pi))
            objects.append(DemoObject(label, name, cx, cy, r, size, angle))
            fills.append(fill)
    return objects, fills


def _draw_objects(
    rng: np.random.Generator,
    draw: ImageDraw.ImageDraw,
    objects: list[DemoObject],
    fills: list[tuple[int, int, int]],
) -> None:
    """Draw the objects at drawing scale, some with a darker outline."""
    # Largest shapes first, so a small shape may sit on a big one but is never buried under it;
    # together with the spacing in _place every object stays at least partly visible.
    order = sorted(range(len(objects)), key=lambda i: -objects[i].r)
    for i in order:
        o, fill = objects[i], fills[i]
        outline = tuple(int(v * 0.45) for v in fill) if rng.random() < 0.3 else None
        _draw_shape(draw, o, _SS, fill, outline)


# -- captions --------------------------------------------------------------------------------

# "a" or "an": no class, colour or size word starts with a "you" sound, so the letter decides.
_VOWEL_START = re.compile(r"^[aeiou]", re.IGNORECASE)
_NUMBER_WORDS = {2: ("two", "a couple of", "a pair of"), 3: ("three", "a few", "several")}
_SIZE_WORDS = {"small": ("small", "tiny", "little"), "big": ("big", "large", "huge")}

# "{be}" agrees with the object list ("there is a star" / "there are two stars").
_TEMPLATES = (
    "{objs} on a {bg} background",
    "a {bg} picture with {objs}",
    "there {be} {objs} in this picture",
    "I can see {objs}",
    "{objs} scattered over a {bg} canvas",
    "close-up of {objs}",
    "what looks like {objs} on {bg} paper",
    "{objs}",
    "a drawing that shows {objs}",
    "here we have {objs}, drawn on a {bg} surface",
    "{objs} among some scribbles",
    "an image of {objs} with lines in the way",
    "{objs}, with some clutter around",
    "somebody drew {objs} on a {bg} sheet",
    "apparently {objs}",
)
# Captions may mention nothing useful, as some real ones do ("There is a street lined with...").
_EMPTY_TEMPLATES = (
    "a {bg} background covered in scribbles",
    "some random lines on a {bg} texture",
    "an abstract {bg} picture",
    "nothing much, just clutter",
    "a messy drawing on {bg} paper",
    "shapes on a {bg} background",
)
# Embedded quotations, free of class words. As in the real captions, a closing embedded quote is
# followed by a space or a full stop, or ends the caption.
_QUOTATIONS = (
    "hello, world",
    "shape test 3",
    "do not touch!",
    "draft",
    "no, not again...",
    "A, B, C",
    "Kaggle",
)


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _mention(rng: np.random.Generator, label: int, objs: list[DemoObject]) -> tuple[str, bool]:
    """A true noun phrase for the instances of one class ("a red star", "two discs") and
    whether it is grammatically plural."""
    sing, plural = DEMO_CLASS_WORDS[label][int(rng.integers(len(DEMO_CLASS_WORDS[label])))]
    if len(objs) > 1 and rng.random() < 0.6:
        count = _pick(rng, _NUMBER_WORDS[min(len(objs), 3)])
        colours = {o.colour for o in objs}
        colour = (
            colours.pop() + " " if len(colours) == 1 and rng.random() < _COLOUR_WORD_PROB else ""
        )
        return f"{count} {colour}{plural}", True
    # Describe one instance; "a star" is still true when there are two.
    o = objs[int(rng.integers(len(objs)))]
    words = []
    if o.size in _SIZE_WORDS and rng.random() < _SIZE_WORD_PROB:
        words.append(_pick(rng, _SIZE_WORDS[o.size]))
    if rng.random() < _COLOUR_WORD_PROB:
        words.append(o.colour)
    phrase = " ".join([*words, sing])
    return f"{'an' if _VOWEL_START.match(phrase) else 'a'} {phrase}", False


def _join(rng: np.random.Generator, phrases: list[tuple[str, bool]]) -> tuple[str, bool]:
    """Join noun phrases into a list; also say whether the result is grammatically plural."""
    if len(phrases) == 1:
        return phrases[0]
    if len(phrases) == 2:
        word = _pick(rng, ("and", "and", "with", "next to", "beside"))
        # "a star with a disc" is singular, like its first phrase; "a star and a disc" is not.
        return f" {word} ".join(p for p, _ in phrases), word == "and" or phrases[0][1]
    sep = _pick(rng, (" and ", ", and ", ", "))
    return ", ".join(p for p, _ in phrases[:-1]) + sep + phrases[-1][0], True


def make_caption(
    rng: np.random.Generator, sample: DemoSample, embedded_quotes: bool = True
) -> tuple[str, list[int]]:
    """A caption for ``sample`` and the labels it mentions.

    Each present class is mentioned with probability ``MENTION_PROB`` (possibly none); absent
    classes never are. ``embedded_quotes=False`` turns embedded double quotes into single ones.
    """
    by_label: dict[int, list[DemoObject]] = {}
    for o in sample.objects:
        by_label.setdefault(o.label, []).append(o)
    mentioned = [lab for lab in sample.labels if rng.random() < MENTION_PROB]
    mentioned = [mentioned[i] for i in rng.permutation(len(mentioned))]
    bg = _pick(rng, _BACKGROUND_WORDS[sample.background])
    if mentioned:
        objs, plural = _join(rng, [_mention(rng, lab, by_label[lab]) for lab in mentioned])
        cap = _pick(rng, _TEMPLATES).format(objs=objs, bg=bg, be="are" if plural else "is")
    else:
        objs = ""
        cap = _pick(rng, _EMPTY_TEMPLATES).format(bg=bg)

    ending = _pick(rng, ("", ".", ".", ".", "!", " ."))
    if rng.random() < _QUOTE_PROB:
        cap, ending = _add_quotation(rng, cap, objs, ending, embedded_quotes)
    return _restyle(rng, cap) + ending, mentioned


def _add_quotation(
    rng: np.random.Generator, cap: str, objs: str, ending: str, embedded_quotes: bool
) -> tuple[str, str]:
    """Work an embedded quotation into the caption; return the caption and its new ending.

    The quotes are written raw, as in the Kaggle files, unless ``embedded_quotes`` is False.
    """
    q = _pick(rng, _QUOTATIONS)
    form = int(rng.integers(3 if objs else 2))
    if form == 2:
        cap = f'a sign saying "{q}" is next to {objs}'
    else:
        cap = cap + _pick(rng, (' with a label that reads "{q}"', ', signed "{q}"')).format(q=q)
        if q[-1].isalnum() and rng.random() < 0.5:
            # Full stop inside the quotation, caption ending in '."' (as Kaggle's '"spray.""').
            cap, ending = cap[:-1] + '."', ""
    if not embedded_quotes:
        cap = cap.replace('"', "'")
    return cap, ending


def _restyle(rng: np.random.Generator, cap: str) -> str:
    """Letter case as people type it: mostly a capital first letter, sometimes not."""
    style = rng.random()
    if style < 0.64:
        return cap[0].upper() + cap[1:]
    if style < 0.70:
        return cap.title()
    if style < 0.72:
        return cap.upper()
    return cap.lower()


# -- writing the dataset ---------------------------------------------------------------------


def demo_data_complete(out: Path) -> bool:
    """Whether `out` holds a whole demo dataset (its CSVs are written last, together)."""
    return all((Path(out) / name).is_file()
               for name in ("train.csv", "test.csv", "test_labels.csv"))


def _prepare_out_dir(out: Path) -> None:
    """Create ``out``, or refresh it if an earlier demo run made it; refuse anything else."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"demo output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        marker = out / DEMO_DATA_MARKER
        try:
            ok = json.loads(marker.read_text(encoding="utf-8")).get("generator") == _GENERATOR
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise FileExistsError(
                f"refusing to write demo data into {out}: the directory is not empty and has no "
                f"{DEMO_DATA_MARKER} marker from an earlier demo run. Pick a new or empty directory."
            )
        # Our own earlier output: drop its images so none is left over from a larger n.
        data = out / "data"
        photos = list((out / "photos").glob("*/*.jpg")) if (out / "photos").is_dir() else []
        for p in [*(data.iterdir() if data.is_dir() else ()), *photos]:
            if p.suffix == ".jpg" and p.stem.isdigit() and p.is_file():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _readme(seed: int, n: int, n_test: int, embedded_quotes: bool) -> str:
    quotes = (
        "Captions are double-quoted; a few contain raw (unescaped) double quotes, as in the Kaggle\nfiles."
        if embedded_quotes
        else "Captions are double-quoted and contain no double quotes (embedded_quotes=False)."
    )
    classes = "\n".join(f"  {i:>2}  {name}" for i, name in DEMO_LABEL_NAMES.items())
    return f"""mmtag synthetic demo data (made by mmtag.data.demo.make_demo_data, seed={seed})

Same layout as the COMP5329 Kaggle data:
  train.csv        ImageID,Labels,Caption   {n} rows, 0.jpg .. {n - 1}.jpg
  test.csv         ImageID,Caption          {n_test} rows, {n}.jpg .. {n + n_test - 1}.jpg
  test_labels.csv  ImageID,Labels           the answers for test.csv (submission format)
  data/<id>.jpg    RGB JPEG images
  labels.txt       class id and name, one per line

Classes (id 6 is unused on purpose, like 12 in the real data; {DEMO_LABEL_NAMES[DOMINANT_LABEL]}
is on about {DOMINANT_PROB:.0%} of images, like person):
{classes}

Each image shows coloured shapes (one class per kind of shape) on a noisy textured background
with clutter. Each caption names some of the shapes present (each with probability
{MENTION_PROB}), never an absent one, so a good model needs both the image and the caption.
{quotes}

Re-running the generator on this directory overwrites the files above and deletes stale
data/<number>.jpg files; other files here are left alone.
"""


@dataclass
class _Tables:
    """The CSV lines of the dataset, built row by row, and tallies of the training labels."""

    train: list[str] = field(default_factory=lambda: ["ImageID,Labels,Caption\n"])
    test: list[str] = field(default_factory=lambda: ["ImageID,Caption\n"])
    answers: list[str] = field(default_factory=lambda: ["ImageID,Labels\n"])
    label_counts: dict[int, int] = field(default_factory=lambda: dict.fromkeys(DEMO_LABEL_NAMES, 0))
    n_labels: int = 0  # label occurrences over the training rows
    n_mentioned: int = 0  # of which the captions mention

    def add_train(self, image_id: str, labels: list[int], caption: str, mentioned: list[int]) -> None:
        # Kaggle style: caption always in double quotes, embedded quotes left as they are.
        self.train.append(f'{image_id},{_label_field(labels)},"{caption}"\n')
        for lab in labels:
            self.label_counts[lab] += 1
        self.n_labels += len(labels)
        self.n_mentioned += len(mentioned)

    def add_test(self, image_id: str, labels: list[int], caption: str) -> None:
        # the labels go to the answers file only, as in the competition
        self.test.append(f'{image_id},"{caption}"\n')
        self.answers.append(f"{image_id},{_label_field(labels)}\n")


def make_demo_data(
    out_dir: str | Path,
    n: int = 2000,
    seed: int = 0,
    n_test: int | None = None,
    *,
    embedded_quotes: bool = True,
) -> dict:
    """Write a synthetic dataset in the COMP5329 Kaggle layout into ``out_dir``.

    ``n`` labelled training rows (``0.jpg`` .. ``n-1.jpg``) and ``n_test`` (default ``n // 4``)
    test rows (``n.jpg`` onwards) whose labels go to ``test_labels.csv`` only. The same
    ``(seed, n, n_test, embedded_quotes)`` always gives byte-identical files.

    ``out_dir`` must be missing, empty, or an earlier output of this function (see the module
    docstring); otherwise ``FileExistsError``.

    Returns a summary: the paths written (as strings), ``n_train``, ``n_test``, ``seed``,
    ``label_names``, per-class ``label_counts`` and ``label_frequency`` (fraction of training
    images), ``mean_labels_per_image`` and ``caption_label_recall`` (the fraction of training
    labels that the captions mention: what a caption-only oracle could find).
    """
    n_test = _validated_sizes(n, n_test, seed)
    out = Path(out_dir)
    _prepare_out_dir(out)
    _write_marker(out, seed, n, n_test, embedded_quotes)
    image_dir = out / "data"
    image_dir.mkdir(exist_ok=True)
    tables = _write_images(image_dir, seed, n, n_test, embedded_quotes)
    paths = _write_tables(out, tables, _readme(seed, n, n_test, embedded_quotes))
    return {
        "out_dir": str(out),
        "image_dir": str(image_dir),
        **{k: str(v) for k, v in paths.items()},
        "n_train": n,
        "n_test": n_test,
        "seed": seed,
        "label_names": dict(DEMO_LABEL_NAMES),
        "label_counts": tables.label_counts,
        "label_frequency": {lab: c / n for lab, c in tables.label_counts.items()},
        "mean_labels_per_image": tables.n_labels / n,
        "caption_label_recall": tables.n_mentioned / max(1, tables.n_labels),
    }


def _validated_sizes(n: int, n_test: int | None, seed: int) -> int:
    """Check the arguments before anything is written; return ``n_test`` (default ``n // 4``)."""
    # bool is an int subclass: n=True must not quietly mean one row
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    n_test = n // 4 if n_test is None else n_test
    if isinstance(n_test, bool) or not isinstance(n_test, int) or n_test < 0:
        raise ValueError(f"n_test must be a non-negative integer, got {n_test!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return n_test


def _write_marker(out: Path, seed: int, n: int, n_test: int, embedded_quotes: bool) -> None:
    """Mark the folder as ours first, so that a run killed halfway can still be refreshed."""
    marker = {
        "embedded_quotes": embedded_quotes,
        "generator": _GENERATOR,
        "format_version": _FORMAT_VERSION,
        "seed": seed,
        "n": n,
        "n_test": n_test,
    }
    atomic_write(out / DEMO_DATA_MARKER, json.dumps(marker, indent=2, sort_keys=True) + "\n")


def _write_images(
    image_dir: Path, seed: int, n: int, n_test: int, embedded_quotes: bool
) -> _Tables:
    """Render and save every image (train rows, then test rows); return the CSV lines."""
    tables = _Tables()
    for i in range(n + n_test):
        # One generator per image: files do not depend on how (or in what order) rows are made.
        rng = np.random.default_rng([seed, i])
        sample = render_sample(rng)
        caption, mentioned = make_caption(rng, sample, embedded_quotes)
        image_id = f"{i}.jpg"
        sample.image.save(image_dir / image_id, "JPEG", quality=_JPEG_QUALITY)
        if i < n:
            tables.add_train(image_id, sample.labels, caption, mentioned)
        else:
            tables.add_test(image_id, sample.labels, caption)
    return tables


def _label_field(labels: list[int]) -> str:
    return " ".join(str(lab) for lab in labels)


def _write_tables(out: Path, tables: _Tables, readme: str) -> dict[str, Path]:
    """Write the CSVs, labels.txt and README.txt together; return their paths by summary key."""
    paths = {
        "train_csv": out / "train.csv",
        "test_csv": out / "test.csv",
        "test_labels_csv": out / "test_labels.csv",
        "labels_txt": out / "labels.txt",
        "readme": out / "README.txt",
    }
    # after every image, all together: a run killed before this point has no CSV, so the next
    # one generates the data again instead of trusting a part of it (see demo_data_complete)
    atomic_write_many([
        (paths["train_csv"], "".join(tables.train)),
        (paths["test_csv"], "".join(tables.test)),
        (paths["test_labels_csv"], "".join(tables.answers)),
        (paths["labels_txt"], "".join(f"{i} {name}\n" for i, name in DEMO_LABEL_NAMES.items())),
        (paths["readme"], readme),
    ])
    return paths


# -- the table style: a product catalogue with string tags -------------------------------------

TABLE_FILES = ("catalogue.csv", "holdout.csv", "new.csv")


def make_table_demo(out_dir: str | Path, n: int = 400, seed: int = 0) -> dict:
    """The demo samples as a product catalogue, the layout an engineer's own data has:

        catalogue.csv   path,title,tags   n labelled rows (tags: shape names, '|' between)
        holdout.csv     path,title,tags   n // 4 more, for `mmtag evaluate --csv`
        new.csv         path,title        the same photos without tags, for `mmtag predict`
        photos/<tag>/<i>.jpg              in subfolders by their first tag

    Train on it with `--data DIR/catalogue.csv --image-col path --caption-col title
    --labels-col tags`. The same (n, seed) gives byte-identical files."""
    n_test = _validated_sizes(n, None, seed)
    out = Path(out_dir)
    _prepare_out_dir(out)
    atomic_write(out / DEMO_DATA_MARKER, json.dumps(
        {"generator": _GENERATOR, "style": "table", "seed": seed, "n": n}, indent=2) + "\n")
    rows = []
    for i in range(n + n_test):
        rng = np.random.default_rng([seed, i])
        sample = render_sample(rng)
        caption, _ = make_caption(rng, sample, False)
        tags = [DEMO_LABEL_NAMES[lab] for lab in sample.labels]
        path = f"{tags[0]}/{i}.jpg"
        (out / "photos" / tags[0]).mkdir(parents=True, exist_ok=True)
        sample.image.save(out / "photos" / path, "JPEG", quality=_JPEG_QUALITY)
        rows.append((path, caption, "|".join(tags)))
    files = [out / name for name in TABLE_FILES]
    atomic_write_many([(files[0], _table_csv(rows[:n], tags=True)),
                       (files[1], _table_csv(rows[n:], tags=True)),
                       (files[2], _table_csv(rows[n:], tags=False))])
    return {"out_dir": str(out), "images": str(out / "photos"),
            **{f.stem: str(f) for f in files}, "n_train": n, "n_holdout": n_test, "seed": seed,
            "labels": sorted(DEMO_LABEL_NAMES.values())}


def _table_csv(rows: list[tuple[str, str, str]], tags: bool) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "title", "tags"] if tags else ["path", "title"])
    w.writerows(r if tags else r[:2] for r in rows)
    return buf.getvalue()
