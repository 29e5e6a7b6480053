"""The criterion: raw head outputs + targets -> named unweighted losses, weighted total, statistics.

Flow per batch (detr ``SetCriterion`` style):

1. decode the box offsets of the head output ``Tensor[B, N, 4 + obj + C (+1)]`` once,
   detached, where the assigner or the ignore mask needs the current predictions;
2. assign once under ``no_grad``;
3. take from the head output only what the terms read: on heads with objectness the
   positives' rows and the objectness column, in one op whose backward writes one
   gradient tensor (:class:`_RowsAndColumn`); on heads without it the box offsets and the
   class logits of every row (one split);
4. compute each term on the rows it concerns: the box term on positives only, the
   objectness / background terms on positives and (kept) negatives;
5. normalise (:meth:`Criterion._normalise`), and weight with the recipe's lambdas (times
   the batch size with ``scale_by_batch``, as YOLOv5's ``loss * bs``).

Loss names: ``box``, ``cls`` (positives), ``obj`` (positives' objectness) and ``noobj``
(what negatives pay: their objectness, or their background-class loss on heads without
objectness). Weights: ``box * lambda_box``, ``obj * lambda_obj``,
``noobj * lambda_noobj * (lambda_obj or lambda_cls)``, ``cls * lambda_cls``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import losses as L
from .anchors import AnchorLayout, Priors, build_priors, get_layout
from .assign import Assignment, Targets, assign
from .boxes import EPS, elementwise_iou, xyxy_to_cxcywh
from .coding import build_coding
from .recipe import LossRecipe


class _RowsAndColumn(torch.autograd.Function):
    """``pred[b_idx, n_idx]`` and ``pred[..., col]`` of ``pred: Tensor[B, N, K]`` as one op:
    ``(Tensor[P, K], Tensor[B, N])``, both new contiguous tensors.

    Its backward writes the gradient of ``pred`` into one zero-filled ``[B, N, K]`` tensor
    (the column's gradient, then the rows' added at their positions) where indexing and
    splitting ``pred`` term by term would build a full-size zero tensor per term and
    concatenate them (on a ``[16, 25200, 85]`` head that assembly was most of the loss step).
    The sums are the same additions; the gradient agrees with the term-by-term version's to
    float rounding (the elementwise kernels now read a contiguous column: the last bit can
    differ).
    """

    @staticmethod
    def forward(ctx, pred: Tensor, b_idx: Tensor, n_idx: Tensor, col: int):  # type: ignore[override]
        ctx.save_for_backward(b_idx, n_idx)
        ctx.col, ctx.shape, ctx.dtype = col, pred.shape, pred.dtype
        return pred[b_idx, n_idx], pred[..., col].clone(memory_format=torch.contiguous_format)

    @staticmethod
    def backward(ctx, g_rows: Tensor | None, g_col: Tensor | None):  # type: ignore[override]
        b_idx, n_idx = ctx.saved_tensors
        grad = torch.zeros(ctx.shape, dtype=ctx.dtype, device=b_idx.device)
        if g_col is not None:
            grad[..., ctx.col] = g_col
        if g_rows is not None:
            grad.index_put_((b_idx, n_idx), g_rows.to(ctx.dtype), accumulate=True)
        return grad, None, None, None


@dataclass
class CriterionOutput:
    losses: dict[str, Tensor]  # unweighted, normalised
    weighted: dict[str, Tensor]
    total: Tensor
    stats: dict[str, Tensor]
    assignment: Assignment


class Criterion:
    """Loss of one recipe for a fixed head layout (priors) and number of classes."""

    def __init__(self, recipe: LossRecipe, priors: Priors, num_classes: int):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        layout = get_layout(recipe.anchors)
        if len(priors.level_shapes) != len(layout.levels):
            raise ValueError(f"priors have {len(priors.level_shapes)} levels, anchors={recipe.anchors} has {len(layout.levels)}")
        self.recipe = recipe
        self.priors = priors
        self.num_classes = num_classes
        self.coding = build_coding(recipe.coding, recipe.scale_xy, recipe.variances)
        self._reach = self.coding.centre_range(priors)  # [N, 2] centre offsets each prior can reach; None: unbounded
        self.channels = recipe.head_channels(num_classes)
        balance = recipe.level_balance or (1.0,) * priors.num_levels
        self._level_weight = torch.tensor(balance, dtype=torch.float32, device=priors.boxes.device)[priors.level]  # [N]
        if recipe.normalize in ("mean", "level_mean"):
            counts = torch.tensor([h * w * a for h, w, a in priors.level_shapes], dtype=torch.float32,
                                  device=priors.boxes.device)
            self._level_weight = self._level_weight / counts[priors.level]

    # ------------------------------------------------------------------ helpers
    def _needs_decoded(self) -> bool:
        r = self.recipe
        return r.assigner == "yolov1" or r.ignore_thresh is not None

    def _box_loss(self, t_pos: Tensor, rows, box_tgt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-positive box loss ``[P]``, the detached IoU of the decoded prediction ``[P]``
        and the positives' objectness target ``[P]`` (``obj_target``: 1, that IoU, or the
        detached CIoU clamped at 0, YOLOv5's ``tobj = bbox_iou(..., CIoU=True).detach().clamp(0)``)."""
        r = self.recipe
        pred_boxes = self.coding.decode(t_pos, rows)  # [P, 4]
        with torch.no_grad():
            iou = elementwise_iou(pred_boxes.detach(), box_tgt).clamp(min=0)
            if r.obj_target == "ciou":
                obj_t = (1.0 - L.ciou_loss(pred_boxes.detach(), box_tgt)).clamp(min=0)
            else:
                obj_t = iou if r.obj_target == "iou" else torch.ones_like(iou)
        if r.box_loss in L.IOU_LOSSES:
            if r.box_loss == "ciou":
                loss = L.ciou_loss(pred_boxes, box_tgt, iou_gate=r.ciou_iou_gate)
            else:
                loss = L.IOU_LOSSES[r.box_loss](pred_boxes, box_tgt)
        elif r.box_loss == "mse":
            loss = L.mse_loss(self.coding.activate(t_pos, rows), self.coding.target(box_tgt, rows))
        elif r.box_loss == "smooth_l1":
            loss = L.smooth_l1_loss(self.coding.activate(t_pos, rows), self.coding.target(box_tgt, rows), r.smooth_l1_beta)
        elif r.coding == "yolov1":  # sse_sqrt on YOLOv1's coding: its outputs are (x, y, sqrt w, sqrt h) (sec. 2.2)
            loss = L.mse_loss(t_pos, self.coding.target(box_tgt, rows))
        else:  # sse_sqrt on another coding: YOLOv1's (x, y, sqrt w, sqrt h) of the decoded box
            H, W = self.priors.image_size
            scale = torch.tensor((W, H), dtype=torch.float32, device=t_pos.device)

            def v(b: Tensor) -> Tensor:
                c = xyxy_to_cxcywh(b.float())
                off = c[..., :2] / rows.stride[..., None] - rows.cell
                return torch.cat((off, torch.sqrt(c[..., 2:].clamp(min=0) / scale + EPS)), -1)

            loss = L.mse_loss(v(pred_boxes), v(box_tgt))
        if r.box_small_weight:
            H, W = self.priors.image_size
            wh = xyxy_to_cxcywh(box_tgt)[..., 2:]
            loss = loss * (2.0 - wh[..., 0] * wh[..., 1] / (W * H))
        return loss, iou, obj_t

    def _elementwise_obj(self, logits: Tensor, target: Tensor) -> Tensor:
        r = self.recipe
        if r.obj_loss == "bce":
            return L.bce_loss(logits, target)
        if r.obj_loss == "mse":
            return L.mse_prob_loss(logits, target)
        return L.sigmoid_focal_loss(logits, target, r.focal_alpha, r.focal_gamma)

    def _cls_positive(self, logits: Tensor, cls: Tensor) -> Tensor:
        """Class loss of positives on a head with objectness: ``[P, C], [P] -> [P]``."""
        r = self.recipe
        if r.cls_loss == "ce":
            return L.softmax_ce_loss(logits, cls, r.label_smoothing)
        onehot = F.one_hot(cls, self.num_classes).float()
        if r.cls_loss == "sse":
            return L.sse_prob_loss(logits, onehot)
        if r.label_smoothing:  # YOLOv5 smooth_BCE: positives 1 - eps/2, negatives eps/2
            onehot = onehot * (1.0 - r.label_smoothing) + 0.5 * r.label_smoothing
        if r.cls_loss == "bce":
            return L.bce_loss(logits, onehot).sum(-1)
        return L.sigmoid_focal_loss(logits, onehot, r.focal_alpha, r.focal_gamma).sum(-1)

    # ------------------------------------------------------------------ forward
    def __call__(self, pred: Tensor, targets: Targets) -> CriterionOutput:
        """Args:
            pred: ``Tensor[B, N, K]`` raw head outputs, rows in prior order, ``K = head_channels``.
            targets: padded ground truths in network-input pixels.
        """
        r, priors = self.recipe, self.priors
        B, N, K = pred.shape
        if N != priors.num or K != self.channels:
            raise ValueError(f"pred has shape {tuple(pred.shape)}, expected [B, {priors.num}, {self.channels}]")
        t = pred[..., :4]  # [B, N, 4]
        decoded = self.coding.decode(t.detach().float(), priors) if self._needs_decoded() else None  # [B, N, 4]
        a = assign(
            r.assigner, priors, targets, decoded,
            pos_iou=r.pos_iou, neg_iou=r.neg_iou, low_quality=r.low_quality, min_pos_iou=r.min_pos_iou,
            iou_thresh=r.iou_thresh, anchor_t=r.anchor_t, ignore_thresh=r.ignore_thresh, reach=self._reach,
        )
        pos, neg = a.positive, a.negative  # [B, N]
        b_idx, n_idx = pos.nonzero(as_tuple=True)  # [P]
        P = b_idx.numel()
        num_pos_img = pos.sum(1)  # [B]
        rows = priors.rows(n_idx)

        if r.has_objectness:  # every term reads the positives' rows or the objectness column: gather just those
            pos_rows, obj_logits = _RowsAndColumn.apply(pred, b_idx, n_idx, 4)  # [P, K], [B, N]
            t_pos = pos_rows[:, :4]
        else:  # the class term reads every row: one split, whose backward is one concatenation
            t_all, cls_logits = pred.split([4, K - 4], dim=-1)  # [B, N, 4], [B, N, C + 1]
            t_pos = t_all[b_idx, n_idx]
        box_each, iou_pos, obj_pos_t = self._box_loss(t_pos, rows, a.box_targets[b_idx, n_idx])  # [P] each
        # level_mean: each positive weighs 1 / (positives on its level), so that the sums below are per-level means
        pos_w = self._per_level_mean_weight(n_idx) if r.normalize == "level_mean" else None  # [P]
        out: dict[str, Tensor] = {"box": L.reduce_loss(box_each, pos_w)}
        lvl_w = self._level_weight  # [N]

        if r.has_objectness:
            l_pos = self._elementwise_obj(pos_rows[:, 4], obj_pos_t)  # [P]
            l_neg = self._elementwise_obj(obj_logits, torch.zeros_like(obj_logits))  # [B, N]
            keep = neg
            if r.neg_mining == "ohem":
                keep = L.ohem_negative_mask(l_neg, neg, num_pos_img, r.neg_pos_ratio)
            out["obj"] = L.reduce_loss(l_pos, lvl_w[n_idx])
            out["noobj"] = L.reduce_loss(l_neg, keep * lvl_w)
            cls_each = self._cls_positive(pos_rows[:, 5:], a.cls_targets[b_idx, n_idx])  # [P]
            out["cls"] = L.reduce_loss(cls_each, pos_w)
        else:
            out["cls"], out["noobj"] = self._cls_dense(cls_logits, a, num_pos_img, lvl_w)

        out = self._normalise(out, B, P)
        weights = self._weights()
        scale = float(B) if r.scale_by_batch else 1.0  # YOLOv5 / Scaled-YOLOv4 return (lbox + lobj + lcls) * bs
        weighted = {k: v * (weights[k] * scale) for k, v in out.items()}
        total = sum(weighted.values())
        stats = a.stats(targets.valid)
        stats["pos_iou"] = iou_pos.mean() if P else torch.zeros((), device=pred.device)
        return CriterionOutput(out, weighted, total, stats, a)

    def _cls_dense(self, logits: Tensor, a: Assignment, num_pos_img: Tensor, lvl_w: Tensor) -> tuple[Tensor, Tensor]:
        """Class loss over every non-ignored anchor of a head without objectness:
        ``(sum over positives, sum over kept negatives)``."""
        r = self.recipe
        pos, neg = a.positive, a.negative
        B, N, C = logits.shape
        if r.cls_loss == "focal" and r.neg_mining == "none":
            row_w = torch.stack((neg * lvl_w, pos.float()), 0).flatten(1)  # [2, B*N]: negatives, positives
            sums = L.dense_focal_loss_sum(logits.flatten(0, 1), a.cls_targets.reshape(-1), row_w,
                                          r.focal_alpha, r.focal_gamma, r.label_smoothing)
            return sums[1], sums[0]
        if r.background_class:  # class 0 is background
            target = torch.where(pos, a.cls_targets + 1, torch.zeros_like(a.cls_targets))  # [B, N]
            if r.cls_loss == "ce":
                row = L.softmax_ce_loss(logits.reshape(B * N, C), target.reshape(-1), r.label_smoothing).view(B, N)
            else:
                row = L.sse_prob_loss(logits.reshape(B * N, C), F.one_hot(target.reshape(-1), C)).view(B, N)
        else:
            onehot = F.one_hot(a.cls_targets.clamp(min=0), C).float() * pos[..., None]  # [B, N, C]
            if r.label_smoothing:
                onehot = onehot * (1.0 - r.label_smoothing) + 0.5 * r.label_smoothing
            if r.cls_loss == "bce":
                row = L.bce_loss(logits, onehot).sum(-1)  # [B, N]
            else:
                row = L.sigmoid_focal_loss(logits, onehot, r.focal_alpha, r.focal_gamma).sum(-1)
        keep = neg
        if r.neg_mining == "ohem":
            keep = L.ohem_negative_mask(row, neg, num_pos_img, r.neg_pos_ratio)
        return L.reduce_loss(row, pos), L.reduce_loss(row, keep * lvl_w)

    def _per_level_mean_weight(self, n_idx: Tensor) -> Tensor:
        """``1 / (positives of the batch on the same level)`` for each positive: ``[P] -> [P]``."""
        lvl = self.priors.level[n_idx]  # [P]
        counts = torch.bincount(lvl, minlength=self.priors.num_levels)  # [L]
        return 1.0 / counts[lvl].float()

    def _normalise(self, out: dict[str, Tensor], B: int, P: int) -> dict[str, Tensor]:
        """Reduce the summed terms (``P`` positives in a batch of ``B`` images).

        * ``sum``: as summed; ``batch``: divided by ``B``; ``positives``: divided by ``P``.
        * ``level_mean``, the reference reduction of Scaled-YOLOv4 and YOLOv5 (ultralytics
          yolov5 v7.0 ``utils/loss.py`` ``ComputeLoss.__call__``; WongKinYiu/ScaledYOLOv4
          ``utils/general.py`` ``compute_loss``): per level ``i``, the box term is the mean
          over that level's positives (``lbox += (1 - iou).mean()``), the class term the
          mean over its positives x classes for sigmoid class losses (``lcls += BCEcls(pcls,
          t)``), the objectness term the mean over its ``B x H x W x A`` anchors times
          ``level_balance[i]`` (``lobj += BCEobj(pi[..., 4], tobj) * balance[i]``); each term
          is the sum over levels, a level without positives adding 0 to box and class. The
          per-positive ``1 / P_level`` weights are applied before the sums (``__call__``);
          the objectness ``1 / (H W A)`` is in the level weight.
        * ``mean``: box and class terms are one mean over all ``P`` positives pooled across
          levels (class also over classes), objectness as ``level_mean``. Not the reference:
          it weighs each positive, not each level, equally (the small-object level has most
          positives), which also lowers box and class against objectness (~3x smaller than
          ``level_mean`` on a three-level YOLO head); kept as an ablation axis.
        """
        r = self.recipe
        if r.normalize == "sum":
            return out
        if r.normalize == "batch":
            return {k: v / B for k, v in out.items()}
        if r.normalize == "positives":
            return {k: v / max(P, 1) for k, v in out.items()}
        per_class = self.num_classes if (r.cls_loss in ("bce", "focal") and r.has_objectness) else 1
        if r.normalize == "level_mean":  # box and cls already carry 1 / P_level; needs objectness (recipe check)
            return {k: (v / per_class if k == "cls" else v if k == "box" else v / B) for k, v in out.items()}
        res = {}
        for k, v in out.items():
            if k == "box":
                res[k] = v / max(P, 1)
            elif k == "cls":
                res[k] = v / max(P * per_class, 1)
            elif r.has_objectness:
                res[k] = v / B
            else:
                res[k] = v / max(P, 1)
        return res

    def _weights(self) -> dict[str, float]:
        r = self.recipe
        neg_base = r.lambda_obj if r.has_objectness else r.lambda_cls
        return {"box": r.lambda_box, "obj": r.lambda_obj, "noobj": r.lambda_noobj * neg_base, "cls": r.lambda_cls}


def build_criterion(
    recipe: LossRecipe, num_classes: int, image_size: tuple[int, int] | int, device: torch.device | str = "cpu",
    layout: AnchorLayout | None = None,
) -> Criterion:
    """The criterion of ``recipe`` for ``num_classes`` classes at ``image_size`` input.

    ``layout`` defaults to the recipe's published one; with ``anchor_fit: kmeans`` pass the
    fitted layout (:func:`~ablate.detect.anchors.fit_anchors`), which needs the training set.
    """
    layout = layout or get_layout(recipe.anchors)
    return Criterion(recipe, build_priors(layout, image_size, device=device), num_classes)
