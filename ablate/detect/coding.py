"""Box codings: how the head's raw offsets ``t = (tx, ty, tw, th)`` map to a box.

Each coding has

* ``decode(t, p) -> boxes``: raw head outputs to absolute xyxy boxes;
* ``encode(boxes, p) -> t``: the exact inverse, wherever the coding can represent the box;
* ``activate(t)`` and ``target(boxes, p)``: the *regression space* of "MSE on t" — the
  quantities the YOLO papers regress with squared error (for YOLOv2/v3 that is
  ``(sigma(tx), sigma(ty), tw, th)`` against the cell offset and ``log(w/p_w)``, which
  needs no logit of a target at 0 or 1);
* ``centre_range(p)``: the box centres each prior can reach, as offsets in grid units
  from its cell's corner ``(lo, hi)`` on both axes, or ``None`` where unbounded. The
  sigmoid codings reach the open interval; the assigners treat its ends as reachable
  (``encode`` clamps the logit there).

``p`` is :class:`~ablate.detect.anchors.Priors` (rows ``[N]``, broadcasting against
``t: Tensor[B, N, 4]``) or :class:`~ablate.detect.anchors.PriorRows` for a subset
(``t: Tensor[P, 4]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Union

import torch
from torch import Tensor

from .anchors import PriorRows, Priors
from .boxes import cxcywh_to_xyxy, xyxy_to_cxcywh

PriorLike = Union[Priors, PriorRows]

#: Clamp on log-size offsets before ``exp`` (torchvision's ``log(1000 / 16)``).
MAX_LOG_SIZE = math.log(1000.0 / 16)
_PROB_EPS = 1e-6


class BoxCoding(Protocol):
    name: str

    def decode(self, t: Tensor, p: PriorLike) -> Tensor: ...
    def encode(self, boxes: Tensor, p: PriorLike) -> Tensor: ...
    def activate(self, t: Tensor, p: PriorLike) -> Tensor: ...
    def target(self, boxes: Tensor, p: PriorLike) -> Tensor: ...
    def centre_range(self, p: PriorLike) -> Tensor | None: ...


def _logit(x: Tensor) -> Tensor:
    x = x.clamp(_PROB_EPS, 1 - _PROB_EPS)
    return torch.log(x) - torch.log1p(-x)


def _up(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _cell_offset(boxes: Tensor, p: PriorLike) -> tuple[Tensor, Tensor]:
    """Centre in grid units minus the cell index, and the box size: ``[..., 2], [..., 2]``."""
    c = xyxy_to_cxcywh(_up(boxes))
    return c[..., :2] / p.stride[..., None] - p.cell, c[..., 2:]


@dataclass(frozen=True)
class YoloCoding:
    """YOLOv2/v3/v4: ``b_xy = (s sigma(t_xy) - (s-1)/2 + c) stride``, ``b_wh = p_wh exp(t_wh)``.

    ``scale_xy = s`` is 1.0 for YOLOv2/v3 and 1.05-1.2 for YOLOv4 (``scale_x_y`` in
    yolov4.cfg), either one value or one per level. Redmon & Farhadi 2017/2018, eq. 1-4.
    """

    scale_xy: float | tuple[float, ...] = 1.0
    name: str = "yolo"

    def _s(self, p: PriorLike, like: Tensor) -> Tensor:
        if isinstance(self.scale_xy, (int, float)):
            return torch.full_like(p.stride, float(self.scale_xy))[..., None]
        s = torch.tensor(self.scale_xy, dtype=like.dtype, device=like.device)
        return s[p.level][..., None]  # [..., 1]

    def activate(self, t: Tensor, p: PriorLike) -> Tensor:
        s = self._s(p, t)
        xy = torch.sigmoid(t[..., :2]) * s - (s - 1) / 2
        return torch.cat((xy, t[..., 2:]), -1)

    def decode(self, t: Tensor, p: PriorLike) -> Tensor:
        a = self.activate(t, p)
        xy = (a[..., :2] + p.cell) * p.stride[..., None]
        wh = p.wh * torch.exp(a[..., 2:].clamp(max=MAX_LOG_SIZE))
        return cxcywh_to_xyxy(torch.cat((xy, wh), -1))

    def target(self, boxes: Tensor, p: PriorLike) -> Tensor:
        off, wh = _cell_offset(boxes, p)
        return torch.cat((off, torch.log(wh / p.wh)), -1)

    def encode(self, boxes: Tensor, p: PriorLike) -> Tensor:
        tgt = self.target(boxes, p)
        s = self._s(p, tgt)
        return torch.cat((_logit((tgt[..., :2] + (s - 1) / 2) / s), tgt[..., 2:]), -1)

    def centre_range(self, p: PriorLike) -> Tensor:
        """``(-(s-1)/2, 1 + (s-1)/2)`` per prior: ``Tensor[..., 2]``; (0, 1), the own cell, for s = 1."""
        s = self._s(p, p.stride.float())  # [..., 1]
        return torch.cat((-(s - 1) / 2, 1 + (s - 1) / 2), -1)


@dataclass(frozen=True)
class ScaledYoloCoding:
    """Scaled-YOLOv4 / YOLOv5: ``b_xy = (2 sigma(t) - 0.5 + c) stride``,
    ``b_wh = p_wh (2 sigma(t))^2`` (Wang et al., CVPR 2021; ultralytics yolov5 ``Detect``).

    Centres reach half a cell into the neighbours (which the ``wh_ratio`` assigner uses);
    sizes reach 4x the anchor. The regression space is ``(2 sigma - 0.5, 2 sigma)``.
    """

    name: str = "scaled_yolo"

    def activate(self, t: Tensor, p: PriorLike | None = None) -> Tensor:
        s = 2 * torch.sigmoid(t)
        return torch.cat((s[..., :2] - 0.5, s[..., 2:]), -1)

    def decode(self, t: Tensor, p: PriorLike) -> Tensor:
        a = self.activate(t)
        xy = (a[..., :2] + p.cell) * p.stride[..., None]
        wh = p.wh * a[..., 2:].pow(2)
        return cxcywh_to_xyxy(torch.cat((xy, wh), -1))

    def target(self, boxes: Tensor, p: PriorLike) -> Tensor:
        off, wh = _cell_offset(boxes, p)
        return torch.cat((off, torch.sqrt(wh / p.wh)), -1)

    def encode(self, boxes: Tensor, p: PriorLike) -> Tensor:
        tgt = self.target(boxes, p)
        return _logit(torch.cat(((tgt[..., :2] + 0.5) / 2, tgt[..., 2:] / 2), -1))

    def centre_range(self, p: PriorLike) -> Tensor:
        """``(-0.5, 1.5)`` for every prior: ``Tensor[..., 2]``."""
        return torch.tensor((-0.5, 1.5), device=p.stride.device).expand(*p.stride.shape, 2)


@dataclass(frozen=True)
class DeltaCoding:
    """SSD / RetinaNet / Faster R-CNN deltas ``(dx/w_a, dy/h_a, log(w/w_a), log(h/h_a)) / var``.

    ``variances`` divide the deltas: SSD uses (0.1, 0.1, 0.2, 0.2) (Liu et al. 2016,
    ssd.pytorch); RetinaNet and detectron2 use weights 1, i.e. variances (1, 1, 1, 1).
    """

    variances: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)
    name: str = "delta"

    def activate(self, t: Tensor, p: PriorLike | None = None) -> Tensor:
        return t

    def _var(self, like: Tensor) -> Tensor:
        return torch.tensor(self.variances, dtype=like.dtype, device=like.device)

    def decode(self, t: Tensor, p: PriorLike) -> Tensor:
        d = t * self._var(t)
        centre = (p.cell + 0.5) * p.stride[..., None]
        xy = centre + d[..., :2] * p.wh
        wh = p.wh * torch.exp(d[..., 2:].clamp(max=MAX_LOG_SIZE))
        return cxcywh_to_xyxy(torch.cat((xy, wh), -1))

    def encode(self, boxes: Tensor, p: PriorLike) -> Tensor:
        c = xyxy_to_cxcywh(_up(boxes))
        centre = (p.cell + 0.5) * p.stride[..., None]
        d = torch.cat(((c[..., :2] - centre) / p.wh, torch.log(c[..., 2:] / p.wh)), -1)
        return d / self._var(d)

    def target(self, boxes: Tensor, p: PriorLike) -> Tensor:
        return self.encode(boxes, p)

    def centre_range(self, p: PriorLike) -> None:
        """Unbounded: the centre is the anchor's plus a linear delta."""
        return None


