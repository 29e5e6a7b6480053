"""A synthetic COCO-format detection set: stretched shapes on cluttered backgrounds.

Six classes that differ by shape only (every object gets a random colour): circle, square,
triangle, diamond, cross, ring. Each is drawn axis-aligned and stretched to its box, so a
"circle" may be an ellipse of aspect 1:3. Per image (``S x S``, default 160):

* background: a linear gradient between two random colours, smooth low-frequency colour
  noise, 1-4 clutter lines and 0-2 faint soft blobs (clutter is never annotated);
* 0-8 objects (about 5% of the images are empty): side ``sqrt(w h)`` drawn log-uniformly
  per size band, 35% in ``[S/20, S/5)``, 45% in ``[S/5, 3S/5)``, 20% in ``[3S/5, 0.72 S]``,
  which at ``S = 160`` are COCO's small (< 32^2 px), medium and large (placements fail more
  often for large objects: about 40 / 47 / 12% of the boxes end up small / medium / large);
  aspect ``w/h`` log-uniform in ``[1/3, 3]``; each side at least ``max(4, S/40)`` px;
* objects are painted in order, later ones over earlier ones, and an object is only placed
  where every object (itself included) keeps at least ``MIN_VISIBLE`` (70%) of its pixels
  visible; a placement that fails ``PLACEMENT_TRIES`` times drops the object;
* each object's colour is the first of 16 random draws at least ``MIN_CONTRAST`` away from
  the mean of the canvas under it (so that small objects keep their contrast), with a mild
  shading across it;
* Gaussian pixel noise of a per-image strength in ``[0.01, 0.04]``.

Difficulty: with ``MIN_VISIBLE`` 0.5 the quickstart trial (tiny YOLOv3, 1,000 images at
160 px) reached AP50 0.42 / AP 0.16 after 30 epochs; at 0.7 (generator version 3) AP50 0.51 /
AP 0.20 after 20 epochs. Both were before the detector's objectness prior and fitted anchors;
with them it reaches AP50 0.65 / AP 0.33 after 7 epochs (README, "Training benchmark").
Occlusion is the strongest knob of the data.

The boxes are the extents of each object's *visible* pixels (COCO boxes are of the visible
part), ``[x, y, w, h]`` in pixel edges, and ``area`` is the box area ``w h`` (there are no
segmentations; pycocotools uses ``area`` for its small / medium / large ranges).

Image ``i`` of a split is drawn from ``numpy.random.default_rng([seed, split, i])``, so a
set is a pure function of its parameters: the same seed gives byte-identical JSON and
identical pixels.

Variants (``variant=``, ``ablate data synth --variant``): ``standard`` is the set above;
``easy`` draws 1-3 objects per image (30 / 40 / 30%, before placements that fail), sides
``sqrt(w h)`` in ``[0.3 S, 0.55 S)``, aspect in ``[1/2, 2]``, and places an object only where
its box overlaps no other box (nothing occluded). Its smallest side, ``0.3 S / sqrt 2 >= 0.21
S``, exceeds a cell of a 5 x 5 grid, so two disjoint boxes never share a centre cell there
(stride 32 at 160 px: YOLOv1's and YOLOv2's grid). It checks that a loss recipe can learn at
all, apart from crowding and small objects. The variant is part of the set's parameters
(``synth.json``), so a stored set of the other variant is refused, not reused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import typer
from PIL import Image

__all__ = [
    "CATEGORIES",
    "VARIANTS",
    "Rendered",
    "SynthInfo",
    "Variant",
    "generate_synthetic",
    "render_image",
    "synth_command",
]

#: Class names; COCO category ids are their index + 1.
CATEGORIES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring")
#: Probability of 0, 1, ..., 8 objects in an image (before placements that fail).
COUNT_PROBS: tuple[float, ...] = (0.05, 0.10, 0.13, 0.14, 0.14, 0.13, 0.12, 0.10, 0.09)
#: Size bands of ``sqrt(w h) / S`` and their probabilities (small / medium / large at S = 160).
SIZE_BANDS: tuple[tuple[float, float, float], ...] = ((1 / 20, 1 / 5, 0.35), (1 / 5, 3 / 5, 0.45), (3 / 5, 0.72, 0.20))
#: Largest aspect ratio (``w / h`` is drawn log-uniformly in ``[1 / MAX_ASPECT, MAX_ASPECT]``).
MAX_ASPECT = 3.0
#: Fraction of its own pixels every object keeps visible (the strongest difficulty knob, see above).
MIN_VISIBLE = 0.7
#: Random positions tried per object before it is dropped.
PLACEMENT_TRIES = 20
#: Smallest RGB distance wanted between an object's colour and the canvas under it.
MIN_CONTRAST = 0.45
#: Bumped whenever the drawing changes, so that a stored set with old pixels is not reused.
GENERATOR_VERSION = 3
#: Smallest image side the generator accepts.
MIN_IMAGE_SIZE = 64
#: The split names and their index in the per-image seed.
SPLITS: tuple[str, ...] = ("train", "val")


@dataclass(frozen=True)
class Variant:
    """The object knobs of a named variant of the set (the background is the same in all)."""

    count_probs: tuple[float, ...]  # probability of 0, 1, ... objects per image
    size_bands: tuple[tuple[float, float, float], ...]  # (lo, hi, probability) of sqrt(w h) / S
    max_aspect: float  # w / h log-uniform in [1 / max_aspect, max_aspect]
    min_visible: float  # fraction of its pixels every object keeps visible
    disjoint: bool  # True: an object's box may not overlap any other object's box


#: Named variants; ``standard`` is the set of the module docstring.
VARIANTS: dict[str, Variant] = {
    "standard": Variant(COUNT_PROBS, SIZE_BANDS, MAX_ASPECT, MIN_VISIBLE, disjoint=False),
    "easy": Variant((0.0, 0.3, 0.4, 0.3), ((0.3, 0.55, 1.0),), 2.0, 1.0, disjoint=True),
}


class Rendered(NamedTuple):
    """One synthetic image and its objects."""

    image: np.ndarray  # uint8 [S, S, 3]
    owner: np.ndarray  # int16 [S, S]: index of the object painted last at each pixel, -1 for background
    labels: np.ndarray  # int64 [G], 0-based class index into CATEGORIES
    boxes: np.ndarray  # int64 [G, 4], xyxy pixel edges of each object's visible pixels
    full_areas: np.ndarray  # int64 [G], pixels of each object before occlusion


@dataclass(frozen=True)
class SynthInfo:
    """Where a generated set lies and what it holds."""

    root: Path
    image_size: int
    seed: int
    num_train: int
    num_val: int
    categories: tuple[str, ...]
    stats: dict  # per split: images, objects, empty images, small / medium / large boxes
    generated: bool  # False when an identical set was already there
    seconds: float

    def annotations(self, split: str) -> Path:
        """``root/annotations/instances_<split>.json``."""
        return self.root / "annotations" / f"instances_{split}.json"

    def images(self, split: str) -> Path:
        """``root/<split>``, the folder of the split's images."""
        return self.root / split


