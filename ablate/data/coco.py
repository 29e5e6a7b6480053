"""A COCO-format detection dataset, validated on load, letterboxed to a square network input.

The annotation file is read with the ``json`` module (pycocotools is for evaluation) and
checked once, at construction: every problem raises :class:`DatasetError` with one line that
names the file, image or annotation and what is wrong. Image files are checked for
existence at construction and decoded on first use (a corrupt file raises then).

Boxes come in as COCO ``[x, y, w, h]`` and are kept as absolute ``xyxy`` float tensors.
Crowd annotations (``iscrowd = 1``) are validated but left out of the training targets, as
COCO tools do. Images without annotations are kept (they teach the negatives).

Images reach a batch as ``uint8``: decoded (torchvision's ``decode_image``: libjpeg-turbo for
JPEG, libpng), resized by the letterbox, then augmented and padded
(:class:`~ablate.data.transforms.DetectionTransform`); where the resized images are kept is the
``cache`` mode (:data:`CACHE_MODES`). :func:`make_loader` builds the ``DataLoader``: worker
processes, pinned memory, prefetch, and a :class:`SeededBatchSampler` that gives every sample its
own augmentation seed, so batches are the same with 0 or N workers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_image, read_file

from .transforms import AugmentConfig, DetectionTransform, letterbox_geometry

__all__ = ["AUTO_DISK_LIMIT", "CACHE_MODES", "CocoDetection", "DatasetError", "SeededBatchSampler", "collate",
           "fingerprint", "make_loader"]

#: Where resized images are kept: ``none`` (decoded on every access), ``memory`` (a dict per
#: process), ``disk`` (one memory-mapped file per dataset and size, shared by the node's trials
#: through the page cache: :mod:`ablate.data.cache`), ``auto`` (``disk`` up to :data:`AUTO_DISK_LIMIT`).
CACHE_MODES = ("auto", "none", "memory", "disk")
#: ``auto`` builds a disk cache for a split whose resized images take at most this many bytes (and
#: at most half the cache folder's free space); above it, ``none``. COCO train2017 at 640 px is ~100 GB.
AUTO_DISK_LIMIT = 32 * 2**30
#: Bumped when the decode or resize changes, so that a disk cache of older pixels is rebuilt.
RESIZE_VERSION = 1

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

    ``image`` is ``uint8``, and ``target["jitter"]`` its colour jitter, drawn but not applied
    (:func:`~ablate.data.transforms.batch_input` makes the float input on the training device and
    applies it there; None for evaluation). An index may be ``(i, seed)`` (what :class:`SeededBatchSampler` yields): the
    augmentations of image ``i`` are then drawn from a generator seeded with ``seed`` alone, in any
    process; a plain ``i`` draws from torch's global generator.

    ``train=True`` applies ``augment`` (``AugmentConfig()`` when None); ``train=False`` only
    letterboxes. ``cache`` (:data:`CACHE_MODES`, a trial's ``data.cache``) says where the resized
    uint8 images are kept: ``memory`` in a dict on the instance (per process: each loader worker
    holds its own; use persistent workers), ``disk`` in a node-local memory-mapped file under
    ``cache_dir`` (built here, once per node, see :mod:`ablate.data.cache`), ``none`` nowhere
    (decoded on every access). ``auto`` is ``disk`` for a split of at most :data:`AUTO_DISK_LIMIT`
    bytes and half the free space of ``cache_dir``, else ``none``; :attr:`cache` holds the mode
    chosen. ``progress`` gets the cache's lines; ``threads`` decode in parallel while it is built.
    """

    def __init__(
        self,
        ann_file: Path,
        img_dir: Path,
        image_size: int,
        train: bool,
        augment: AugmentConfig | None = None,
        cache: str = "none",
        cache_dir: Path | None = None,
        progress: Callable[[str], None] | None = None,
        threads: int = 1,
    ) -> None:
        if cache not in CACHE_MODES:
            raise ValueError(f"cache: unknown mode {cache!r}; choose one of {', '.join(CACHE_MODES)}")
        self.ann_file = Path(ann_file)
        self.img_dir = Path(img_dir)
        self.image_size = image_size
        self.train = train
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
        self._geometry = [letterbox_geometry(r.height, r.width, image_size) for r in self._records]
        self._decoded: dict[int, Tensor] = {}
        self._disk = None
        self.cache = self._open_cache(cache, cache_dir, progress, threads)

    # ------------------------------------------------------------------ images
    def resized_bytes(self) -> int:
        """Bytes of all images after the letterbox's resize, uint8 (what a disk or memory cache holds)."""
        return sum(3 * g.height * g.width for g in self._geometry)

    def _open_cache(self, mode: str, cache_dir: Path | None, progress: Callable[[str], None] | None,
                    threads: int) -> str:
        """Resolve ``auto`` and build / open the disk cache; returns the mode in use."""
        if mode not in ("auto", "disk"):
            return mode
        from . import cache as disk_cache

        cache_dir = Path(cache_dir) if cache_dir is not None else disk_cache.default_cache_dir()
        need = self.resized_bytes()
        if mode == "auto":
            probe = cache_dir
            while not probe.exists() and probe != probe.parent:
                probe = probe.parent
            free = shutil.disk_usage(probe).free
            if need > AUTO_DISK_LIMIT or need > free // 2:
                if progress:
                    progress(f"image cache: none for {self.ann_file.name} ({need / 2**30:.1f} GiB resized at "
                             f"{self.image_size} px; auto caches up to {AUTO_DISK_LIMIT / 2**30:.0f} GiB and half "
                             f"of the {free / 2**30:.0f} GiB free in {cache_dir}); images are decoded every epoch")
                return "none"
        key = hashlib.sha256(f"{fingerprint(self.ann_file, self.img_dir)}\0resize-v{RESIZE_VERSION}".encode())
        shapes = [(g.height, g.width) for g in self._geometry]
        self._disk = disk_cache.open_or_build(cache_dir, key.hexdigest(), self.image_size, shapes, self._load_resized,
                                              progress=progress, threads=threads)
        return "disk"

    def _load_resized(self, index: int) -> Tensor:
        """``uint8 Tensor[3, h, w]``: image ``index`` decoded and resized by the letterbox (no cache)."""
        rec = self._records[index]
        try:
            image = decode_image(read_file(str(rec.path)), mode=ImageReadMode.RGB)  # [3, H, W]
        except (RuntimeError, ValueError) as e:
            raise DatasetError(f"{rec.path}: cannot decode image ({_decode_error(e)})") from None
        if tuple(image.shape[-2:]) != (rec.height, rec.width):
            raise DatasetError(f"{rec.path}: image is {image.shape[-1]}x{image.shape[-2]} pixels but "
                               f"{self.ann_file.name} says {rec.width}x{rec.height}")
        return self.transform.resize(image)

    def resized(self, index: int) -> Tensor:
        """``uint8 Tensor[3, h, w]`` of image ``index`` after the letterbox's resize, from the cache."""
        if self._disk is not None:
            return self._disk[index]
        image = self._decoded.get(index)
        if image is None:
            image = self._load_resized(index)
            if self.cache == "memory":
                self._decoded[index] = image
        return image

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

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, dict[str, Any]]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        rec = self._records[index]
        gen = torch.Generator().manual_seed(int(seed)) if (seed is not None and self.train) else None
        image, boxes, box, jitter = self.transform.finish(self.resized(index), rec.boxes, self._geometry[index], gen)
        return image, {
            "boxes": boxes,
            "labels": rec.labels,
            "image_id": rec.image_id,
            "orig_size": (rec.height, rec.width),
            "scale": box.scale,
            "pad": (box.left, box.top),
            "jitter": jitter,
        }

    def __repr__(self) -> str:
        return (f"CocoDetection({self.ann_file}, {len(self)} images, {self.num_classes} classes, "
                f"size {self.image_size}, {'train' if self.train else 'eval'})")


