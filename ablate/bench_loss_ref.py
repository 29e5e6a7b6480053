"""The loss benchmark's reference: a YOLOv5-style loss, written here from the published formulas.

What it computes is ultralytics yolov5 v7.0 ``utils/loss.py`` ``ComputeLoss`` (the loss
Scaled-YOLOv4 shares), on YOLOv5's per-level head outputs ``[B, A, H, W, 5 + C]`` (the
benchmark makes them once, before timing, as contiguous copies of ablate's ``Tensor[B, N,
5 + C]`` in its row order level, y, x, anchor: :meth:`Yolov5Loss.levels`, as YOLOv5's
``Detect`` hands its levels to the loss in training; given the ``[B, N, 5 + C]`` tensor
itself it reads views of it, whose backward also assembles that tensor's gradient, a cost
YOLOv5 does not have):

* targets: ``Tensor[T, 6]`` rows ``(image, class, x, y, w, h)``, centre and size relative
  to the image (:func:`yolov5_targets`);
* matching (``build_targets``), per level: a GT matches every anchor whose width and height
  ratios to it are all below ``anchor_t`` (``max(r, 1/r) < 4``); each match takes the GT's
  centre cell and, with the 0.5 offset, the left / upper neighbour where the centre's
  fraction is below 0.5 (and the centre more than one cell from that edge) and the right /
  lower one where the fraction to the far edge is below 0.5; every (match, cell) is a row,
  duplicates included;
* box: ``(1 - CIoU).mean()`` over the level's rows, the prediction decoded as
  ``xy = 2 sigma(t) - 0.5``, ``wh = (2 sigma(t))^2 anchor`` in grid units relative to the
  row's cell (Zheng et al., AAAI 2020, CIoU with ``alpha = v / (v - IoU + 1)`` without a
  gradient);
* objectness: BCE-with-logits (``pos_weight`` 1) against ``CIoU.detach().clamp(0)`` at the
  rows (a later row writing the same cell wins) and 0 elsewhere, the mean over the level's
  ``B x A x H x W`` anchors times ``balance`` ``(4, 1, 0.4)``;
* class (only with more than one class): BCE-with-logits against one-hot targets (label
  smoothing ``eps``: ``1 - eps/2``, ``eps/2``), the mean over the level's rows x classes;
* weights ``box 0.05, obj 1.0, cls 0.5`` scaled as YOLOv5's ``train.py`` does (``box *= 3 /
  nl``, ``cls *= nc / 80 * 3 / nl``, ``obj *= (size / 640)^2 * 3 / nl``); the total is
  ``(lbox + lobj + lcls) * B``.

A timing reference, and sane: on targets where no two rows share a cell it equals ablate's
``scaled_yolov4`` preset with ``scale_by_batch`` and those weights (the tests check it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .detect import Priors, Targets

#: The five cell offsets of the 0.5-offset neighbours: centre, left, up, right, down.
_OFFSETS = ((0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (-0.5, 0.0), (0.0, -0.5))


def yolov5_targets(targets: Targets, image_size: tuple[int, int] | int) -> Tensor:
    """ablate's padded xyxy pixel targets as YOLOv5's ``Tensor[T, 6]`` of ``(image, class, x, y,
    w, h)`` rows, centre and size relative to the image, valid GTs only."""
    H, W = (image_size, image_size) if isinstance(image_size, int) else image_size
    b, g = targets.valid.nonzero(as_tuple=True)
    box = targets.boxes[b, g].float()  # [T, 4]
    scale = torch.tensor((W, H, W, H), dtype=box.dtype, device=box.device)
    cxcywh = torch.cat(((box[:, :2] + box[:, 2:]) / 2, box[:, 2:] - box[:, :2]), 1) / scale
    return torch.cat((b[:, None].to(box.dtype), targets.labels[b, g][:, None].to(box.dtype), cxcywh), 1)


def ciou_xywh(p: Tensor, t: Tensor, eps: float = 1e-7) -> Tensor:
    """Complete IoU of matched ``(cx, cy, w, h)`` boxes ``[n, 4], [n, 4] -> [n]`` (Zheng et al.,
    AAAI 2020, eqs. 8-11): ``IoU - rho^2 / c^2 - alpha v``, ``v = 4 / pi^2 (atan(w_t / h_t) -
    atan(w / h))^2``, ``alpha = v / (v - IoU + 1 + eps)`` held constant; ``eps`` in the union and
    the enclosing diagonal."""
    half_p, half_t = p[:, 2:] / 2, t[:, 2:] / 2
    lo = torch.maximum(p[:, :2] - half_p, t[:, :2] - half_t)
    hi = torch.minimum(p[:, :2] + half_p, t[:, :2] + half_t)
    inter = (hi - lo).clamp(min=0).prod(1)
    union = p[:, 2] * p[:, 3] + t[:, 2] * t[:, 3] - inter + eps
    iou = inter / union
    enclose = torch.maximum(p[:, :2] + half_p, t[:, :2] + half_t) - torch.minimum(p[:, :2] - half_p, t[:, :2] - half_t)
    c2 = enclose.pow(2).sum(1) + eps
    rho2 = (t[:, :2] - p[:, :2]).pow(2).sum(1)
    v = (4 / math.pi**2) * (torch.atan(t[:, 2] / t[:, 3]) - torch.atan(p[:, 2] / p[:, 3])).pow(2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


class Yolov5Loss:
    """YOLOv5 v7.0's loss (see the module docstring) for the head layout of ``priors``
    (every level must have the same number of anchors)."""

    def __init__(self, priors: Priors, num_classes: int, anchor_t: float = 4.0, box: float = 0.05,
                 obj: float = 1.0, cls: float = 0.5, label_smoothing: float = 0.0):
        counts = {a for _, _, a in priors.level_shapes}
        if len(counts) != 1:
            raise ValueError(f"the reference needs the same number of anchors on every level, got {priors.level_shapes}")
        self.priors, self.nc, self.anchor_t = priors, num_classes, anchor_t
        self.nl, self.na = len(priors.level_shapes), counts.pop()
        # anchors of each level in its grid units, [na, 2]
        self.anchors = [priors.anchor_wh[priors.anchor_level == i] / s for i, s in enumerate(priors.level_strides)]
        self.balance = {3: [4.0, 1.0, 0.4]}.get(self.nl, [4.0, 1.0, 0.25, 0.06, 0.02])
        size = max(priors.image_size)
        self.hyp = {"box": box * 3 / self.nl, "cls": cls * num_classes / 80 * 3 / self.nl,
                    "obj": obj * (size / 640) ** 2 * 3 / self.nl}
        self.cp, self.cn = 1.0 - 0.5 * label_smoothing, 0.5 * label_smoothing
        device = priors.boxes.device
        self.pos_weight = torch.ones(1, device=device)
        self.offsets = torch.tensor(_OFFSETS, device=device)  # [5, 2]

    def levels(self, pred: Tensor) -> list[Tensor]:
        """Per-level views ``[B, A, H, W, K]`` of ``pred: Tensor[B, N, K]`` (rows level, y, x, anchor);
        ``.contiguous()`` of each is what YOLOv5's ``Detect`` returns in training."""
        B, _, K = pred.shape
        return [pred[:, off:off + H * W * A].view(B, H, W, A, K).permute(0, 3, 1, 2, 4)
                for (H, W, A), off in zip(self.priors.level_shapes, self.priors.level_offsets)]

    def build_targets(self, t6: Tensor) -> list[tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]]:
        """Per level ``(b, a, gj, gi, tbox [n, 4], anchor wh [n, 2], class [n])``; ``tbox`` is the GT's
        centre relative to the row's cell (before the cell is clamped to the grid) and its size, in
        grid units. Rows in YOLOv5's order: offset, then anchor, then target."""
        out = []
        for (H, W, _), anchors in zip(self.priors.level_shapes, self.anchors):
            grid = torch.tensor((W, H), dtype=t6.dtype, device=t6.device)
            gxy, gwh = t6[:, 2:4] * grid, t6[:, 4:6] * grid  # [T, 2]
            r = gwh[None] / anchors[:, None]  # [na, T, 2]
            a_idx, t_idx = (torch.maximum(r, 1 / r).amax(2) < self.anchor_t).nonzero(as_tuple=True)  # anchor-major
            xy, far = gxy[t_idx], grid - gxy[t_idx]  # [M, 2]
            near_ok = (xy % 1 < 0.5) & (xy > 1)  # left, up
            far_ok = (far % 1 < 0.5) & (far > 1)  # right, down
            use = torch.cat((torch.ones_like(near_ok[:, :1]), near_ok, far_ok), 1).T  # [5, M]
            o_idx, m_idx = use.nonzero(as_tuple=True)  # offset-major
            xy = xy[m_idx]
            gij = (xy - self.offsets[o_idx]).long()  # truncation, as .long() does
            tbox = torch.cat((xy - gij, gwh[t_idx[m_idx]]), 1)
            b = t6[t_idx[m_idx], 0].long()
            a = a_idx[m_idx]
            gi, gj = gij[:, 0].clamp(0, W - 1), gij[:, 1].clamp(0, H - 1)
            out.append((b, a, gj, gi, tbox, anchors[a], t6[t_idx[m_idx], 1].long()))
        return out

    def __call__(self, pred: Tensor | list[Tensor], t6: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss * B [1], (lbox, lobj, lcls) detached [3])`` for the per-level outputs ``[B, A, H, W,
        5 + C]`` (or ``Tensor[B, N, 5 + C]``, read through :meth:`levels`) and YOLOv5 targets
        ``t6: Tensor[T, 6]``."""
        levels = self.levels(pred) if isinstance(pred, Tensor) else list(pred)
        device = levels[0].device
        lbox = torch.zeros(1, device=device)
        lobj = torch.zeros(1, device=device)
        lcls = torch.zeros(1, device=device)
        for i, (pi, (b, a, gj, gi, tbox, anch, tcls)) in enumerate(zip(levels, self.build_targets(t6))):
            tobj = torch.zeros(pi.shape[:4], dtype=pi.dtype, device=device)  # [B, A, H, W]
            n = b.shape[0]
            if n:
                ps = pi[b, a, gj, gi]  # [n, K]
                pxy = ps[:, :2].sigmoid() * 2 - 0.5
                pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * anch
                ciou = ciou_xywh(torch.cat((pxy, pwh), 1), tbox)
                lbox = lbox + (1.0 - ciou).mean()
                tobj[b, a, gj, gi] = ciou.detach().clamp(0).to(tobj.dtype)
                if self.nc > 1:
                    tc = torch.full_like(ps[:, 5:], self.cn)
                    tc[torch.arange(n, device=device), tcls] = self.cp
                    lcls = lcls + F.binary_cross_entropy_with_logits(ps[:, 5:], tc, pos_weight=self.pos_weight)
            lobj = lobj + F.binary_cross_entropy_with_logits(pi[..., 4], tobj, pos_weight=self.pos_weight) * self.balance[i]
        lbox, lobj, lcls = lbox * self.hyp["box"], lobj * self.hyp["obj"], lcls * self.hyp["cls"]
        return (lbox + lobj + lcls) * levels[0].shape[0], torch.cat((lbox, lobj, lcls)).detach()