# -- shapes: masks over normalised coordinates u, v in [-1, 1] across the object's box ------------


def _circle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u * u + v * v <= 1.0


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Apex at the top centre, base along the bottom edge."""
    return (np.abs(u) <= (v + 1.0) * 0.5) & (np.abs(v) <= 1.0)


def _diamond(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.abs(u) + np.abs(v) <= 1.0


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A plus sign with arms a third of the box wide."""
    au, av = np.abs(u), np.abs(v)
    return ((au <= 1 / 3) & (av <= 1.0)) | ((av <= 1 / 3) & (au <= 1.0))


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.55**2)


#: The mask function of each class, in the order of CATEGORIES.
SHAPES: tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], ...] = (
    _circle, _square, _triangle, _diamond, _cross, _ring,
)


def _shape_mask(label: int, x0: float, y0: float, w: float, h: float, size: int) -> tuple[int, int, np.ndarray]:
    """Mask of shape ``label`` stretched to the box ``(x0, y0, w, h)``: ``(col0, row0, bool [h', w'])``.

    The mask covers the pixels whose centres fall inside the shape, over the window of
    pixels the box touches.
    """
    c0, c1 = max(0, int(np.floor(x0))), min(size, int(np.ceil(x0 + w)))
    r0, r1 = max(0, int(np.floor(y0))), min(size, int(np.ceil(y0 + h)))
    u = (np.arange(c0, c1) + 0.5 - (x0 + w / 2)) / (w / 2)  # [w']
    v = (np.arange(r0, r1) + 0.5 - (y0 + h / 2)) / (h / 2)  # [h']
    return c0, r0, SHAPES[label](u[None, :], v[:, None])  # [h', w']


