"""The embedded synthetic benchmark: ``vldus make-shapes`` (the stand-in for COCO without data).

Classes are compositions of two visual attributes, a shape and a colour ("red circle"), so an
unseen class ("blue circle") is described by attributes that seen classes carry ("blue square",
"red circle"). That is what makes zero-shot detection possible here: the semantic embedding of a
class is its attribute vector (:func:`attribute_matrix`).

Output layout (docs/formats.md)::

    DIR/images/train_000001.png ...        RGB PNG, image_size x image_size
    DIR/images/test_000001.png ...
    DIR/images/val_000001.png ...
    DIR/annotations/instances_train.json   COCO detection format (ids 1.., bbox [x, y, w, h] px)
    DIR/annotations/instances_test.json
    DIR/annotations/instances_val.json
    DIR/split.json                         {"name": "shapes", "classes", "seen", "unseen"}
    DIR/attributes.npy                     (C+1, d) float32, row 0 = background

Images are not trivially easy: a smooth random colour background (gradient, soft blobs,
texture), clutter (grey/brown/purple shapes and partial shapes, lines and arcs, some of them thin
strokes in class colours), objects of 8-35 % of the image side with random rotation, mild
aspect change, colour jitter and optional outline, 2-6 objects per image with bounded
occlusion, an illumination field and pixel noise. Each box is the tight box of the visible
(not occluded) pixels of its object.

Defaults (chosen for a 2-core CPU demo): 160 px images (objects 13-56 px across; a
MobileNetV2-FPN detector resizes them anyway), 600 train / 200 test / 75 validation images,
2-6 objects each. Train: 85 % of images all-seen, 10 % mixed, 5 % all-unseen (the last two are
dropped by the training rule, as in COCO). Test: 15 % all-seen, 50 % mixed, 35 % all-unseen, so
ZSD and GZSD both have about a hundred objects per unseen class. Validation: all-seen images
(no unseen object anywhere), never trained on; by default 1/8 of the train count, so validating
the detector and extracting its RoI features (GZSD calibration) stay cheap. Class frequencies
are balanced within the seen and within the unseen group. Generation: about 7 ms of one core per 160 px image
(4 ms drawing, 3 ms PNG encoding).

Determinism: every image is drawn from its own generator seeded with (seed, split, index), and
files are written with fixed PNG/JSON settings, so the same options give byte-identical files.
"""
from __future__ import annotations

import argparse
import colorsys
import os
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from vldus.errors import InputError
from vldus.files import save_npy, write_json

# --- class vocabulary ---------------------------------------------------------------------
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
# Attribute dimensions: one-hot shape, one-hot colour, then 'background' (1 only in row 0).
ATTRIBUTE_NAMES: tuple[str, ...] = SHAPES + COLOURS + ("background",)
# Category order = detector order: shape-major ("red circle", "green circle", ...).
CLASSES: tuple[str, ...] = tuple(f"{c} {s}" for s in SHAPES for c in COLOURS)
# A Latin-square diagonal: one unseen class per shape and per colour, so each unseen class
# shares its shape with three seen classes and its colour with three others.
DEFAULT_UNSEEN: tuple[str, ...] = ("blue circle", "red square", "yellow triangle", "green star")

# Class colours as HSV ranges (hue in degrees, may wrap below 0). Hues are >= 50 degrees apart
# and saturation/value stay high, so jittered colours never cross into another class colour
# or into the muted distractor colours below.
CLASS_HSV: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "red": ((-7.0, 7.0), (0.75, 1.0), (0.70, 1.0)),
    "green": ((108.0, 132.0), (0.65, 1.0), (0.55, 0.90)),
    "blue": ((212.0, 232.0), (0.70, 1.0), (0.65, 1.0)),
    "yellow": ((50.0, 60.0), (0.75, 1.0), (0.82, 1.0)),
}
# Colours of clutter shapes: grey, dark brown, dull purple (never a class colour).
DISTRACTOR_HSV: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "grey": ((0.0, 360.0), (0.0, 0.08), (0.25, 0.85)),
    "brown": ((18.0, 32.0), (0.40, 0.60), (0.22, 0.42)),
    "purple": ((270.0, 295.0), (0.30, 0.55), (0.35, 0.65)),
}


