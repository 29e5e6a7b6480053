"""Anchor layouts per preset, the flattened prior tensors built from them, and k-means anchors.

A *layout* lists, per output level, its stride and the anchor shapes (w, h) of each cell
in pixels at the layout's reference input size. :func:`build_priors` turns a layout
into :class:`Priors` for an actual input size: one row per (level, y, x, anchor), in
that order, which is also the order in which the head's outputs are flattened.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .boxes import wh_iou


@dataclass(frozen=True)
class LevelSpec:
    """One output level: its stride and its anchors ``(w, h)`` in pixels at ``ref_size``."""

    stride: int
    anchors: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class AnchorLayout:
    """Levels of a head. ``ref_size`` is the input size the anchors are given for
    (they are rescaled by ``input_size / ref_size``); ``None`` keeps them in pixels
    as they are (RetinaNet ties anchors to the stride, not to the image).
    ``anchor_free`` marks YOLOv1's predictors, which have no prior shape."""

    name: str
    levels: tuple[LevelSpec, ...]
    ref_size: int | None = None
    anchor_free: bool = False

    @property
    def anchors_per_level(self) -> tuple[int, ...]:
        return tuple(len(lv.anchors) for lv in self.levels)

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(lv.stride for lv in self.levels)


def _split(anchors: list[tuple[float, float]], per_level: int) -> list[tuple[tuple[float, float], ...]]:
    return [tuple(anchors[i : i + per_level]) for i in range(0, len(anchors), per_level)]