# -- background ------------------------------------------------------------------------------------


def _interp_matrix(size: int, knots: int) -> np.ndarray:
    """``float [size, knots]``: linear interpolation of ``knots`` values spread over ``size`` pixels."""
    pos = (np.arange(size) + 0.5) / size * (knots - 1)
    i0 = np.minimum(pos.astype(np.int64), knots - 2)
    frac = pos - i0
    m = np.zeros((size, knots))
    m[np.arange(size), i0] = 1.0 - frac
    m[np.arange(size), i0 + 1] = frac
    return m


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """``float32 [S, S, 3]``: gradient + smooth colour noise + clutter lines and blobs."""
    px = np.arange(size, dtype=np.float32) + 0.5
    py, px = px[:, None], px[None, :]  # [S, 1], [1, S]
    c0, c1 = rng.uniform(0.1, 0.9, (2, 3)).astype(np.float32)
    angle = rng.uniform(0.0, 2 * np.pi)
    t = px * np.float32(np.cos(angle)) + py * np.float32(np.sin(angle))  # [S, S]
    t = (t - t.min()) / (t.max() - t.min())
    canvas = c0 + (c1 - c0) * t[..., None]  # [S, S, 3]
    knots = int(rng.integers(3, 7))
    m = _interp_matrix(size, knots)
    low = rng.normal(0.0, 0.08, (3, knots, knots))
    canvas += (m @ low @ m.T).transpose(1, 2, 0).astype(np.float32)  # [S, S, 3]

    for _ in range(int(rng.integers(1, 5))):  # lines: pixels within a half-width of a segment
        (ax, ay), (bx, by) = rng.uniform(-0.1 * size, 1.1 * size, (2, 2))
        dx, dy = bx - ax, by - ay
        s = np.clip(((px - ax) * dx + (py - ay) * dy) / max(dx * dx + dy * dy, 1e-6), 0.0, 1.0)  # [S, S]
        on = np.hypot(px - ax - s * dx, py - ay - s * dy) <= rng.uniform(0.4, 1.0)
        alpha, colour = rng.uniform(0.5, 1.0), rng.uniform(0, 1, 3).astype(np.float32)
        canvas[on] += np.float32(alpha) * (colour - canvas[on])
    for _ in range(int(rng.integers(0, 3))):  # blobs: faint soft rotated Gaussians, within 3 sigma
        cx, cy = rng.uniform(0, size, 2)
        sx, sy = rng.uniform(size / 16, size / 6, 2)
        theta = rng.uniform(0, np.pi)
        peak, colour = rng.uniform(0.2, 0.45), rng.uniform(0, 1, 3).astype(np.float32)
        reach = 3 * max(sx, sy)
        c_0, c_1 = max(0, int(cx - reach)), min(size, int(cx + reach) + 1)
        r_0, r_1 = max(0, int(cy - reach)), min(size, int(cy + reach) + 1)
        x, y = px[:, c_0:c_1] - cx, py[r_0:r_1] - cy  # [1, w'], [h', 1]
        a = (x * np.cos(theta) + y * np.sin(theta)) / sx
        b = (y * np.cos(theta) - x * np.sin(theta)) / sy
        alpha = (peak * np.exp(-0.5 * (a * a + b * b))).astype(np.float32)  # [h', w']
        patch = canvas[r_0:r_1, c_0:c_1]  # view
        patch += alpha[..., None] * (colour - patch)
    return canvas