@dataclass(frozen=True)
class ShapesStyle:
    """How images are drawn. Sizes are fractions of the image side; colours 0..255."""

    supersample: int = 2                   # draw at 2x, then box-filter down (anti-aliasing)
    objects_per_image: tuple[int, int] = (2, 6)
    object_size: tuple[float, float] = (0.08, 0.35)  # circumscribed diameter, log-uniform
    aspect_jitter: float = 0.15            # x/y scale in [1-a, 1+a]
    outline_prob: float = 0.3              # darker outline of the same hue
    min_visible: float = 0.7               # min visible fraction of every object
    min_box_iou: float = 0.85              # visible box vs full box
    place_tries: int = 30
    background_sat: float = 0.35           # max saturation of background colours
    blobs: tuple[int, int] = (2, 5)
    clutter_shapes: tuple[int, int] = (3, 8)
    clutter_strokes: tuple[int, int] = (3, 8)
    clutter_size: tuple[float, float] = (0.06, 0.30)
    partial_prob: float = 0.5              # clutter shape cut by a random half-plane
    class_colour_stroke_prob: float = 0.3  # thin line/arc drawn in a class colour
    strokes_on_top: tuple[int, int] = (0, 2)
    texture_amp: float = 10.0
    illumination: tuple[float, float] = (0.85, 1.12)
    noise_sigma: tuple[float, float] = (3.0, 9.0)


# Image composition per split: fractions of images that are all-seen / mixed / all-unseen.
TRAIN_MIX = {"seen": 0.85, "mixed": 0.10, "unseen": 0.05}
TEST_MIX = {"seen": 0.15, "mixed": 0.50, "unseen": 0.35}
VAL_MIX = {"seen": 1.0, "mixed": 0.0, "unseen": 0.0}
DEFAULT_TRAIN_IMAGES = 600
DEFAULT_TEST_IMAGES = 200
VAL_FRACTION = 0.125  # default validation images per training image
DEFAULT_IMAGE_SIZE = 160
MIN_IMAGE_SIZE = 64
PNG_COMPRESS_LEVEL = 1  # fast; any fixed level keeps output byte-identical


# --- class names and attributes ---------------------------------------------------------
def parse_class_name(name: str, source: str = "class names") -> tuple[str, str]:
    """'Red circle' / 'red_circle' -> ('red', 'circle'); InputError for anything else."""
    words = [w for w in re.split(r"[\s_\-]+", name.strip().lower()) if w]
    if len(words) == 2 and words[0] in COLOURS and words[1] in SHAPES:
        return words[0], words[1]
    raise InputError(source, f"{name!r}: unknown class name (expected '<colour> <shape>' with "
                             f"colour in {list(COLOURS)} and shape in {list(SHAPES)})")


def attribute_matrix(class_names: Sequence[str], source: str = "class names") -> np.ndarray:
    """Class attribute vectors, (C+1, d) float32 with d = len(ATTRIBUTE_NAMES).

    Row 0 is background: zero everywhere except the last ('background') dimension.
    Row k (1..C) is class_names[k-1]: one-hot shape, one-hot colour, background 0.
    """
    a = np.zeros((len(class_names) + 1, len(ATTRIBUTE_NAMES)), np.float32)
    a[0, ATTRIBUTE_NAMES.index("background")] = 1.0
    for k, name in enumerate(class_names, start=1):
        colour, shape = parse_class_name(name, source)
        a[k, ATTRIBUTE_NAMES.index(shape)] = 1.0
        a[k, ATTRIBUTE_NAMES.index(colour)] = 1.0
    return a


def check_unseen(unseen: Sequence[str], classes: Sequence[str] = CLASSES,
                 source: str = "--unseen") -> tuple[str, ...]:
    """Canonical unseen names; InputError if a name is unknown or zero-shot is impossible.

    Zero-shot needs every unseen class's shape and colour to occur among the seen classes,
    and at least one seen and one unseen class.
    """
    canon = []
    for name in unseen:
        colour, shape = parse_class_name(name, source)
        full = f"{colour} {shape}"
        if full not in classes:
            raise InputError(source, f"{name!r}: not one of the classes {list(classes)}")
        if full in canon:
            raise InputError(source, f"{name!r}: listed twice")
        canon.append(full)
    if not canon:
        raise InputError(source, "no unseen classes given")
    seen = [c for c in classes if c not in canon]
    if not seen:
        raise InputError(source, "every class is unseen: no seen class left to train on")
    seen_attrs = {part for c in seen for part in c.split()}
    for full in canon:
        for part in full.split():
            if part not in seen_attrs:
                raise InputError(source, f"{full!r}: attribute {part!r} belongs to no seen class, "
                                         "so this class cannot be learned zero-shot")
    return tuple(c for c in classes if c in canon)  # category order