def yolov3_layout() -> AnchorLayout:
    """YOLOv3's nine COCO anchors for 416 px, three per level at strides 8/16/32 (yolov3.cfg)."""
    a = [(10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (59, 119), (116, 90), (156, 198), (373, 326)]
    return AnchorLayout(
        "yolov3",
        tuple(LevelSpec(s, lv) for s, lv in zip((8, 16, 32), _split(a, 3))),
        ref_size=416,
    )


def yolov4_layout(name: str = "yolov4", ref_size: int = 608) -> AnchorLayout:
    """YOLOv4's anchors for 608 px (yolov4.cfg); Scaled-YOLOv4 (yolov4-csp.yaml) uses the same at 640 px."""
    a = [(12, 16), (19, 36), (40, 28), (36, 75), (76, 55), (72, 146), (142, 110), (192, 243), (459, 401)]
    return AnchorLayout(
        name,
        tuple(LevelSpec(s, lv) for s, lv in zip((8, 16, 32), _split(a, 3))),
        ref_size=ref_size,
    )


def yolov2_layout() -> AnchorLayout:
    """YOLOv2's five COCO anchors (yolov2.cfg, in stride-32 grid units at 416 px), one level."""
    grid = [(0.57273, 0.677385), (1.87446, 2.06253), (3.33843, 5.47434), (7.88282, 3.52778), (9.77052, 9.16828)]
    return AnchorLayout("yolov2", (LevelSpec(32, tuple((w * 32, h * 32) for w, h in grid)),), ref_size=416)


def yolov1_layout(predictors: int = 2, stride: int = 32) -> AnchorLayout:
    """YOLOv1: B=2 predictors per cell, no prior shape, one level.

    The paper's 7x7 grid at 448 px is stride 64; the preset uses stride 32 so that on
    the small inputs this project trains with the grid is not coarser than YOLOv2's.
    """
    return AnchorLayout("yolov1", (LevelSpec(stride, ((0.0, 0.0),) * predictors),), anchor_free=True)


def retinanet_layout() -> AnchorLayout:
    """RetinaNet: P3-P7 (strides 8-128), anchor size 4 x stride, scales 2^{0,1/3,2/3},
    ratios 1:2, 1:1, 2:1 (Lin et al. 2017, sec. 4; detectron2 defaults)."""
    levels = []
    for stride in (8, 16, 32, 64, 128):
        base = 4 * stride
        shapes = []
        for scale in (1.0, 2 ** (1 / 3), 2 ** (2 / 3)):
            for ratio in (0.5, 1.0, 2.0):  # ratio = h / w
                size = base * scale
                shapes.append((size / math.sqrt(ratio), size * math.sqrt(ratio)))
        levels.append(LevelSpec(stride, tuple(shapes)))
    return AnchorLayout("retinanet", tuple(levels))


def ssd_layout() -> AnchorLayout:
    """SSD300 default boxes (Liu et al. 2016; ssd.pytorch config): min/max sizes
    30..315 px at 300 px, ratios {2} or {2, 3} plus the sqrt(min*max) box, giving
    4, 6, 6, 6, 4, 4 boxes per cell. Strides are the powers of two 8..256 so the shared
    backbone can produce every level (SSD300 uses 8, 16, 32, 64, 100, 300)."""
    min_sizes = (30, 60, 111, 162, 213, 264)
    max_sizes = (60, 111, 162, 213, 264, 315)
    ratios = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
    levels = []
    for stride, lo, hi, rs in zip((8, 16, 32, 64, 128, 256), min_sizes, max_sizes, ratios):
        shapes = [(float(lo), float(lo)), (math.sqrt(lo * hi),) * 2]
        for r in rs:
            shapes += [(lo * math.sqrt(r), lo / math.sqrt(r)), (lo / math.sqrt(r), lo * math.sqrt(r))]
        levels.append(LevelSpec(stride, tuple(shapes)))
    return AnchorLayout("ssd", tuple(levels), ref_size=300)


#: Named layouts. A recipe names one (``anchors: yolov3``), so a job can swap them.
LAYOUTS = {
    "yolov1": yolov1_layout,
    "yolov2": yolov2_layout,
    "yolov3": yolov3_layout,
    "yolov4": yolov4_layout,
    "scaled_yolov4": lambda: yolov4_layout("scaled_yolov4", 640),
    "ssd": ssd_layout,
    "retinanet": retinanet_layout,
}


def get_layout(name: str) -> AnchorLayout:
    try:
        return LAYOUTS[name]()
    except KeyError:
        raise ValueError(f"unknown anchor layout {name!r}; choose one of {', '.join(LAYOUTS)}") from None


class PriorRows(NamedTuple):
    """The fields a box coding reads, for some rows of :class:`Priors` (shapes ``[...]``)."""

    cell: Tensor  # [..., 2]
    stride: Tensor  # [...]
    wh: Tensor  # [..., 2]
    level: Tensor  # [...]
    image_size: tuple[int, int]


@dataclass(frozen=True)
class Priors:
    """Flattened priors of a layout at one input size; every field indexes rows ``[N]``.

    ``boxes`` are the anchor boxes centred on their cells (for anchor-free predictors a
    cell-sized box), ``cell`` the integer cell coordinates ``(x, y)`` as floats.
    """

    boxes: Tensor  # [N, 4] xyxy
    wh: Tensor  # [N, 2] anchor width, height (pixels)
    cell: Tensor  # [N, 2] (x, y) cell index
    stride: Tensor  # [N]
    level: Tensor  # [N] long
    anchor_id: Tensor  # [N] long, index into ``anchor_wh``
    anchor_wh: Tensor  # [A, 2] all anchor shapes of the layout, level by level
    anchor_level: Tensor  # [A] long
    level_shapes: tuple[tuple[int, int, int], ...]  # (H_l, W_l, A_l)
    level_offsets: tuple[int, ...]  # first row of each level
    level_strides: tuple[int, ...]
    image_size: tuple[int, int]  # (H, W) of the network input
    anchor_free: bool = False

    @property
    def num(self) -> int:
        return self.boxes.shape[0]

    @property
    def num_levels(self) -> int:
        return len(self.level_shapes)

    def rows(self, index: Tensor) -> "PriorRows":
        """The per-row fields at ``index`` (any shape), for decoding a subset of rows."""
        return PriorRows(self.cell[index], self.stride[index], self.wh[index], self.level[index], self.image_size)

    def to(self, device: torch.device | str) -> "Priors":
        fields = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return Priors(**fields)


def build_priors(
    layout: AnchorLayout,
    image_size: tuple[int, int] | int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Priors:
    """Priors for an input of ``image_size`` (H, W); grids are ``ceil(size / stride)``."""
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    H, W = image_size
    scale = 1.0 if layout.ref_size is None else max(H, W) / layout.ref_size
    anchor_wh = torch.tensor([a for lv in layout.levels for a in lv.anchors], dtype=dtype, device=device) * scale  # [A, 2]
    anchor_level = torch.tensor([i for i, lv in enumerate(layout.levels) for _ in lv.anchors], device=device)
    boxes, whs, cells, strides, levels, ids = [], [], [], [], [], []
    shapes, offsets = [], []
    first_id, offset = 0, 0
    for li, lv in enumerate(layout.levels):
        h, w, a = math.ceil(H / lv.stride), math.ceil(W / lv.stride), len(lv.anchors)
        ys, xs = torch.meshgrid(
            torch.arange(h, device=device, dtype=dtype), torch.arange(w, device=device, dtype=dtype), indexing="ij"
        )
        cell = torch.stack((xs, ys), -1).reshape(h * w, 1, 2).expand(h * w, a, 2).reshape(-1, 2)  # [h*w*a, 2]
        awh = anchor_wh[first_id : first_id + a]  # [a, 2]
        wh = awh.expand(h * w, a, 2).reshape(-1, 2)
        if layout.anchor_free:
            wh = torch.full_like(wh, float(lv.stride))
        centre = (cell + 0.5) * lv.stride
        boxes.append(torch.cat((centre - wh / 2, centre + wh / 2), -1))
        whs.append(wh)
        cells.append(cell)
        strides.append(torch.full((h * w * a,), float(lv.stride), device=device, dtype=dtype))
        levels.append(torch.full((h * w * a,), li, device=device, dtype=torch.long))
        ids.append(torch.arange(first_id, first_id + a, device=device).repeat(h * w))
        shapes.append((h, w, a))
        offsets.append(offset)
        first_id += a
        offset += h * w * a
    return Priors(
        boxes=torch.cat(boxes),
        wh=torch.cat(whs),
        cell=torch.cat(cells),
        stride=torch.cat(strides),
        level=torch.cat(levels),
        anchor_id=torch.cat(ids),
        anchor_wh=anchor_wh,
        anchor_level=anchor_level,
        level_shapes=tuple(shapes),
        level_offsets=tuple(offsets),
        level_strides=layout.strides,
        image_size=(H, W),
        anchor_free=layout.anchor_free,
    )


def kmeans_anchors(wh: Tensor, k: int, iters: int = 300, seed: int = 0) -> Tensor:
    """k-means over box shapes with distance ``1 - IoU`` (YOLOv2, Redmon & Farhadi 2017, sec. 2).

    Args:
        wh: ``Tensor[M, 2]`` ground-truth widths and heights (pixels), M >= k.
        k: number of anchors.

    Returns:
        ``Tensor[k, 2]`` anchors sorted by area. Deterministic for a seed.
    """
    wh = wh.float()
    if wh.ndim != 2 or wh.shape[1] != 2:
        raise ValueError(f"kmeans_anchors: expected wh of shape [M, 2], got {tuple(wh.shape)}")
    if wh.shape[0] < k:
        raise ValueError(f"kmeans_anchors: need at least k={k} boxes, got {wh.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    # k-means++ seeding with the 1 - IoU distance
    centres = wh[torch.randint(wh.shape[0], (1,), generator=g)]  # [1, 2]
    for _ in range(1, k):
        d = (1 - wh_iou(wh, centres)).amin(1).clamp(min=0)  # [M]
        probs = d.pow(2) if d.sum() > 0 else torch.ones_like(d)
        centres = torch.cat((centres, wh[torch.multinomial(probs, 1, generator=g)]))
    assign = torch.full((wh.shape[0],), -1, dtype=torch.long)
    for _ in range(iters):
        new_assign = wh_iou(wh, centres).argmax(1)  # [M]
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
        sums = torch.zeros_like(centres).index_add_(0, assign, wh)
        counts = torch.bincount(assign, minlength=k).float()[:, None]
        # an emptied cluster keeps its centre
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
    return centres[centres.prod(1).argsort()]


def layout_from_anchors(
    name: str, anchors: Tensor, strides: tuple[int, ...], ref_size: int | None, per_level: tuple[int, ...] | None = None
) -> AnchorLayout:
    """Split ``anchors: Tensor[A, 2]`` sorted by area over levels of increasing stride:
    ``per_level[i]`` to level ``i`` (default: evenly, as YOLOv3 divides its clusters)."""
    if per_level is None:
        per = anchors.shape[0] // len(strides)
        if per * len(strides) != anchors.shape[0]:
            raise ValueError(f"{anchors.shape[0]} anchors do not split evenly over {len(strides)} levels")
        per_level = (per,) * len(strides)
    if len(per_level) != len(strides) or sum(per_level) != anchors.shape[0]:
        raise ValueError(f"{anchors.shape[0]} anchors cannot be split as {per_level} over {len(strides)} levels")
    bounds = [0, *torch.tensor(per_level).cumsum(0).tolist()]
    rows = [tuple((float(w), float(h)) for w, h in anchors[a:b].tolist()) for a, b in zip(bounds, bounds[1:])]
    return AnchorLayout(name, tuple(LevelSpec(s, r) for s, r in zip(strides, rows)), ref_size=ref_size)


def fit_anchors(layout: AnchorLayout, wh: Tensor, seed: int = 0) -> AnchorLayout:
    """``layout`` with its anchor shapes replaced by k-means clusters of a training set's boxes.

    YOLOv2's dimension clusters (Redmon & Farhadi 2017, sec. 2) as YOLOv3 uses them (2018,
    sec. 2.3): k-means with distance ``1 - IoU`` over the ground-truth shapes, ``k`` = the
    layout's anchor count, sorted by area and dealt to the levels in order of increasing
    stride, as many per level as the layout has. The published anchors are this procedure's
    result on COCO; on another dataset it gives that dataset's.

    Args:
        wh: ``Tensor[M, 2]`` ground-truth widths and heights in pixels of the network input
            (the returned layout's anchors are in those pixels: ``ref_size`` is None).
    """
    if layout.anchor_free:
        raise ValueError(f"anchors={layout.name} has no prior shapes to fit")
    k = sum(layout.anchors_per_level)
    anchors = kmeans_anchors(wh, k, seed=seed)  # [k, 2]
    return layout_from_anchors(f"{layout.name}+kmeans", anchors, layout.strides, None, layout.anchors_per_level)