# -- objects ---------------------------------------------------------------------------------------


def _object_size(rng: np.random.Generator, size: int, v: Variant) -> tuple[float, float]:
    """``(w, h)`` in pixels: a side from the size bands, an aspect ratio in ``[1/a, a]``."""
    band = rng.choice(len(v.size_bands), p=[p for _, _, p in v.size_bands])
    lo, hi, _ = v.size_bands[band]
    side = size * np.exp(rng.uniform(np.log(lo), np.log(hi)))
    aspect = np.exp(rng.uniform(-np.log(v.max_aspect), np.log(v.max_aspect)))
    smallest = max(4.0, size / 40)
    w = float(np.clip(side * np.sqrt(aspect), smallest, size - 2))
    h = float(np.clip(side / np.sqrt(aspect), smallest, size - 2))
    return w, h


def _object_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """``float [3]``: of 16 random colours, the first at least ``MIN_CONTRAST`` from ``under`` (else the farthest)."""
    candidates = rng.uniform(0.0, 1.0, (16, 3))
    dist = np.linalg.norm(candidates - under, axis=1)  # [16]
    good = np.flatnonzero(dist >= MIN_CONTRAST)
    return candidates[good[0] if good.size else int(dist.argmax())]


def _variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown synthetic variant {name!r}; choose one of {', '.join(VARIANTS)}") from None


def render_image(rng: np.random.Generator, size: int, variant: str = "standard") -> Rendered:
    """Draw one ``size x size`` image of ``variant`` (see :data:`VARIANTS`) and its objects from ``rng``."""
    knobs = _variant(variant)
    canvas = _background(rng, size)  # [S, S, 3]
    owner = np.full((size, size), -1, dtype=np.int16)
    labels: list[int] = []
    windows: list[tuple[int, int, int, int]] = []  # col0, row0, width, height of each object's mask
    full: list[int] = []
    visible = np.zeros(0, dtype=np.int64)  # [k], pixels of each placed object still visible
    for _ in range(int(rng.choice(len(knobs.count_probs), p=knobs.count_probs))):
        label = int(rng.integers(len(CATEGORIES)))
        w, h = _object_size(rng, size, knobs)
        for _ in range(PLACEMENT_TRIES):
            x0, y0 = rng.uniform(0.0, size - w), rng.uniform(0.0, size - h)
            c0, r0, mask = _shape_mask(label, x0, y0, w, h, size)
            if knobs.disjoint and any(c0 < c + ww and c < c0 + mask.shape[1] and r0 < r + hh and r < r0 + mask.shape[0]
                                  for c, r, ww, hh in windows):
                continue
            area = int(mask.sum())
            region = owner[r0 : r0 + mask.shape[0], c0 : c0 + mask.shape[1]]  # view
            below = region[mask]
            covered = np.bincount(below[below >= 0], minlength=len(labels))  # [k]
            if area == 0 or np.any(visible - covered < knobs.min_visible * np.asarray(full)):
                continue
            patch = canvas[r0 : r0 + mask.shape[0], c0 : c0 + mask.shape[1]]  # view
            colour = _object_colour(rng, patch[mask].mean(axis=0))
            angle = rng.uniform(0.0, 2 * np.pi)
            u = np.linspace(-1.0, 1.0, mask.shape[1])[None, :]
            v = np.linspace(-1.0, 1.0, mask.shape[0])[:, None]
            shade = rng.uniform(0.0, 0.12) * (u * np.cos(angle) + v * np.sin(angle))  # [h', w']
            patch[mask] = (colour + shade[..., None])[mask]
            region[mask] = len(labels)
            visible = np.append(visible - covered, area)
            labels.append(label)
            windows.append((c0, r0, mask.shape[1], mask.shape[0]))
            full.append(area)
            break
    boxes = np.zeros((len(labels), 4), dtype=np.int64)
    for k, (c0, r0, ww, hh) in enumerate(windows):
        mine = owner[r0 : r0 + hh, c0 : c0 + ww] == k  # [h', w']
        cols, rows = np.flatnonzero(mine.any(axis=0)), np.flatnonzero(mine.any(axis=1))
        boxes[k] = (c0 + cols[0], r0 + rows[0], c0 + cols[-1] + 1, r0 + rows[-1] + 1)
    canvas += np.float32(rng.uniform(0.01, 0.04)) * rng.standard_normal(canvas.shape, dtype=np.float32)
    image = np.round(np.clip(canvas, 0.0, 1.0) * 255).astype(np.uint8)
    return Rendered(image, owner, np.asarray(labels, dtype=np.int64), boxes, np.asarray(full, dtype=np.int64))