@dataclass(frozen=True)
class Yolov1Coding:
    """YOLOv1: centre as an offset within its cell, size as ``sqrt(w / W_img)``, no anchor.

    Redmon et al., CVPR 2016, sec. 2.2: "we predict the square root of the bounding box
    width and height". Linear outputs, as in the paper.
    """

    name: str = "yolov1"

    def activate(self, t: Tensor, p: PriorLike | None = None) -> Tensor:
        return t

    def _img_wh(self, p: PriorLike, like: Tensor) -> Tensor:
        H, W = p.image_size
        return torch.tensor((W, H), dtype=like.dtype, device=like.device)

    def decode(self, t: Tensor, p: PriorLike) -> Tensor:
        xy = (t[..., :2] + p.cell) * p.stride[..., None]
        wh = t[..., 2:].pow(2) * self._img_wh(p, t)
        return cxcywh_to_xyxy(torch.cat((xy, wh), -1))

    def encode(self, boxes: Tensor, p: PriorLike) -> Tensor:
        off, wh = _cell_offset(boxes, p)
        return torch.cat((off, torch.sqrt(wh / self._img_wh(p, wh))), -1)

    def target(self, boxes: Tensor, p: PriorLike) -> Tensor:
        return self.encode(boxes, p)

    def centre_range(self, p: PriorLike) -> None:
        """Unbounded: linear offsets."""
        return None


CODINGS = ("yolo", "scaled_yolo", "delta", "yolov1")


def build_coding(name: str, scale_xy: float | tuple[float, ...] = 1.0, variances=(0.1, 0.1, 0.2, 0.2)) -> BoxCoding:
    """The coding named ``name`` (one of :data:`CODINGS`) with its parameters."""
    if name == "yolo":
        return YoloCoding(scale_xy=scale_xy)
    if name == "scaled_yolo":
        return ScaledYoloCoding()
    if name == "delta":
        return DeltaCoding(variances=tuple(variances))  # type: ignore[arg-type]
    if name == "yolov1":
        return Yolov1Coding()
    raise ValueError(f"unknown box coding {name!r}; choose one of {', '.join(CODINGS)}")
