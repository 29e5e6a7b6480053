"""Raw head outputs -> per-image detections: class confidences, decoding, batched NMS.

The head output is ``Tensor[B, N, K]`` with rows in prior order and
``K = 4 box offsets (+ 1 objectness logit) + C class logits (+ 1 background logit)``
(see :meth:`~ablate.detect.recipe.LossRecipe.head_channels`). Post-processing is the
usual one-stage recipe (YOLOv5 ``non_max_suppression`` with ``multi_label=True``,
mmdet's multi-class NMS):

1. per-class confidence ``Tensor[B, N, C]`` (:func:`scores_from_logits`);
2. every (prior, class) pair above ``conf_thresh`` is a candidate, so one box can be
   reported for several classes;
3. the ``pre_nms_topk`` best candidates of an image are decoded, clipped to the input
   image and suppressed class by class;
4. the ``max_det`` best survivors of an image are kept.

The whole batch is suppressed at once, grouped by ``image * C + class``, on ``pred``'s device
(:func:`grouped_nms`): an image's detections are those of a per-image, per-class NMS, whatever
else is in the batch.

:func:`oracle_prediction` is the inverse, for export checks: a raw head output that
decodes to given boxes and classes with near-certain confidence.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import batched_nms, nms

from .anchors import Priors
from .assign import Targets, assign
from .boxes import box_iou, elementwise_iou
from .coding import build_coding
from .recipe import LossRecipe


class Detections(NamedTuple):
    """Detections of one image, best first, in pixels of the network input."""

    boxes: Tensor  # [D, 4] xyxy, clipped to the input image
    scores: Tensor  # [D] confidence in (0, 1]
    labels: Tensor  # [D] long, contiguous class index 0..C-1 (no background)


def split_head(pred: Tensor, recipe: LossRecipe) -> tuple[Tensor, Tensor | None, Tensor]:
    """``Tensor[B, N, K]`` -> box offsets ``[B, N, 4]``, objectness logits ``[B, N]`` or None,
    class logits ``[B, N, C (+1)]`` (background at index 0 when ``recipe.background_class``)."""
    t = pred[..., :4]
    if recipe.has_objectness:
        return t, pred[..., 4], pred[..., 5:]
    return t, None, pred[..., 4:]


def scores_from_logits(pred: Tensor, recipe: LossRecipe) -> Tensor:
    """Per-class confidence of every prior: ``Tensor[B, N, K] -> Tensor[B, N, C]`` (float32).

    * with objectness: ``sigmoid(obj) * p(class)``, where ``p`` is a sigmoid per class for
      ``bce`` / ``focal`` class losses and a softmax over the C classes for ``ce`` / ``sse``
      (objectness is a sigmoid for every objectness loss: ``bce``, ``mse`` on the
      probability, ``focal``);
    * without objectness: a sigmoid per class for ``bce`` / ``focal`` (RetinaNet); for
      ``ce`` / ``sse`` (SSD) a softmax over the C + 1 logits whose background column
      (index 0) is then dropped.
    """
    _, obj, cls = split_head(pred.float(), recipe)
    if recipe.cls_loss in ("bce", "focal"):
        prob = torch.sigmoid(cls)  # [B, N, C]
    elif recipe.background_class:
        prob = torch.softmax(cls, dim=-1)[..., 1:]  # [B, N, C + 1] -> [B, N, C]
    else:
        prob = torch.softmax(cls, dim=-1)  # [B, N, C]
    if obj is not None:
        prob = torch.sigmoid(obj)[..., None] * prob
    return prob


def num_classes_of(pred: Tensor, recipe: LossRecipe) -> int:
    """C, the number of object classes of a head output ``Tensor[B, N, K]``."""
    return pred.shape[-1] - 4 - int(recipe.has_objectness) - int(recipe.background_class)


def postprocess(
    pred: Tensor,
    priors: Priors,
    recipe: LossRecipe,
    conf_thresh: float = 0.001,
    nms_iou: float = 0.6,
    max_det: int = 100,
    pre_nms_topk: int = 3000,
) -> list[Detections]:
    """Raw head outputs to detections, one :class:`Detections` per image.

    Args:
        pred: ``Tensor[B, N, K]`` raw head output, ``N = priors.num``, any float dtype.
        priors: the head's priors (on ``pred``'s device).
        recipe: gives the coding and the head layout.
        conf_thresh: a (prior, class) pair is a candidate if its score is ``> conf_thresh``.
        nms_iou: IoU above which a lower-scored box of the same class is suppressed.
        max_det: detections kept per image after NMS.
        pre_nms_topk: candidates per image kept, by score, before NMS.

    Returns:
        ``B`` detections in input pixels: boxes ``[D, 4]`` xyxy clipped to the input,
        scores ``[D]`` descending, labels ``[D]`` (0..C-1), ``D <= max_det``. Boxes that
        are empty after clipping or not finite are dropped.
    """
    B, N, K = pred.shape
    if N != priors.num:
        raise ValueError(f"pred has {N} rows, the priors {priors.num}")
    C = num_classes_of(pred, recipe)
    if C < 1:
        raise ValueError(f"pred has {K} channels: no class logits for recipe {recipe.name!r}")
    if B == 0:
        return []
    coding = build_coding(recipe.coding, recipe.scale_xy, recipe.variances)
    flat = scores_from_logits(pred, recipe).reshape(B, N * C)  # [B, N*C]
    img, idx, val = _candidates(flat, conf_thresh, pre_nms_topk)  # [M] each, image-major
    rows, labels = idx // C, idx % C  # [M], [M]
    boxes = coding.decode(pred[img, rows, :4].float(), priors.rows(rows))  # [M, 4]
    H, W = priors.image_size
    boxes = torch.stack(
        (boxes[:, 0].clamp(0, W), boxes[:, 1].clamp(0, H), boxes[:, 2].clamp(0, W), boxes[:, 3].clamp(0, H)), -1
    )
    ok = torch.isfinite(boxes).all(1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, val, labels, img = boxes[ok], val[ok], labels[ok], img[ok]
    keep = grouped_nms(boxes, val, img * C + labels, nms_iou)  # [D] by score, descending
    keep = keep[torch.sort(img[keep], stable=True).indices]  # grouped by image, by score within each
    counts = torch.bincount(img[keep], minlength=B)  # [B]
    rank = torch.arange(keep.numel(), device=keep.device) - (counts.cumsum(0) - counts)[img[keep]]
    keep = keep[rank < max_det]
    sizes = counts.clamp(max=max_det).tolist()
    return [Detections(b, s, lab) for b, s, lab in
            zip(boxes[keep].split(sizes), val[keep].split(sizes), labels[keep].split(sizes))]


def grouped_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float,
                per_group: bool | None = None) -> Tensor:
    """NMS within each group: the indices kept, ``Tensor[D]`` long, by score, descending.

    Args:
        boxes: ``Tensor[M, 4]`` xyxy. scores: ``Tensor[M]``. groups: ``Tensor[M]`` long >= 0
            (``image * C + class``: boxes of different groups never suppress each other).
        iou_threshold: a box whose IoU with a better one of its group is above this is dropped.
        per_group: one ``nms`` per group, over one sort of the boxes by group (the default on
            the CPU, where ``batched_nms`` would scan every box once per group, or every pair);
            otherwise one ``torchvision.ops.batched_nms`` call (the default on a GPU: one kernel,
            its coordinate trick, up to 25,000 boxes; beyond, torchvision's loop over the groups),
            in float64: the trick's offsets reach ``groups.max() * (max coordinate + 1)``, ~8e5 px
            for 16 images of 80 classes at 640 px, where float32 keeps 1/16 px and would move IoUs.
    """
    if per_group is None:
        per_group = boxes.device.type == "cpu"
    if not per_group:
        return batched_nms(boxes.double(), scores.double(), groups, iou_threshold)
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(groups, stable=True).indices  # [M]
    b, s = boxes[order], scores[order]
    keep, start = [], 0
    for n in torch.bincount(groups[order]).tolist():
        if n:
            keep.append(nms(b[start : start + n], s[start : start + n], iou_threshold) + start)
            start += n
    kept = order[torch.cat(keep)]
    return kept[scores[kept].sort(descending=True, stable=True).indices]


def _candidates(flat: Tensor, conf_thresh: float, pre_nms_topk: int) -> tuple[Tensor, Tensor, Tensor]:
    """The (image, prior * C + class) pairs scoring ``> conf_thresh``, at most ``pre_nms_topk`` per
    image (the best): ``Tensor[B, N*C]`` -> image ``[M]``, flat index ``[M]``, score ``[M]``, best
    first within each image. One top-k over the batch, whatever the number of candidates (counting
    them first costs about as much as the top-k)."""
    B, NC = flat.shape
    val, idx = flat.topk(min(pre_nms_topk, NC), dim=1)  # [B, k]
    img = torch.arange(B, device=flat.device)[:, None].expand_as(idx)
    ok = val > conf_thresh
    return img[ok], idx[ok], val[ok]


class OraclePrediction(NamedTuple):
    """What :func:`oracle_prediction` built, and what it could not place."""

    pred: Tensor  # [1, N, K] raw head output
    unplaced: int  # ground truths left without any row
    unreachable: int  # assigned rows dropped because the coding cannot represent their box there


@torch.no_grad()
def oracle_prediction(
    boxes: Tensor,
    labels: Tensor,
    priors: Priors,
    recipe: LossRecipe,
    num_classes: int,
    logit: float = 12.0,
) -> OraclePrediction:
    """A raw head output ``Tensor[1, N, K]`` that :func:`postprocess` turns back into ``boxes``.

    For the export check: it exercises the coding, the score layout of the head and the
    coordinate path to COCO results, without a trained model.

    Rows: the positives of the recipe's own assigner (``assign(recipe.assigner, ...)`` with
    its settings, no ignore mask; YOLOv1's assigner sees the priors' cell boxes as the
    current predictions), so the boxes are encoded where training puts them. An assigned
    row whose coding cannot represent its box (``decode(encode(box))`` has IoU <= 0.99
    with it) is dropped and counted in ``unreachable``. (For a centre exactly on the border
    between cells ``k - 1`` and ``k``, ``wh_ratio`` gives cell ``k`` (offset 0) and ``k - 1``
    (offset 1), both within ``2 sigma - 0.5``'s range, and not ``k + 1`` (offset -1): the
    cells of ultralytics' ``build_targets``, which lists cell ``k`` twice instead.) A ground
    truth left with no row (two in one cell with the same best anchor) falls back to the
    free row with the highest prior-box IoU among those that can represent it; one that
    finds none is counted in ``unplaced``.

    At the chosen rows: ``t = coding.encode(box)``, objectness ``+logit``, the box's class
    ``+logit``, every other class and the background ``-logit``. Elsewhere: ``t = 0``,
    objectness and classes ``-logit``, background ``+logit``.

    Args:
        boxes: ``Tensor[G, 4]`` xyxy in input pixels. labels: ``Tensor[G]`` long, 0..C-1.
    """
    device = priors.boxes.device
    boxes = boxes.to(device, torch.float32).reshape(-1, 4)  # [G, 4]
    labels = labels.to(device, torch.long).reshape(-1)  # [G]
    G, N = boxes.shape[0], priors.num
    coding = build_coding(recipe.coding, recipe.scale_xy, recipe.variances)
    K = recipe.head_channels(num_classes)
    pred = torch.full((1, N, K), -logit, device=device)
    pred[..., :4] = 0.0
    if recipe.background_class:
        pred[..., 4] = logit
    if G == 0:
        return OraclePrediction(pred, 0, 0)

    def reachable(rows: Tensor, gt: Tensor) -> Tensor:  # [R], [R] -> [R] bool
        p = priors.rows(rows)
        back = coding.decode(coding.encode(boxes[gt], p), p)  # [R, 4]
        return elementwise_iou(back, boxes[gt]) > 0.99

    targets = Targets(boxes[None], labels[None], torch.ones(1, G, dtype=torch.bool, device=device))
    decoded = priors.boxes[None]  # [1, N, 4]: the yolov1 assigner's "current predictions"
    a = assign(recipe.assigner, priors, targets, decoded, pos_iou=recipe.pos_iou, neg_iou=recipe.neg_iou,
               low_quality=recipe.low_quality, min_pos_iou=recipe.min_pos_iou, iou_thresh=recipe.iou_thresh,
               anchor_t=recipe.anchor_t, reach=coding.centre_range(priors))
    matched = a.matched_gt[0].clone()  # [N], -1 where not positive
    rows = (matched >= 0).nonzero().squeeze(1)  # [P]
    ok = reachable(rows, matched[rows])
    matched[rows[~ok]] = -1
    placed = torch.zeros(G, dtype=torch.bool, device=device)
    placed[matched[matched >= 0]] = True
    unplaced = 0
    rows_all = torch.arange(N, device=device)
    for g in (~placed).nonzero().squeeze(1).tolist():  # a loop over the few left-over GTs only
        fits = reachable(rows_all, torch.full_like(rows_all, g))  # [N]
        score = box_iou(priors.boxes, boxes[g : g + 1]).squeeze(1)  # [N]
        score = torch.where(fits & (matched < 0), score, torch.full_like(score, -1.0))
        best = int(score.argmax())
        if score[best] < 0:
            unplaced += 1
        else:
            matched[best] = g
    rows = (matched >= 0).nonzero().squeeze(1)  # [P]
    gt = matched[rows]  # [P]
    pred[0, rows, :4] = coding.encode(boxes[gt], priors.rows(rows))
    first_cls = 4 + int(recipe.has_objectness)
    if recipe.has_objectness:
        pred[0, rows, 4] = logit
    if recipe.background_class:
        pred[0, rows, first_cls] = -logit
    pred[0, rows, first_cls + int(recipe.background_class) + labels[gt]] = logit
    return OraclePrediction(pred, unplaced, int((~ok).sum()))