# -- the set on disk -------------------------------------------------------------------------------


def _params(num_train: int, num_val: int, image_size: int, seed: int, variant: str = "standard",
            image_format: str = "png") -> dict:
    """The set's identity (``synth.json``); ``variant`` and ``format`` are recorded unless they are
    the default, so sets generated before they existed are still recognised."""
    params = {"version": GENERATOR_VERSION, "num_train": num_train, "num_val": num_val,
              "image_size": image_size, "seed": seed}
    if variant != "standard":
        params["variant"] = variant
    if image_format != "png":
        params["format"] = image_format
    return params


#: Values of parameters that ``_params`` leaves out when they are the default.
_DEFAULTS = {"variant": "standard", "format": "png"}
#: Image file formats: name -> (file extension, PIL save options). JPEG at quality 90 (4:2:0), as
#: photographs are stored; it exercises a real decoder where PNG's is cheap.
FORMATS: dict[str, tuple[str, dict]] = {
    "png": (".png", {"compress_level": 1}),
    "jpeg": (".jpg", {"quality": 90}),
}


def _existing(out: Path, params: dict) -> dict | None:
    """The stored ``synth.json`` if ``out`` holds this very set, None if ``out`` is empty or absent.

    Raises FileExistsError (one line) when ``out`` holds anything else.
    """
    if not out.exists():
        return None
    if not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a directory")
    marker = out / "synth.json"
    if not marker.is_file():
        if any(out.iterdir()):
            raise FileExistsError(f"{out} is not empty and holds no synthetic set (no synth.json); "
                                  "remove it or choose another directory")
        return None
    try:
        stored = json.loads(marker.read_text())
        old = stored["params"]
    except (ValueError, KeyError, TypeError):
        raise FileExistsError(f"{marker} is not a synthetic set's record; "
                              f"remove {out} or choose another directory") from None
    if old != params:
        keys = list(params) + [k for k in old if k not in params]
        diff = ", ".join(f"{k} {old.get(k, _DEFAULTS.get(k))} (asked {params.get(k, _DEFAULTS.get(k))})"
                         for k in keys if old.get(k) != params.get(k))
        raise FileExistsError(f"{out} holds a synthetic set with other parameters: {diff}; "
                              "remove it or choose another directory")
    missing = [s for s in SPLITS if not (out / "annotations" / f"instances_{s}.json").is_file()]
    if missing:
        raise FileExistsError(f"{out} holds an incomplete synthetic set (no instances_{missing[0]}.json); "
                              "remove it and generate again")
    return stored