# --- drawing --------------------------------------------------------------------------------
def _unit_polygon(shape: str) -> np.ndarray:
    """Outline of a shape inscribed in the unit circle, (K, 2)."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return 0.88 * np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "square":
        t = np.deg2rad(45 + 90 * np.arange(4))
    elif shape == "triangle":
        t = np.deg2rad(-90 + 120 * np.arange(3))
    elif shape == "star":
        t = np.deg2rad(-90 + 36 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    elif shape == "hexagon":
        t = np.deg2rad(60 * np.arange(6))
    elif shape == "rectangle":
        return np.array([[-1, -0.45], [1, -0.45], [1, 0.45], [-1, 0.45]], float)
    elif shape == "ellipse":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        return np.stack([np.cos(t), 0.5 * np.sin(t)], 1)
    else:
        raise ValueError(shape)
    return np.stack([np.cos(t), np.sin(t)], 1)


CLUTTER_SHAPES = SHAPES + ("hexagon", "rectangle", "ellipse")
_UNIT = {s: _unit_polygon(s) for s in CLUTTER_SHAPES}


def _place(poly: np.ndarray, centre: np.ndarray, radius: float, angle: float,
           scale: tuple[float, float]) -> np.ndarray:
    """Scale, rotate and translate a unit polygon, (K, 2) -> (K, 2) pixels."""
    c, s = np.cos(angle), np.sin(angle)
    p = poly * np.asarray(scale) * radius
    return p @ np.array([[c, s], [-s, c]]) + centre


def _cut_half_plane(poly: np.ndarray, point: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Keep the part of a convex-or-not polygon where (p - point) . normal >= 0 (Sutherland-Hodgman)."""
    out = []
    d = (poly - point) @ normal
    for i in range(len(poly)):
        j = (i + 1) % len(poly)
        if d[i] >= 0:
            out.append(poly[i])
        if (d[i] >= 0) != (d[j] >= 0):
            t = d[i] / (d[i] - d[j])
            out.append(poly[i] + t * (poly[j] - poly[i]))
    return np.asarray(out).reshape(-1, 2)


def _hsv_colour(rng: np.random.Generator, hsv_range) -> tuple[int, int, int]:
    (h0, h1), (s0, s1), (v0, v1) = hsv_range
    h = (rng.uniform(h0, h1) % 360.0) / 360.0
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(s0, s1), rng.uniform(v0, v1))
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _muted_colour(rng: np.random.Generator, max_sat: float) -> tuple[int, int, int]:
    return _hsv_colour(rng, ((0.0, 360.0), (0.0, max_sat), (0.3, 0.9)))


def _flat(poly: np.ndarray) -> list[float]:
    return [float(v) for v in poly.reshape(-1)]


@dataclass
class _Object:
    label: int          # index into CLASSES (0-based)
    box: np.ndarray     # int xyxy (x1, y1 exclusive) of the full, unoccluded silhouette (canvas px)
    area: int           # pixels of the full silhouette
    visible: int        # pixels not covered by later objects


def _background(rng: np.random.Generator, size: int, canvas: int, style: ShapesStyle) -> Image.Image:
    """Smooth colour gradient with soft blobs, (canvas, canvas) RGB."""
    grid = np.array([[_muted_colour(rng, style.background_sat) for _ in range(3)] for _ in range(3)],
                    np.uint8)
    low = 32  # drawn small, then blurred and enlarged: smooth at no cost
    img = Image.fromarray(grid).resize((low, low), Image.BICUBIC)
    draw = ImageDraw.Draw(img, "RGBA")
    for _ in range(rng.integers(style.blobs[0], style.blobs[1] + 1)):
        cx, cy = rng.uniform(0, low, 2)
        rx, ry = rng.uniform(0.1, 0.35, 2) * low
        colour = _muted_colour(rng, style.background_sat + 0.1)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour + (int(rng.integers(90, 170)),))
    # Smooth at the output size; the supersampled canvas only needs to repeat its pixels.
    img = img.filter(ImageFilter.GaussianBlur(1.0)).resize((size, size), Image.BILINEAR)
    return img.resize((canvas, canvas), Image.NEAREST) if canvas != size else img