def collate(batch: list[tuple[Tensor, dict[str, Any]]]) -> tuple[Tensor, list[dict[str, Any]]]:
    """``[(uint8 Tensor[3, S, S], target)] * B -> (uint8 Tensor[B, 3, S, S], [target] * B)``."""
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)


class SeededBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(index, sample seed)``: the epoch's order and every sample's augmentation seed
    are drawn from one generator seeded with :attr:`seed` (set it before each epoch with
    :meth:`set_seed`; the sampler runs in the training process, so persistent workers see it).

    A sample's augmentations depend on its seed only, so the batches are the same whichever
    worker (or the training process itself, with 0 workers) loads them.
    """

    def __init__(self, num_samples: int, batch_size: int, shuffle: bool, drop_last: bool = False, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_samples, self.batch_size, self.shuffle, self.drop_last = num_samples, batch_size, shuffle, drop_last
        self.seed = seed

    def set_seed(self, seed: int) -> None:
        self.seed = seed

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(self.seed)
        n = self.num_samples
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        seeds = torch.randint(0, 2**62, (n,), generator=g).tolist()
        batch: list[tuple[int, int]] = []
        for i, s in zip(order, seeds):
            batch.append((i, s))
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch and not self.drop_last:
            yield batch

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else (n + b - 1) // b


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # a worker is one core's share: resize / jitter must not spawn a thread pool each


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, workers: int = 0, prefetch: int = 2,
                pin_memory: bool = False, seed: int = 0) -> tuple[DataLoader, SeededBatchSampler]:
    """A ``DataLoader`` over ``dataset`` with a :class:`SeededBatchSampler` (returned too: set its seed
    before each epoch). ``workers > 0``: that many persistent worker processes (one torch thread
    each), ``prefetch`` batches ahead per worker; ``pin_memory`` for non-blocking copies to CUDA."""
    sampler = SeededBatchSampler(len(dataset), batch_size, shuffle, seed=seed)  # type: ignore[arg-type]
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = {"persistent_workers": True, "prefetch_factor": prefetch, "worker_init_fn": _worker_init}
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                        pin_memory=pin_memory, **extra)
    return loader, sampler


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