def _coco(split: str, objects: list[tuple[np.ndarray, np.ndarray]], size: int, params: dict) -> dict:
    """The COCO annotation dict of one split from each image's ``(labels [G], boxes [G, 4] xyxy)``."""
    images, annotations = [], []
    ext = FORMATS[params.get("format", "png")][0]
    for i, (labels, boxes) in enumerate(objects):
        images.append({"id": i + 1, "file_name": f"{i:06d}{ext}", "width": size, "height": size})
        for label, (x1, y1, x2, y2) in zip(labels.tolist(), boxes.tolist()):
            w, h = x2 - x1, y2 - y1
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": label + 1,
                                "bbox": [float(x1), float(y1), float(w), float(h)], "area": float(w * h),
                                "iscrowd": 0})
    return {
        "info": {"description": f"ablate synthetic shapes, {split}", "version": str(GENERATOR_VERSION),
                 "contributor": "ablate.data.synth", "params": params},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CATEGORIES)],
    }


def _split_stats(objects: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Counts of one split: images, objects, empty images and small / medium / large boxes."""
    boxes = np.concatenate([b for _, b in objects]) if objects else np.zeros((0, 4), dtype=np.int64)  # [N, 4]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return {"images": len(objects), "objects": len(boxes), "empty": sum(len(b) == 0 for _, b in objects),
            "small": int((area < 32**2).sum()), "medium": int(((area >= 32**2) & (area < 96**2)).sum()),
            "large": int((area >= 96**2).sum())}


def _write_set(root: Path, params: dict, progress: Callable[[str], None] | None) -> dict:
    """Render and write every image and annotation file of ``params`` under ``root``; the stats per split."""
    size, seed, variant = params["image_size"], params["seed"], params.get("variant", "standard")
    ext, options = FORMATS[params.get("format", "png")]
    counts = (params["num_train"], params["num_val"])
    total, done, step = sum(counts), 0, max(1, sum(counts) // 10)
    stats = {}
    (root / "annotations").mkdir(parents=True)
    for split_index, (split, count) in enumerate(zip(SPLITS, counts)):
        (root / split).mkdir()
        objects = []
        for i in range(count):
            r = render_image(np.random.default_rng([seed, split_index, i]), size, variant)
            Image.fromarray(r.image).save(root / split / f"{i:06d}{ext}", **options)
            objects.append((r.labels, r.boxes))
            done += 1
            if progress is not None and (done % step == 0 or done == total):
                progress(f"synth: {done}/{total} images ({done * 100 // total}%)")
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(_coco(split, objects, size, params)))
        stats[split] = _split_stats(objects)
    record = {"params": params, "categories": list(CATEGORIES), "stats": stats}
    (root / "synth.json").write_text(json.dumps(record, indent=2) + "\n")
    return stats


def generate_synthetic(
    out: Path,
    num_train: int = 1000,
    num_val: int = 200,
    image_size: int = 160,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    variant: str = "standard",
    image_format: str = "png",
) -> SynthInfo:
    """Write the synthetic set under ``out`` (see the module docstring) and return where it lies.

    Layout: ``out/train/000000.png ...``, ``out/val/...``,
    ``out/annotations/instances_{train,val}.json`` and ``out/synth.json`` (the parameters and
    counts). If ``out`` already holds the set of these parameters nothing is written
    (``SynthInfo.generated`` is False); if it holds anything else, FileExistsError.
    The set is written into a hidden sibling directory and renamed to ``out`` when complete,
    so an interrupted run leaves nothing behind and processes that generate the same set
    at once (several workers of a node) all end up with the one complete copy.
    ``progress`` gets a line about every 10% of the images. ``variant`` is one of
    :data:`VARIANTS` (``easy``: 1-3 large objects, no overlap; see the module docstring).
    ``image_format`` is ``png`` (lossless) or ``jpeg`` (:data:`FORMATS`; the boxes are those of the
    rendered pixels, before compression).
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f"image counts must be >= 0, got num_train={num_train}, num_val={num_val}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    _variant(variant)
    if image_format not in FORMATS:
        raise ValueError(f"unknown image format {image_format!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    params = _params(num_train, num_val, image_size, seed, variant, image_format)
    start = time.perf_counter()

    def info(stats: dict, generated: bool) -> SynthInfo:
        return SynthInfo(out, image_size, seed, num_train, num_val, CATEGORIES, stats, generated,
                         time.perf_counter() - start)

    stored = _existing(out, params)
    if stored is not None:
        return info(stored["stats"], generated=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        stats = _write_set(partial / "set", params, progress)
        try:
            os.rename(partial / "set", out)  # out is absent or an empty directory
        except OSError:
            stored = _existing(out, params)  # another process completed the same set first, or a refusal
            if stored is None:
                raise
            return info(stored["stats"], generated=False)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return info(stats, generated=True)


def synth_command(
    out: Path = typer.Option(..., "--out", help="Directory to write the set into (created; must be empty or absent)."),
    train: int = typer.Option(1000, help="Training images."),
    val: int = typer.Option(200, help="Validation images."),
    size: int = typer.Option(160, help=f"Image side in pixels (square, >= {MIN_IMAGE_SIZE})."),
    seed: int = typer.Option(0, help="Seed; the same seed and sizes give byte-identical files."),
    variant: str = typer.Option("standard", help="standard: the set described above; easy: 1-3 large objects "
                                "(sides 0.3-0.55 S, aspect 1:2-2:1) per image, boxes never overlapping."),
    image_format: str = typer.Option("png", "--format", help="Image files: png (lossless) or jpeg (quality 90, "
                                     "exercises a real decoder)."),
) -> None:
    """Generate the synthetic COCO-format detection set (shapes on cluttered backgrounds).

    Six classes that differ only by shape (circle, square, triangle, diamond, cross, ring),
    each in a random colour and stretched to an aspect ratio between 1:3 and 3:1; 0-8 objects
    per image, overlapping but each at least 70% visible; sides from S/20 to 0.72 S (at 160 px:
    COCO small, medium and large); gradient, noise and clutter (lines, blobs) in the background.

    Writes OUT/train/*.png, OUT/val/*.png (*.jpg with --format jpeg), OUT/annotations/instances_{train,val}.json and
    OUT/synth.json. Run again with the same options and the existing set is kept; a
    directory holding anything else is refused, never overwritten.
    """
    if train < 0:
        raise typer.BadParameter(f"must be >= 0, got {train}", param_hint="--train")
    if val < 0:
        raise typer.BadParameter(f"must be >= 0, got {val}", param_hint="--val")
    if size < MIN_IMAGE_SIZE:
        raise typer.BadParameter(f"must be >= {MIN_IMAGE_SIZE}, got {size}", param_hint="--size")
    if seed < 0:
        raise typer.BadParameter(f"must be >= 0, got {seed}", param_hint="--seed")
    if variant not in VARIANTS:
        raise typer.BadParameter(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}",
                                 param_hint="--variant")
    if image_format not in FORMATS:
        raise typer.BadParameter(f"unknown format {image_format!r}; choose one of {', '.join(FORMATS)}",
                                 param_hint="--format")
    try:
        info = generate_synthetic(out, train, val, size, seed, progress=lambda line: typer.echo(line, err=True),
                                  variant=variant, image_format=image_format)
    except FileExistsError as e:
        raise typer.BadParameter(str(e), param_hint="--out") from None
    if not info.generated:
        typer.echo(f"{out} already holds this synthetic set ({variant}, seed {seed}, {train} + {val} images "
                   f"at {size} px); nothing to do", err=True)
        return
    for split in SPLITS:
        s = info.stats[split]
        n = max(s["objects"], 1)
        typer.echo(f"{split}: {s['images']} images ({s['empty']} empty), {s['objects']} objects: "
                   f"{s['small'] / n:.0%} small, {s['medium'] / n:.0%} medium, {s['large'] / n:.0%} large "
                   f"-> {info.images(split)}, {info.annotations(split)}", err=True)
    typer.echo(f"done in {info.seconds:.1f} s", err=True)
