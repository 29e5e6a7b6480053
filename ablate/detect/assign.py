"""Assigners: which anchors are positive, negative or ignored for each ground truth.

All assigners are stateless functions, batched over images with padded ground truths,
run under ``torch.no_grad()``, with no Python loop over ground truths or anchors. They
return one :class:`Assignment`. An image without ground truth is all negative.

Where two ground truths claim the same anchor, the one with the higher matching score
wins (shape IoU, IoU or the smaller size ratio; ties go to the later ground truth, as a
later write does in darknet).

Reachability: given the coding's ``centre_range`` (``reach: Tensor[N, 2]``, the centre
offsets each prior's cell can represent), ``max_iou`` makes an anchor positive only for
ground truths whose centre it can reach, and every assigner counts, per image, the
positives whose target it cannot reach (``Assignment.unreachable``; for ``max_iou`` the
positives plain max-IoU matching would have had and the restriction removed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .anchors import Priors
from .boxes import EPS, box_iou, elementwise_iou, wh_iou, xyxy_to_cxcywh

#: Label sentinels.
POSITIVE, NEGATIVE, IGNORED = 1, 0, -1

ASSIGNERS = ("best_anchor", "max_iou", "wh_ratio", "yolov1")


@dataclass(frozen=True)
class Targets:
    """Ground truths of a batch, padded to ``G`` per image."""

    boxes: Tensor  # [B, G, 4] xyxy, pixels of the network input
    labels: Tensor  # [B, G] long class ids (0..C-1)
    valid: Tensor  # [B, G] bool

    @staticmethod
    def from_lists(boxes: list[Tensor], labels: list[Tensor], device=None) -> "Targets":
        """Pad per-image ``Tensor[G_i, 4]`` / ``Tensor[G_i]`` lists to one batch."""
        B = len(boxes)
        G = max((b.shape[0] for b in boxes), default=0)
        device = device or (boxes[0].device if boxes else "cpu")
        out_b = torch.zeros(B, G, 4, device=device)
        out_l = torch.zeros(B, G, dtype=torch.long, device=device)
        valid = torch.zeros(B, G, dtype=torch.bool, device=device)
        for i, (b, lab) in enumerate(zip(boxes, labels)):
            n = b.shape[0]
            out_b[i, :n] = b
            out_l[i, :n] = lab
            valid[i, :n] = True
        return Targets(out_b, out_l, valid)

    def __getitem__(self, i: slice) -> "Targets":
        return Targets(self.boxes[i], self.labels[i], self.valid[i])


@dataclass(frozen=True)
class Assignment:
    """The result every loss consumes.

    ``labels`` holds :data:`POSITIVE` / :data:`NEGATIVE` / :data:`IGNORED`;
    ``matched_gt``, ``box_targets`` and ``cls_targets`` are meaningful at positives
    (``-1`` / zeros elsewhere). ``pos_per_gt`` counts positives per ground truth and level.
    ``unreachable`` counts per image the positives whose target the coding cannot reach
    (see the module docstring); ``None`` where the assigner was given no ``reach``.
    """

    labels: Tensor  # [B, N] int8
    matched_gt: Tensor  # [B, N] long, -1 where not positive
    box_targets: Tensor  # [B, N, 4] xyxy
    cls_targets: Tensor  # [B, N] long, -1 where not positive
    pos_per_gt: Tensor  # [B, G, L] long
    unreachable: Tensor | None = None  # [B] long

    @property
    def positive(self) -> Tensor:
        return self.labels == POSITIVE

    @property
    def negative(self) -> Tensor:
        return self.labels == NEGATIVE

    @property
    def ignored(self) -> Tensor:
        return self.labels == IGNORED

    def stats(self, valid: Tensor) -> dict[str, Tensor]:
        """Assignment statistics: positives per GT per level, GTs without a positive, ignored per image,
        and (where counted) unreachable targets per image."""
        B = self.labels.shape[0]
        num_gt = valid.sum()
        denom = num_gt.clamp(min=1).float()
        per_gt = self.pos_per_gt.float() * valid[..., None]  # [B, G, L]
        out = {
            "num_pos": self.positive.sum().float(),
            "num_gt": num_gt.float(),
            "pos_per_gt": per_gt.sum() / denom,
            "gt_without_pos": ((self.pos_per_gt.sum(-1) == 0) & valid).sum().float(),
            "ignored_per_image": self.ignored.sum().float() / max(B, 1),
        }
        out["gt_without_pos_frac"] = out["gt_without_pos"] / denom
        if self.unreachable is not None:
            out["unreachable_per_image"] = self.unreachable.sum().float() / max(B, 1)
        for lvl in range(per_gt.shape[-1]):
            out[f"pos_per_gt_l{lvl}"] = per_gt[..., lvl].sum() / denom
        return out


# --------------------------------------------------------------------------- helpers
def _resolve(B: int, N: int, cand_n: Tensor, cand_ok: Tensor, score: Tensor) -> Tensor:
    """Resolve candidate (image, gt, anchor) matches into one GT per anchor.

    Args:
        cand_n: ``Tensor[B, G, K]`` anchor row of each candidate.
        cand_ok: ``Tensor[B, G, K]`` bool.
        score: ``Tensor[B, G, K]`` priority; the highest wins, ties to the later GT.

    Returns:
        ``Tensor[B, N]`` long matched GT, ``-1`` where none.
    """
    G, K = cand_n.shape[1], cand_n.shape[2]
    device = cand_n.device
    b_idx = torch.arange(B, device=device)[:, None, None].expand(B, G, K)
    g_idx = torch.arange(G, device=device)[None, :, None].expand(B, G, K)
    flat = (b_idx * N + cand_n)[cand_ok]  # [M]
    s = score.float()[cand_ok]
    g = g_idx[cand_ok]
    best = torch.full((B * N,), -math.inf, device=device)
    best.scatter_reduce_(0, flat, s, reduce="amax")
    win = s == best[flat]
    matched = torch.full((B * N,), -1, dtype=torch.long, device=device)
    matched.scatter_reduce_(0, flat[win], g[win], reduce="amax")
    return matched.view(B, N)


def _per_anchor_tables(priors: Priors) -> dict[str, Tensor]:
    """For every anchor id ``[A]``: its level's first row, grid width/height, anchors per cell,
    index within the level, and stride."""
    dev = priors.anchor_wh.device
    lvl = priors.anchor_level
    H = torch.tensor([s[0] for s in priors.level_shapes], device=dev)[lvl]
    W = torch.tensor([s[1] for s in priors.level_shapes], device=dev)[lvl]
    A = torch.tensor([s[2] for s in priors.level_shapes], device=dev)[lvl]
    off = torch.tensor(priors.level_offsets, device=dev)[lvl]
    first = torch.cumsum(torch.tensor([0] + [s[2] for s in priors.level_shapes[:-1]], device=dev), 0)[lvl]
    a_in = torch.arange(lvl.shape[0], device=dev) - first
    strides = torch.tensor(priors.level_strides, dtype=priors.stride.dtype, device=dev)[lvl]
    return {"H": H, "W": W, "A": A, "off": off, "a_in": a_in, "stride": strides}


def _cell_of(centre: Tensor, stride: Tensor, W: Tensor, H: Tensor) -> tuple[Tensor, Tensor]:
    """Grid cell (x, y) containing ``centre [..., 2]`` on levels given per trailing dim, clamped."""
    gx = torch.minimum((centre[..., 0] / stride).floor().long().clamp(min=0), W - 1)
    gy = torch.minimum((centre[..., 1] / stride).floor().long().clamp(min=0), H - 1)
    return gx, gy


def _reachable(priors: Priors, targets: Targets, reach: Tensor) -> Tensor:
    """Whether each prior's cell can reach each GT's centre: ``Tensor[B, N, G]`` bool.

    ``reach: Tensor[N, 2]`` is the closed range ``[lo, hi]`` of centre offsets (grid units
    from the cell's corner) on both axes.
    """
    c = xyxy_to_cxcywh(targets.boxes)  # [B, G, 4]
    lo, hi = reach[None, :, 0, None], reach[None, :, 1, None]  # [1, N, 1]
    ok = torch.ones(c.shape[0], priors.num, c.shape[1], dtype=torch.bool, device=c.device)
    for ax in (0, 1):  # x, y
        off = c[:, None, :, ax] / priors.stride[None, :, None] - priors.cell[None, :, ax, None]  # [B, N, G]
        ok &= (off >= lo) & (off <= hi)
    return ok


def _count_unreachable(priors: Priors, targets: Targets, matched: Tensor, reach: Tensor) -> Tensor:
    """Positives of ``matched [B, N]`` whose GT centre their cell cannot reach, per image: ``Tensor[B]``."""
    B, N = matched.shape
    if targets.boxes.shape[1] == 0:
        return torch.zeros(B, dtype=torch.long, device=matched.device)
    c = xyxy_to_cxcywh(targets.boxes).gather(1, matched.clamp(min=0)[..., None].expand(B, N, 4))  # [B, N, 4]
    off = c[..., :2] / priors.stride[:, None] - priors.cell  # [B, N, 2]
    out = ((off < reach[:, :1]) | (off > reach[:, 1:])).any(-1) & (matched >= 0)  # [B, N]
    return out.sum(1)


def _finish(priors: Priors, targets: Targets, matched: Tensor, ignored: Tensor | None = None) -> Assignment:
    """Build the :class:`Assignment` from ``matched [B, N]`` (and an optional ignored mask)."""
    B, N = matched.shape
    G = targets.boxes.shape[1]
    pos = matched >= 0
    labels = torch.full((B, N), NEGATIVE, dtype=torch.int8, device=matched.device)
    if ignored is not None:
        labels[ignored] = IGNORED
    labels[pos] = POSITIVE
    idx = matched.clamp(min=0)
    if G:
        box_t = targets.boxes.gather(1, idx[..., None].expand(B, N, 4)) * pos[..., None]
        cls_t = torch.where(pos, targets.labels.gather(1, idx), torch.full_like(idx, -1))
    else:
        box_t = torch.zeros(B, N, 4, device=matched.device)
        cls_t = torch.full((B, N), -1, dtype=torch.long, device=matched.device)
    L = priors.num_levels
    counts = torch.zeros(B * max(G, 1) * L, dtype=torch.long, device=matched.device)
    b_idx = torch.arange(B, device=matched.device)[:, None].expand(B, N)
    key = (b_idx * max(G, 1) + idx) * L + priors.level[None, :].expand(B, N)
    counts.index_add_(0, key[pos], torch.ones_like(key[pos]))
    return Assignment(labels, matched, box_t, cls_t, counts.view(B, max(G, 1), L)[:, :G])


# --------------------------------------------------------------------------- assigners
def _max_iou_match(iou: Tensor, valid: Tensor, pos_iou: float, low_quality: bool, min_pos_iou: float) -> Tensor:
    """Matched GT ``[B, N]`` (``-1``: none) of IoUs ``[B, N, G]`` (``-1`` where a pair may not match)."""
    best_iou, best_gt = iou.max(dim=2)  # [B, N]
    matched = torch.where(best_iou >= pos_iou, best_gt, torch.full_like(best_gt, -1))
    if low_quality:
        gt_best = iou.max(dim=1, keepdim=True).values  # [B, 1, G]
        ok = valid[:, None, :] & (gt_best > 0) & (gt_best >= min_pos_iou)
        is_best = (iou == gt_best) & ok  # [B, N, G]
        forced = torch.where(is_best, iou, torch.full_like(iou, -1.0))
        f_iou, f_gt = forced.max(dim=2)  # [B, N]
        matched = torch.where(f_iou >= 0, f_gt, matched)
    return matched


@torch.no_grad()
def assign_max_iou(
    priors: Priors,
    targets: Targets,
    pos_iou: float = 0.5,
    neg_iou: float = 0.4,
    low_quality: bool = True,
    min_pos_iou: float = 0.0,
    reach: Tensor | None = None,
) -> Assignment:
    """Max-IoU matching of anchor boxes to ground truths (Faster R-CNN, SSD, RetinaNet).

    IoU < ``neg_iou``: negative; IoU >= ``pos_iou``: positive; between: ignored.
    With ``low_quality``, each GT's best anchors (ties included) are positive for that GT
    when that IoU is >= ``min_pos_iou`` and > 0 (detectron2 ``Matcher``, SSD's
    bipartite step). 0.3/0.7 is the RPN / YOLOv3-paper setting, 0.4/0.5 RetinaNet,
    0.5/0.5 SSD.

    ``reach`` (``Tensor[N, 2]``, the coding's ``centre_range``; ``None``: unbounded) limits
    positives to pairs whose GT centre the anchor's cell can reach: on a YOLO coding the
    neighbouring cells' anchors overlap a GT but cannot place a centre in it. Such an
    anchor is ignored where its IoU would have made it positive (it is no background
    either); the low-quality match of a GT is its best *reachable* anchor. What the
    restriction removed is counted in ``Assignment.unreachable``.
    """
    B, G = targets.valid.shape
    N = priors.num
    if G == 0:
        out = _finish(priors, targets, torch.full((B, N), -1, dtype=torch.long, device=priors.boxes.device))
        return out if reach is None else replace(out, unreachable=torch.zeros(B, dtype=torch.long, device=out.labels.device))
    iou = box_iou(priors.boxes, targets.boxes.reshape(-1, 4)).view(N, B, G).permute(1, 0, 2)  # [B, N, G]
    iou = torch.where(targets.valid[:, None, :], iou, torch.full_like(iou, -1.0))
    ignored = iou.amax(dim=2) >= neg_iou  # [B, N]; positives override it
    if reach is None:
        return _finish(priors, targets, _max_iou_match(iou, targets.valid, pos_iou, low_quality, min_pos_iou), ignored)
    ok = _reachable(priors, targets, reach)  # [B, N, G]
    matched = _max_iou_match(iou.masked_fill(~ok, -1.0), targets.valid, pos_iou, low_quality, min_pos_iou)
    plain = _max_iou_match(iou, targets.valid, pos_iou, low_quality, min_pos_iou)  # [B, N]
    lost = (plain >= 0) & ~ok.gather(2, plain.clamp(min=0)[..., None]).squeeze(2)  # [B, N]
    return replace(_finish(priors, targets, matched, ignored), unreachable=lost.sum(1))


@torch.no_grad()
def assign_best_anchor(priors: Priors, targets: Targets, iou_thresh: float | None = None) -> Assignment:
    """YOLOv2/v3 matching: each GT goes to its centre cell and its best anchor by shape IoU
    across all levels (Redmon & Farhadi 2018, sec. 2.1). ``iou_thresh`` (YOLOv4, 0.213)
    also makes positive every other anchor whose shape IoU exceeds it, in its own
    level's centre cell (darknet ``iou_thresh``)."""
    B, G = targets.valid.shape
    N = priors.num
    t = _per_anchor_tables(priors)
    cxcywh = xyxy_to_cxcywh(targets.boxes)  # [B, G, 4]
    shape_iou = wh_iou(cxcywh[..., 2:], priors.anchor_wh)  # [B, G, A]
    best = shape_iou.argmax(-1, keepdim=True)  # [B, G, 1]
    A = priors.anchor_wh.shape[0]
    a_idx = torch.arange(A, device=best.device)
    ok = a_idx == best
    if iou_thresh is not None:
        ok = ok | (shape_iou > iou_thresh)
    ok = ok & targets.valid[..., None]
    gx, gy = _cell_of(cxcywh[..., None, :2], t["stride"], t["W"], t["H"])  # [B, G, A]
    cand_n = t["off"] + (gy * t["W"] + gx) * t["A"] + t["a_in"]
    return _finish(priors, targets, _resolve(B, N, cand_n, ok, shape_iou))


@torch.no_grad()
def assign_wh_ratio(priors: Priors, targets: Targets, anchor_t: float = 4.0) -> Assignment:
    """Scaled-YOLOv4 / YOLOv5 matching (ultralytics ``build_targets``).

    A GT matches every anchor, on every level, whose width and height ratios to it are
    all below ``anchor_t`` (``max(r, 1/r) < anchor_t``); each match is assigned to the GT's
    centre cell and to the two neighbouring cells nearest the centre (offset 0.5), where
    they exist.

    The cells are the reference's; its rows are not always. ultralytics keeps one row per
    (GT, anchor, cell) and so repeats rows in two cases, each counted again in its per-level
    box and class means: a centre exactly on a cell border (its right/down test
    ``(W - g) % 1 < 0.5`` also holds at fraction 0, where the offset ``-0.5`` truncates back
    to the centre cell: the centre cell twice, no far neighbour), and two GTs claiming the
    same (anchor, cell), both kept (the last ``tobj`` write wins). Here an anchor row has
    one GT: the one with the smaller size ratio (ties: the later GT), once.
    """
    B, G = targets.valid.shape
    N = priors.num
    t = _per_anchor_tables(priors)
    cxcywh = xyxy_to_cxcywh(targets.boxes)  # [B, G, 4]
    r = cxcywh[..., None, 2:] / priors.anchor_wh  # [B, G, A, 2]
    ratio = torch.maximum(r, 1 / r.clamp(min=1e-9)).amax(-1)  # [B, G, A]
    match = (ratio < anchor_t) & targets.valid[..., None]
    g = cxcywh[..., None, :2] / t["stride"][:, None]  # [B, G, A, 2] centre in grid units
    gx, gy = _cell_of(cxcywh[..., None, :2], t["stride"], t["W"], t["H"])  # [B, G, A]
    frac = g - g.floor()
    inv = torch.stack((t["W"], t["H"]), -1) - g  # distance to the far edge
    left = (frac[..., 0] < 0.5) & (g[..., 0] > 1)
    up = (frac[..., 1] < 0.5) & (g[..., 1] > 1)
    # strictly past the middle: the same cells as ultralytics' `(W - g) % 1 < 0.5`, which at fraction 0
    # (a centre on a cell border) selects its centre cell a second time rather than a neighbour
    right = (frac[..., 0] > 0.5) & (inv[..., 0] > 1)
    down = (frac[..., 1] > 0.5) & (inv[..., 1] > 1)
    dx = torch.tensor([0, -1, 0, 1, 0], device=gx.device)
    dy = torch.tensor([0, 0, -1, 0, 1], device=gx.device)
    use = torch.stack((torch.ones_like(left), left, up, right, down), -1) & match[..., None]  # [B, G, A, 5]
    cx = (gx[..., None] + dx).clamp(min=0) ; cy = (gy[..., None] + dy).clamp(min=0)
    cx = torch.minimum(cx, (t["W"] - 1)[:, None]); cy = torch.minimum(cy, (t["H"] - 1)[:, None])
    cand_n = t["off"][:, None] + (cy * t["W"][:, None] + cx) * t["A"][:, None] + t["a_in"][:, None]
    score = (-ratio)[..., None].expand_as(use)
    return _finish(priors, targets, _resolve(B, N, cand_n.flatten(2), use.flatten(2), score.flatten(2)))


@torch.no_grad()
def assign_yolov1(priors: Priors, targets: Targets, decoded: Tensor) -> Assignment:
    """YOLOv1: of the predictors in the GT's centre cell, the one whose *decoded* box has
    the highest IoU with the GT is responsible (Redmon et al. 2016, sec. 2.2). On a
    multi-level layout the candidates are the centre cells of every level.

    Args:
        decoded: ``Tensor[B, N, 4]`` decoded predictions (detached).
    """
    B, G = targets.valid.shape
    N = priors.num
    t = _per_anchor_tables(priors)
    cxcywh = xyxy_to_cxcywh(targets.boxes)
    gx, gy = _cell_of(cxcywh[..., None, :2], t["stride"], t["W"], t["H"])  # [B, G, A]
    cand_n = t["off"] + (gy * t["W"] + gx) * t["A"] + t["a_in"]  # [B, G, A]
    A = cand_n.shape[-1]
    cand_boxes = decoded.gather(1, cand_n.reshape(B, G * A, 1).expand(B, G * A, 4)).view(B, G, A, 4)
    iou = elementwise_iou(cand_boxes, targets.boxes[:, :, None, :])  # [B, G, A]
    best = iou.argmax(-1, keepdim=True)  # [B, G, 1]
    ok = (torch.arange(A, device=iou.device) == best) & targets.valid[..., None]
    return _finish(priors, targets, _resolve(B, N, cand_n, ok, iou))


@torch.no_grad()
def _best_iou(decoded: Tensor, targets: Targets) -> Tensor:
    """Each box's highest IoU with a valid GT of its image: ``Tensor[B, N, 4] -> Tensor[B, N]``
    (0 where the image has none; NaN where a box is NaN).

    ``box_iou_batched(...).amax(-1)`` with the same float operations in the same order (so
    the same values), one GT column at a time: its temporaries are ``[B, N]``, not the
    ``[B, N, G, 2]`` of the pairwise form (~130 ms of a 640 px, B = 16 loss step). A padded GT
    becomes an inverted infinite box, whose intersection with anything is 0; columns no
    image uses are skipped.
    """
    B, N = decoded.shape[:2]
    x1, y1, x2, y2 = (c.contiguous() for c in decoded.float().unbind(-1))  # [B, N] each
    area1 = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    inf = torch.tensor((math.inf, math.inf, -math.inf, -math.inf), device=decoded.device)
    gts = torch.where(targets.valid[..., None], targets.boxes.float(), inf)  # [B, G, 4]
    area2 = (gts[..., 2] - gts[..., 0]).clamp(min=0) * (gts[..., 3] - gts[..., 1]).clamp(min=0)  # [B, G]
    best = torch.zeros(B, N, device=decoded.device)
    for j in targets.valid.any(0).nonzero().flatten().tolist():
        g = gts[:, j, :, None]  # [B, 4, 1]
        iw = torch.minimum(x2, g[:, 2]).sub_(torch.maximum(x1, g[:, 0])).clamp_(min=0)
        ih = torch.minimum(y2, g[:, 3]).sub_(torch.maximum(y1, g[:, 1])).clamp_(min=0)
        inter = iw.mul_(ih)
        union = (area1 + area2[:, j, None]).sub_(inter)
        best = torch.maximum(best, inter.div_(union.add_(EPS)))
    return best


@torch.no_grad()
def apply_ignore_mask(assignment: Assignment, decoded: Tensor, targets: Targets, ignore_thresh: float) -> Assignment:
    """YOLOv2/v3's ignore mask: a negative whose *decoded prediction* overlaps any GT with
    IoU > ``ignore_thresh`` is ignored, i.e. gets no objectness loss (darknet
    ``ignore_thresh``, Redmon & Farhadi 2018, sec. 2.1).

    Args:
        decoded: ``Tensor[B, N, 4]`` decoded predictions (detached).
    """
    if targets.boxes.shape[1] == 0:
        return assignment
    over = _best_iou(decoded, targets) > ignore_thresh  # [B, N]
    labels = assignment.labels.clone()
    labels[(labels == NEGATIVE) & over] = IGNORED
    return replace(assignment, labels=labels)


def assign(
    name: str,
    priors: Priors,
    targets: Targets,
    decoded: Tensor | None = None,
    *,
    pos_iou: float = 0.5,
    neg_iou: float = 0.4,
    low_quality: bool = True,
    min_pos_iou: float = 0.0,
    iou_thresh: float | None = None,
    anchor_t: float = 4.0,
    ignore_thresh: float | None = None,
    reach: Tensor | None = None,
) -> Assignment:
    """Run the assigner ``name`` and then, if ``ignore_thresh`` is set, the ignore mask.

    ``reach``: the coding's ``centre_range(priors)`` (``Tensor[N, 2]``, ``None`` where
    unbounded). ``max_iou`` restricts its positives to it; every assigner's result counts
    the unreachable targets (``Assignment.unreachable``, 0 for an unbounded coding).
    """
    if name == "max_iou":
        a = assign_max_iou(priors, targets, pos_iou, neg_iou, low_quality, min_pos_iou, reach)
    elif name == "best_anchor":
        a = assign_best_anchor(priors, targets, iou_thresh)
    elif name == "wh_ratio":
        a = assign_wh_ratio(priors, targets, anchor_t)
    elif name == "yolov1":
        if decoded is None:
            raise ValueError("the yolov1 assigner needs decoded predictions")
        a = assign_yolov1(priors, targets, decoded)
    else:
        raise ValueError(f"unknown assigner {name!r}; choose one of {', '.join(ASSIGNERS)}")
    if a.unreachable is None:
        B = targets.valid.shape[0]
        count = (torch.zeros(B, dtype=torch.long, device=a.labels.device) if reach is None
                 else _count_unreachable(priors, targets, a.matched_gt, reach))
        a = replace(a, unreachable=count)
    if ignore_thresh is not None:
        if decoded is None:
            raise ValueError("the ignore mask needs decoded predictions")
        a = apply_ignore_mask(a, decoded, targets, ignore_thresh)
    return a
