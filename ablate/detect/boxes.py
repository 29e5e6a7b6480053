"""Box conversions and the IoU family.

Boxes are absolute ``xyxy`` float tensors everywhere inside the core.

Naming carries shape (torchvision ``ops`` convention):

* ``box_iou(a, b) -> Tensor[N, M]`` and friends are *pairwise* (all pairs);
* ``box_iou_batched(a, b) -> Tensor[B, N, M]`` is pairwise within each image;
* ``elementwise_*`` work on matched pairs: ``Tensor[..., 4]`` with ``Tensor[..., 4]``
  gives ``Tensor[...]``.

The pairwise functions are torchvision's; the elementwise ones are ours because the
losses need them on matched pairs with ``eps`` in every denominator and fp16 inputs
upcast (torchvision's agree with them to 1e-6, which the tests check).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import (
    box_area,
    box_convert,
    box_iou,
    complete_box_iou,
    distance_box_iou,
    generalized_box_iou,
)

__all__ = [
    "EPS",
    "box_area",
    "box_convert",
    "box_iou",
    "generalized_box_iou",
    "distance_box_iou",
    "complete_box_iou",
    "box_iou_batched",
    "wh_iou",
    "xyxy_to_cxcywh",
    "cxcywh_to_xyxy",
    "PairGeometry",
    "pair_geometry",
    "elementwise_iou",
]

#: Added to every denominator of the IoU family.
EPS = 1e-7


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``Tensor[..., 4]`` xyxy -> ``Tensor[..., 4]`` (cx, cy, w, h)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1, y2 - y1), dim=-1)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``Tensor[..., 4]`` (cx, cy, w, h) -> ``Tensor[..., 4]`` xyxy."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_iou_batched(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU within each image.

    Args:
        boxes1: ``Tensor[B, N, 4]`` xyxy.
        boxes2: ``Tensor[B, M, 4]`` xyxy.

    Returns:
        ``Tensor[B, N, M]``; 0 where a union is empty.
    """
    area1 = (boxes1[..., 2] - boxes1[..., 0]).clamp(min=0) * (boxes1[..., 3] - boxes1[..., 1]).clamp(min=0)  # [B, N]
    area2 = (boxes2[..., 2] - boxes2[..., 0]).clamp(min=0) * (boxes2[..., 3] - boxes2[..., 1]).clamp(min=0)  # [B, M]
    lt = torch.maximum(boxes1[:, :, None, :2], boxes2[:, None, :, :2])  # [B, N, M, 2]
    rb = torch.minimum(boxes1[:, :, None, 2:], boxes2[:, None, :, 2:])  # [B, N, M, 2]
    wh = (rb - lt).clamp_(min=0)
    inter = wh[..., 0] * wh[..., 1]  # [B, N, M]
    union = area1[:, :, None] + area2[:, None, :] - inter
    return inter / (union + EPS)


def wh_iou(wh1: Tensor, wh2: Tensor) -> Tensor:
    """IoU of boxes that share a centre, from their sizes alone ("shape IoU").

    Args:
        wh1: ``Tensor[..., N, 2]`` widths and heights.
        wh2: ``Tensor[M, 2]``.

    Returns:
        ``Tensor[..., N, M]``.
    """
    inter = torch.minimum(wh1[..., :, None, :], wh2).prod(-1)  # [..., N, M]
    area1 = wh1.prod(-1)[..., :, None]
    area2 = wh2.prod(-1)
    return inter / (area1 + area2 - inter + EPS)


class PairGeometry(NamedTuple):
    """Everything the elementwise IoU-family losses need, for matched pairs ``[...]``."""

    iou: Tensor  # [...]
    inter: Tensor
    union: Tensor
    enclose_w: Tensor  # width of the smallest enclosing box
    enclose_h: Tensor
    dx: Tensor  # target centre minus prediction centre
    dy: Tensor
    w1: Tensor  # prediction size
    h1: Tensor
    w2: Tensor  # target size
    h2: Tensor


def pair_geometry(pred: Tensor, target: Tensor, eps: float = EPS) -> PairGeometry:
    """Intersections, unions, enclosing boxes and centre offsets of matched pairs.

    fp16/bf16 inputs are computed in fp32.

    Args:
        pred: ``Tensor[..., 4]`` xyxy.
        target: ``Tensor[..., 4]`` xyxy, broadcastable to ``pred``.
    """
    if pred.dtype in (torch.float16, torch.bfloat16):
        pred = pred.float()
    if target.dtype != pred.dtype:
        target = target.to(pred.dtype)
    px1, py1, px2, py2 = pred.unbind(-1)
    tx1, ty1, tx2, ty2 = target.unbind(-1)
    w1, h1 = px2 - px1, py2 - py1
    w2, h2 = tx2 - tx1, ty2 - ty1
    iw = (torch.minimum(px2, tx2) - torch.maximum(px1, tx1)).clamp(min=0)
    ih = (torch.minimum(py2, ty2) - torch.maximum(py1, ty1)).clamp(min=0)
    inter = iw * ih
    union = w1 * h1 + w2 * h2 - inter
    iou = inter / (union + eps)
    enclose_w = torch.maximum(px2, tx2) - torch.minimum(px1, tx1)
    enclose_h = torch.maximum(py2, ty2) - torch.minimum(py1, ty1)
    dx = (tx1 + tx2 - px1 - px2) * 0.5
    dy = (ty1 + ty2 - py1 - py2) * 0.5
    return PairGeometry(iou, inter, union, enclose_w, enclose_h, dx, dy, w1, h1, w2, h2)


def elementwise_iou(pred: Tensor, target: Tensor) -> Tensor:
    """IoU of matched pairs: ``Tensor[..., 4]`` x ``Tensor[..., 4]`` -> ``Tensor[...]``."""
    return pair_geometry(pred, target).iou


def aspect_term(g: PairGeometry, eps: float = EPS) -> Tensor:
    """CIoU's aspect-ratio consistency ``v = 4/pi^2 (atan(w2/h2) - atan(w1/h1))^2``."""
    return (4 / math.pi**2) * (torch.atan(g.w2 / (g.h2 + eps)) - torch.atan(g.w1 / (g.h1 + eps))).pow(2)
