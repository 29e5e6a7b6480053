"""A COCO-format detection dataset, validated on load, letterboxed to a square network input.

The annotation file is read with the ``json`` module (pycocotools is for evaluation) and
checked once, at construction: every problem raises :class:`DatasetError` with one line that
names the file, image or annotation and what is wrong. Image files are checked for
existence at construction and decoded on first use (a corrupt file raises then).

Boxes come in as COCO ``[x, y, w, h]`` and are kept as absolute ``xyxy`` float tensors.
Crowd annotations (``iscrowd = 1``) are validated but left out of the training targets, as
COCO tools do. Images without annotations are kept (they teach the negatives).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, read_file

from .transforms import AugmentConfig, DetectionTransform, letterbox_geometry

__all__ = ["CACHE_MODES", "CocoDetection", "DatasetError", "collate", "fingerprint"]

#: Where decoded images are kept: ``memory`` (a dict per process) or ``none`` (decoded on every access).
CACHE_MODES = ("memory", "none")

#: How far (pixels) a box may reach beyond the image before it is an error; within it, boxes are clipped.
BOX_TOLERANCE = 1.0


class DatasetError(ValueError):
    """A problem with a dataset's files, in one line naming the file, image or annotation."""


@dataclass(frozen=True)
class _Record:
    """One image: where it is, its size and its (non-crowd) ground truths in original pixels."""

    image_id: int
    path: Path
    height: int
    width: int
    boxes: Tensor  # [G, 4] xyxy
    labels: Tensor  # [G] contiguous labels


def _load_json(ann_file: Path) -> dict[str, Any]:
    if not ann_file.is_file():
        raise DatasetError(f"{ann_file}: annotation file not found")
    try:
        data = json.loads(ann_file.read_bytes())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{ann_file}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{ann_file}: invalid JSON (not UTF-8 text)") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{ann_file}: expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DatasetError(f"{ann_file}: missing key {key!r}")
        if not isinstance(data[key], list):
            raise DatasetError(f"{ann_file}: {key!r} must be a list, got {type(data[key]).__name__}")
    return data