def _draw_clutter_shape(draw: ImageDraw.ImageDraw, rng: np.random.Generator, canvas: int,
                        style: ShapesStyle) -> None:
    """A filled shape (maybe cut in part) in a non-class colour."""
    shape = CLUTTER_SHAPES[rng.integers(len(CLUTTER_SHAPES))]
    radius = rng.uniform(*style.clutter_size) * canvas / 2
    poly = _place(_UNIT[shape], rng.uniform(0, canvas, 2), radius, rng.uniform(0, 2 * np.pi),
                  tuple(1 + rng.uniform(-style.aspect_jitter, style.aspect_jitter, 2)))
    if rng.random() < style.partial_prob:
        angle = rng.uniform(0, 2 * np.pi)
        poly = _cut_half_plane(poly, poly.mean(0) + rng.uniform(-0.4, 0.4) * radius * np.ones(2),
                               np.array([np.cos(angle), np.sin(angle)]))
    if len(poly) >= 3:
        colour = _hsv_colour(rng, list(DISTRACTOR_HSV.values())[rng.integers(len(DISTRACTOR_HSV))])
        draw.polygon(_flat(poly), fill=colour)


def _draw_stroke(draw: ImageDraw.ImageDraw, rng: np.random.Generator, canvas: int,
                 style: ShapesStyle, thin: bool = False) -> None:
    """A line or an arc, in a distractor colour or (sometimes, always thin) a class colour."""
    ss = style.supersample
    if rng.random() < style.class_colour_stroke_prob:
        colour = _hsv_colour(rng, CLASS_HSV[COLOURS[rng.integers(len(COLOURS))]])
        width = int(rng.integers(ss // 2 + 1, ss + 1))
    else:
        colour = _hsv_colour(rng, list(DISTRACTOR_HSV.values())[rng.integers(len(DISTRACTOR_HSV))])
        width = int(rng.integers(1, 2 if thin else 5)) * ss
    if rng.random() < 0.5:
        draw.line([float(v) for v in rng.uniform(0, canvas, 4)], fill=colour, width=width)
    else:
        cx, cy = rng.uniform(0, canvas, 2)
        r = rng.uniform(0.1, 0.4) * canvas
        start = float(rng.uniform(0, 360))
        draw.arc([cx - r, cy - r, cx + r, cy + r], start, start + float(rng.uniform(40, 200)),
                 fill=colour, width=width)


def _object_polygon(rng: np.random.Generator, label: int, canvas: int, style: ShapesStyle,
                    shrink: float) -> np.ndarray:
    """A class object's outline at a random place fully inside the canvas, (K, 2) pixels."""
    shape = CLASSES[label].split()[1]
    lo, hi = np.log(style.object_size[0]), np.log(style.object_size[1])
    diameter = max(style.object_size[0], np.exp(rng.uniform(lo, hi)) * shrink) * canvas
    radius = diameter / 2
    a = style.aspect_jitter
    scale = (1 + rng.uniform(-a, a), 1 + rng.uniform(-a, a))
    r_max = radius * max(scale) + style.supersample
    centre = rng.uniform(r_max, canvas - r_max, 2)
    return _place(_UNIT[shape], centre, radius, rng.uniform(0, 2 * np.pi), scale)


def _polygon_mask(poly: np.ndarray, canvas: int) -> np.ndarray:
    m = Image.new("L", (canvas, canvas), 0)
    ImageDraw.Draw(m).polygon(_flat(poly), fill=255, outline=255)
    return np.asarray(m) > 0


def _mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight box of a non-empty bool mask, int xyxy with x1, y1 exclusive (pixel edges)."""
    ys = np.flatnonzero(mask.any(1))
    xs = np.flatnonzero(mask.any(0))
    return np.array([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], np.int64)


def _visible_box(owner: np.ndarray, k: int, ob: _Object, cover: np.ndarray | None = None) -> np.ndarray:
    """Tight box of the pixels object k owns (minus ``cover``), searched inside its full box."""
    x0, y0, x1, y1 = ob.box
    vis = owner[y0:y1, x0:x1] == k
    if cover is not None:
        vis &= ~cover[y0:y1, x0:x1]
    return _mask_box(vis) + np.array([x0, y0, x0, y0])


def _output_box(owner: np.ndarray, k: int, ob: _Object, ss: int) -> np.ndarray:
    """Box of object k in output pixels: the tight box of the output pixels that the object's
    visible part covers at least half of (so thin tips blended into the background do not count)."""
    x0, y0 = (ob.box[:2] // ss) * ss
    x1, y1 = -(-ob.box[2:] // ss) * ss
    vis = owner[y0:y1, x0:x1] == k
    cover = vis.reshape((y1 - y0) // ss, ss, (x1 - x0) // ss, ss).mean((1, 3))
    pixels = cover >= 0.5 if (cover >= 0.5).any() else cover > 0
    return _mask_box(pixels) + np.array([x0, y0, x0, y0]) // ss


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _occlusion(objects: list[_Object], owner: np.ndarray, mask: np.ndarray,
               style: ShapesStyle) -> np.ndarray | None:
    """Pixels each object would lose under a new object ``mask``, or None if that is too many.

    Too many: an object would keep less than ``min_visible`` of its area, or its visible box
    would drift from its full box (IoU < ``min_box_iou``).
    """
    x0, y0, x1, y1 = _mask_box(mask)
    covered = owner[y0:y1, x0:x1][mask[y0:y1, x0:x1]]
    lost = np.bincount(covered[covered >= 0], minlength=len(objects))
    for k in np.flatnonzero(lost):
        ob = objects[k]
        if ob.visible - lost[k] < style.min_visible * ob.area:
            return None
        if _iou(_visible_box(owner, k, ob, cover=mask), ob.box) < style.min_box_iou:
            return None
    return lost


def render_image(rng: np.random.Generator, labels: Sequence[int], size: int,
                 style: ShapesStyle = ShapesStyle()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one image with objects of the given class indices (0-based into CLASSES).

    Returns (image uint8 (size, size, 3), boxes float64 (N, 4) xyxy in pixels, labels int64 (N,)).
    Objects that cannot be placed within the occlusion limits are dropped (rare); the
    first object is always placed.
    """
    ss = style.supersample
    canvas = size * ss
    img = _background(rng, size, canvas, style)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(style.clutter_shapes[0], style.clutter_shapes[1] + 1)):
        _draw_clutter_shape(draw, rng, canvas, style)
    for _ in range(rng.integers(style.clutter_strokes[0], style.clutter_strokes[1] + 1)):
        _draw_stroke(draw, rng, canvas, style)

    objects: list[_Object] = []
    owner = np.full((canvas, canvas), -1, np.int16)  # index of the object that owns each pixel
    for label in labels:
        for attempt in range(style.place_tries):
            poly = _object_polygon(rng, label, canvas, style, shrink=0.93 ** attempt)
            mask = _polygon_mask(poly, canvas)
            lost = _occlusion(objects, owner, mask, style)
            if lost is None:
                continue
            for ob, n in zip(objects, lost):
                ob.visible -= int(n)
            area = int(mask.sum())
            objects.append(_Object(label, _mask_box(mask), area, area))
            owner[mask] = len(objects) - 1
            fill = _hsv_colour(rng, CLASS_HSV[CLASSES[label].split()[0]])
            if rng.random() < style.outline_prob:
                dark = tuple(int(v * rng.uniform(0.5, 0.7)) for v in fill)
                draw.polygon(_flat(poly), fill=fill, outline=dark, width=ss)
            else:
                draw.polygon(_flat(poly), fill=fill, outline=fill)
            break
    for _ in range(rng.integers(style.strokes_on_top[0], style.strokes_on_top[1] + 1)):
        _draw_stroke(draw, rng, canvas, style, thin=True)

    # Down to the output size, then a smooth illumination field, texture and pixel noise.
    img = img.reduce(ss) if ss > 1 else img
    light = rng.uniform(*style.illumination, (2, 2)).astype(np.float32)
    light = np.asarray(Image.fromarray(light, "F").resize((size, size), Image.BILINEAR))
    tex = rng.normal(0.0, style.texture_amp, (size // 4, size // 4)).astype(np.float32)
    tex = np.asarray(Image.fromarray(tex, "F").resize((size, size), Image.BILINEAR))
    noise = rng.standard_normal((size, size, 3), dtype=np.float32) * rng.uniform(*style.noise_sigma)
    arr = np.asarray(img, np.float32) * light[..., None] + tex[..., None] + noise
    image = np.clip(np.rint(arr), 0, 255).astype(np.uint8)

    boxes = np.array([_output_box(owner, k, ob, ss) for k, ob in enumerate(objects)], np.float64)
    return image, boxes.reshape(-1, 4), np.array([ob.label for ob in objects], np.int64)


# --- image composition ---------------------------------------------------------------------
def _bag(rng: np.random.Generator, items: Sequence[int]) -> Iterator[int]:
    """Endless draw that cycles through shuffled copies of ``items`` (balanced frequencies)."""
    while True:
        yield from (items[i] for i in rng.permutation(len(items)))


def plan_split(rng: np.random.Generator, n_images: int, mix: dict[str, float],
               seen: Sequence[int], unseen: Sequence[int], style: ShapesStyle) -> list[list[int]]:
    """Class indices of the objects of each image (most important first).

    ``mix`` gives the fraction of images that are all-seen, mixed (>= 1 of each) and
    all-unseen. Within each group, classes are drawn from a shuffled bag, so frequencies
    are balanced.
    """
    counts = {k: int(round(v * n_images)) for k, v in mix.items()}
    counts["seen"] += n_images - sum(counts.values())
    kinds = [k for k in ("seen", "mixed", "unseen") for _ in range(counts[k])]
    kinds = [kinds[i] for i in rng.permutation(len(kinds))]
    seen_bag, unseen_bag = _bag(rng, list(seen)), _bag(rng, list(unseen))
    plans = []
    for kind in kinds:
        n = int(rng.integers(style.objects_per_image[0], style.objects_per_image[1] + 1))
        if kind == "seen":
            plans.append([next(seen_bag) for _ in range(n)])
        elif kind == "unseen":
            plans.append([next(unseen_bag) for _ in range(n)])
        else:
            n_unseen = int(rng.integers(1, n))
            plan = [next(unseen_bag), next(seen_bag)]
            plan += [next(unseen_bag) for _ in range(n_unseen - 1)]
            plan += [next(seen_bag) for _ in range(n - n_unseen - 1)]
            plans.append(plan)
    return plans


# --- writing -----------------------------------------------------------------------------
def _coco_box(xyxy: np.ndarray) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    return [x0, y0, x1 - x0, y1 - y0]


SPLIT_CODES = {"train": 1, "test": 2, "val": 3}


def default_val_images(train_images: int) -> int:
    """The default validation size: :data:`VAL_FRACTION` of the training images, at least 1."""
    return max(1, round(VAL_FRACTION * train_images))


def make_shapes(out_dir: str | os.PathLike, seed: int = 0, train_images: int = DEFAULT_TRAIN_IMAGES,
                test_images: int = DEFAULT_TEST_IMAGES, image_size: int = DEFAULT_IMAGE_SIZE,
                unseen: Sequence[str] | None = None, progress: bool = True,
                style: ShapesStyle = ShapesStyle(), val_images: int | None = None) -> dict:
    """Write the shapes benchmark to ``out_dir`` (layout in the module docstring).

    ``val_images``: None = :func:`default_val_images` of ``train_images``. Returns a summary:
    {"train"/"test"/"val": {"images", "objects", "per_class": {name: n}, "images_with_unseen",
    "unseen_only"}, "seen": [...], "unseen": [...]}.
    """
    val_images = default_val_images(train_images) if val_images is None else val_images
    for name, n in (("--train-images", train_images), ("--test-images", test_images),
                    ("--val-images", val_images)):
        if n < 1:
            raise InputError(name, f"{n}: must be at least 1")
    if image_size < MIN_IMAGE_SIZE:
        raise InputError("--image-size", f"{image_size}: must be at least {MIN_IMAGE_SIZE} px "
                                         "(smaller objects would be under ~5 px)")
    unseen_names = check_unseen(DEFAULT_UNSEEN if unseen is None else unseen)
    seen_names = tuple(c for c in CLASSES if c not in unseen_names)
    seen_idx = [CLASSES.index(c) for c in seen_names]
    unseen_idx = [CLASSES.index(c) for c in unseen_names]

    img_dir = os.path.join(out_dir, "images")
    ann_dir = os.path.join(out_dir, "annotations")
    try:
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
    except OSError as e:
        raise InputError(out_dir, f"cannot create the output folder ({e.strerror})") from None
    categories = [{"id": i + 1, "name": c, "supercategory": c.split()[1]} for i, c in enumerate(CLASSES)]

    summary: dict = {"seen": list(seen_names), "unseen": list(unseen_names)}
    written = set()
    next_image_id, next_ann_id = 1, 1
    # val last, so train and test keep the image ids (and bytes) they had before val existed
    for split_name, n_images, mix in (("train", train_images, TRAIN_MIX), ("test", test_images, TEST_MIX),
                                      ("val", val_images, VAL_MIX)):
        code = SPLIT_CODES[split_name]
        plans = plan_split(np.random.default_rng([seed, code, 0]), n_images, mix, seen_idx, unseen_idx, style)
        images, annotations = [], []
        per_class = {c: 0 for c in CLASSES}
        with_unseen = unseen_only = 0
        for i, plan in enumerate(tqdm(plans, desc=f"make-shapes {split_name}", disable=not progress,
                                      unit="img")):
            rng = np.random.default_rng([seed, code, i + 1])
            image, boxes, labels = render_image(rng, plan, image_size, style)
            file_name = f"{split_name}_{i + 1:06d}.png"
            Image.fromarray(image).save(os.path.join(img_dir, file_name),
                                        compress_level=PNG_COMPRESS_LEVEL)
            written.add(file_name)
            images.append({"id": next_image_id, "file_name": file_name,
                           "width": image_size, "height": image_size})
            for box, label in zip(boxes, labels):
                bbox = _coco_box(box)
                annotations.append({"id": next_ann_id, "image_id": next_image_id,
                                    "category_id": int(label) + 1, "bbox": bbox,
                                    "area": bbox[2] * bbox[3], "iscrowd": 0})
                per_class[CLASSES[label]] += 1
                next_ann_id += 1
            is_unseen = np.isin(labels, unseen_idx)
            with_unseen += bool(is_unseen.any())
            unseen_only += bool(is_unseen.all())
            next_image_id += 1
        write_json(os.path.join(ann_dir, f"instances_{split_name}.json"),
                    {"info": {"description": "vldus shapes benchmark", "seed": seed,
                              "image_size": image_size},
                     "images": images, "annotations": annotations, "categories": categories})
        summary[split_name] = {"images": n_images, "objects": len(annotations), "per_class": per_class,
                               "images_with_unseen": with_unseen, "unseen_only": unseen_only}

    # Stale images of an earlier, larger run in the same folder would break byte-identity.
    for f in os.listdir(img_dir):
        if re.fullmatch(r"(train|test|val)_\d{6}\.png", f) and f not in written:
            os.remove(os.path.join(img_dir, f))
    write_json(os.path.join(out_dir, "split.json"), {"name": "shapes", "classes": list(CLASSES),
                                                      "seen": list(seen_names),
                                                      "unseen": list(unseen_names)})
    save_npy(os.path.join(out_dir, "attributes.npy"), attribute_matrix(CLASSES))
    return summary


# --- command line ----------------------------------------------------------------------------
def add_parser(sub, common) -> None:
    p = sub.add_parser("make-shapes", parents=[common],
                       help="write the embedded synthetic zero-shot detection benchmark",
                       description="Write the synthetic shapes benchmark: classes are "
                                   f"'<colour> <shape>' ({len(CLASSES)} classes), "
                                   f"default unseen: {', '.join(DEFAULT_UNSEEN)}.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-images", type=int, default=DEFAULT_TRAIN_IMAGES)
    p.add_argument("--test-images", type=int, default=DEFAULT_TEST_IMAGES)
    p.add_argument("--val-images", type=int, default=None,
                   help="seen-only validation images, never trained on (default: 1/8 of --train-images)")
    p.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="image side in pixels")
    p.add_argument("--unseen", default=None, help="comma-separated unseen class names "
                                                   "(every shape and colour must stay seen somewhere)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    unseen = None
    if args.unseen is not None:
        unseen = [n for n in (s.strip() for s in args.unseen.split(",")) if n]
    s = make_shapes(args.out, seed=args.seed, train_images=args.train_images,
                    test_images=args.test_images, image_size=args.image_size, unseen=unseen,
                    progress=not args.quiet, val_images=args.val_images)
    if not args.quiet:
        for split_name in ("train", "test", "val"):
            d = s[split_name]
            print(f"{split_name}: {d['images']} images, {d['objects']} objects, "
                  f"{d['images_with_unseen']} with unseen objects ({d['unseen_only']} unseen only)")
        print(f"unseen: {', '.join(s['unseen'])}; written to {args.out}")
    return 0