def _entry(ann_file: Path, kind: str, index: int, entry: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """``entry`` if it is an object holding ``keys``; names it by its id when it has one."""
    if not isinstance(entry, dict):
        raise DatasetError(f"{ann_file}: {kind} #{index} is not an object")
    for key in keys:
        if key not in entry:
            name = f"{kind} id {entry['id']}" if "id" in entry else f"{kind} #{index}"
            raise DatasetError(f"{ann_file}: {name} missing key {key!r}")
    return entry


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _decode_error(error: Exception) -> str:
    """torchvision's decode message, first sentence only, without its C++ source location."""
    lines = str(error).strip().splitlines() or [""]
    text = re.sub(r"^.*?\.(?:cpp|h):\d+,\s*", "", lines[0])
    return text.split(". ")[0].rstrip(".") or type(error).__name__


class CocoDetection(Dataset):
    """COCO-format images and boxes, letterboxed to ``image_size x image_size``.

    ``__getitem__(i)`` returns ``(image, target)``: ``image`` is ``Tensor[3, S, S]`` float in
    ``[0, 1]`` and ``target`` holds ``boxes: Tensor[G, 4]`` xyxy in input pixels,
    ``labels: Tensor[G]`` long in ``0 .. num_classes - 1`` (index into ``category_ids``),
    ``image_id: int``, ``orig_size: (h, w)``, ``scale: float`` and ``pad: (left, top)``, with
    ``input_xy = orig_xy * scale + pad`` (``transforms.boxes_to_original`` maps back).

    ``train=True`` applies ``augment`` (``AugmentConfig()`` when None); ``train=False`` only
    letterboxes. With ``cache="memory"`` every decoded image (uint8, original size) is kept in a
    dict on the instance, so after the first epoch nothing is decoded again (per process:
    each DataLoader worker holds its own; use ``persistent_workers``). ``cache="none"`` keeps
    nothing and decodes on every access: for sets that do not fit in memory (COCO train2017
    decoded is ~100 GB). A trial sets it with ``data.cache``.
    """

    def __init__(
        self,
        ann_file: Path,
        img_dir: Path,
        image_size: int,
        train: bool,
        augment: AugmentConfig | None = None,
        cache: Literal["memory", "none"] = "memory",
    ) -> None:
        if cache not in CACHE_MODES:
            raise ValueError(f"cache: unknown mode {cache!r}; choose one of {', '.join(CACHE_MODES)}")
        self.ann_file = Path(ann_file)
        self.img_dir = Path(img_dir)
        self.image_size = image_size
        self.train = train
        self.cache = cache
        data = _load_json(self.ann_file)
        if not self.img_dir.is_dir():
            raise DatasetError(f"{self.img_dir}: image directory not found")

        names: dict[int, str] = {}
        for i, raw in enumerate(data["categories"]):
            cat = _entry(self.ann_file, "category", i, raw, ("id", "name"))
            if not _is_int(cat["id"]):
                raise DatasetError(f"{self.ann_file}: category #{i} has a non-integer id {cat['id']!r}")
            if cat["id"] in names:
                raise DatasetError(f"{self.ann_file}: duplicate category id {cat['id']}")
            names[cat["id"]] = str(cat["name"])
        self.category_ids: list[int] = sorted(names)
        self.category_names: list[str] = [names[c] for c in self.category_ids]
        self.num_classes = len(self.category_ids)
        label_of = {c: k for k, c in enumerate(self.category_ids)}

        images: dict[int, dict[str, Any]] = {}
        for i, raw in enumerate(data["images"]):
            img = _entry(self.ann_file, "image", i, raw, ("id", "file_name", "width", "height"))
            if not _is_int(img["id"]):
                raise DatasetError(f"{self.ann_file}: image #{i} has a non-integer id {img['id']!r}")
            if img["id"] in images:
                raise DatasetError(f"{self.ann_file}: duplicate image id {img['id']}")
            if not (_is_int(img["width"]) and _is_int(img["height"]) and img["width"] > 0 and img["height"] > 0):
                raise DatasetError(f"{self.ann_file}: image id {img['id']} ({img['file_name']}): width and height "
                                   f"must be positive integers, got {img['width']!r} x {img['height']!r}")
            images[img["id"]] = img

        boxes: dict[int, list[list[float]]] = {image_id: [] for image_id in images}
        labels: dict[int, list[int]] = {image_id: [] for image_id in images}
        for i, raw in enumerate(data["annotations"]):
            ann = _entry(self.ann_file, "annotation", i, raw, ("id", "image_id", "category_id", "bbox"))
            box = self._check_annotation(ann, images, label_of)
            if not ann.get("iscrowd", 0):
                boxes[ann["image_id"]].append(box)
                labels[ann["image_id"]].append(label_of[ann["category_id"]])

        self.image_ids: list[int] = list(images)
        self._records = [
            _Record(image_id, self.img_dir / img["file_name"], img["height"], img["width"],
                    torch.tensor(boxes[image_id], dtype=torch.float32).reshape(-1, 4),
                    torch.tensor(labels[image_id], dtype=torch.long))
            for image_id, img in images.items()
        ]
        missing = [r for r in self._records if not r.path.is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DatasetError(f"{missing[0].path}: image file not found (image id {missing[0].image_id}){more}")
        self.transform = DetectionTransform(image_size, (augment or AugmentConfig()) if train else None)
        self._decoded: dict[int, Tensor] = {}

    def _check_annotation(self, ann: dict[str, Any], images: dict[int, dict[str, Any]],
                          label_of: dict[int, int]) -> list[float]:
        """The annotation's box as xyxy clipped to its image; DatasetError if anything is wrong."""
        where = f"{self.ann_file}: annotation id {ann['id']}"
        if not _is_int(ann["image_id"]) or ann["image_id"] not in images:
            raise DatasetError(f"{where}: unknown image id {ann['image_id']!r}")
        img = images[ann["image_id"]]
        where += f" (image id {img['id']}, {img['file_name']})"
        if not _is_int(ann["category_id"]) or ann["category_id"] not in label_of:
            raise DatasetError(f"{where}: unknown category id {ann['category_id']!r}")
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise DatasetError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            raise DatasetError(f"{where}: non-positive box size w={w:g}, h={h:g}")
        width, height = img["width"], img["height"]
        x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
        tol = BOX_TOLERANCE
        if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol or x2 <= x1 or y2 <= y1:
            raise DatasetError(f"{where}: box [{x:g}, {y:g}, {w:g}, {h:g}] lies outside the "
                               f"{width}x{height} image (tolerance {tol:g} px)")
        return [x1, y1, x2, y2]

    def __len__(self) -> int:
        return len(self._records)

    def box_sizes(self) -> Tensor:
        """``Tensor[M, 2]``: width and height of every (non-crowd) box, in pixels of the
        letterboxed network input, without augmentation (what anchors are fitted to)."""
        sizes = [(r.boxes[:, 2:] - r.boxes[:, :2]) * letterbox_geometry(r.height, r.width, self.image_size).scale
                 for r in self._records]
        return torch.cat(sizes) if sizes else torch.zeros(0, 2)

    def _image(self, index: int) -> Tensor:
        """``uint8 Tensor[3, H, W]`` of image ``index``, decoded once with ``cache="memory"``."""
        image = self._decoded.get(index)
        if image is not None:
            return image
        rec = self._records[index]
        try:
            image = decode_image(read_file(str(rec.path)), mode=ImageReadMode.RGB)  # [3, H, W]
        except (RuntimeError, ValueError) as e:
            raise DatasetError(f"{rec.path}: cannot decode image ({_decode_error(e)})") from None
        if tuple(image.shape[-2:]) != (rec.height, rec.width):
            raise DatasetError(f"{rec.path}: image is {image.shape[-1]}x{image.shape[-2]} pixels but "
                               f"{self.ann_file.name} says {rec.width}x{rec.height}")
        if self.cache == "memory":
            self._decoded[index] = image
        return image

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        rec = self._records[index]
        image, boxes, box = self.transform(self._image(index), rec.boxes)  # [3, S, S], [G, 4]
        return image, {
            "boxes": boxes,
            "labels": rec.labels,
            "image_id": rec.image_id,
            "orig_size": (rec.height, rec.width),
            "scale": box.scale,
            "pad": (box.left, box.top),
        }

    def __repr__(self) -> str:
        return (f"CocoDetection({self.ann_file}, {len(self)} images, {self.num_classes} classes, "
                f"size {self.image_size}, {'train' if self.train else 'eval'})")


def collate(batch: list[tuple[Tensor, dict[str, Any]]]) -> tuple[Tensor, list[dict[str, Any]]]:
    """``[(Tensor[3, S, S], target)] * B -> (Tensor[B, 3, S, S], [target] * B)``."""
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)


def fingerprint(ann_file: Path, img_dir: Path) -> str:
    """SHA-256 hex of the annotation file's bytes and the sorted ``(name, size)`` of the files in ``img_dir``.

    Cheap (no pixels are read) and stable across machines and directory locations: the
    same files give the same fingerprint wherever they lie.
    """
    ann_file, img_dir = Path(ann_file), Path(img_dir)
    if not ann_file.is_file():
        raise DatasetError(f"{ann_file}: annotation file not found")
    if not img_dir.is_dir():
        raise DatasetError(f"{img_dir}: image directory not found")
    digest = hashlib.sha256()
    with open(ann_file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    digest.update(b"\0images\0")
    with os.scandir(img_dir) as entries:
        files = sorted((e.name, e.stat().st_size) for e in entries if e.is_file())
    for name, size in files:
        digest.update(f"{name}\0{size}\n".encode())
    return digest.hexdigest()
