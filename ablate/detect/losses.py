"""Loss terms of the one-stage detector literature, as small unreduced functions.

Every function returns per-element (or per-pair) losses; :func:`reduce_loss` is the one
reduction helper (the criterion reduces every term through it). Box losses over matched
pairs take ``Tensor[..., 4]`` xyxy boxes and return ``Tensor[...]``; fp16 inputs are
computed in fp32 and every denominator has ``eps``.

Where ``torchvision.ops`` has the loss with the same behaviour it is called
(``generalized_box_iou_loss``, ``distance_box_iou_loss``, ``sigmoid_focal_loss``); written
here is only what it lacks: the IoU loss, CIoU with eps in its aspect term, its alpha
gate and a given alpha, EIoU, SIoU and the fused dense focal loss.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision import ops

from .boxes import EPS, aspect_term, pair_geometry

Reduction = Literal["none", "sum", "mean"]
REDUCTIONS: tuple[str, ...] = get_args(Reduction)


def _up(x: Tensor) -> Tensor:
    """Half-precision inputs are computed in fp32; fp32/fp64 are kept."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def reduce_loss(loss: Tensor, weight: Tensor | None = None, reduction: Reduction = "sum") -> Tensor:
    """Apply an optional elementwise ``weight`` then reduce (``none`` | ``sum`` | ``mean``).

    ``Tensor[...], Tensor[...] (broadcastable) -> Tensor[]`` (``Tensor[...]`` for ``none``);
    the mean of no elements is 0. Any other ``reduction`` raises ``ValueError``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: unknown value {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    if weight is not None:
        loss = loss * weight
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean() if loss.numel() else loss.sum()
    return loss


# --------------------------------------------------------------------------- box: IoU family
def iou_loss(pred: Tensor, target: Tensor, eps: float = EPS) -> Tensor:
    """IoU loss ``1 - IoU`` (Yu et al., UnitBox, 2016). ``[..., 4], [..., 4] -> [...]``."""
    return 1.0 - pair_geometry(pred, target, eps).iou


def _pair_up(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """fp16/bf16 pairs in fp32 (torchvision keeps half precision), target in ``pred``'s dtype."""
    pred = _up(pred)
    return pred, target.to(pred.dtype)


def giou_loss(pred: Tensor, target: Tensor, eps: float = EPS) -> Tensor:
    """GIoU loss ``1 - IoU + |C - U| / |C|`` (Rezatofighi et al., CVPR 2019). ``-> [...]``.

    ``torchvision.ops.generalized_box_iou_loss`` (same eps in both denominators).
    """
    pred, target = _pair_up(pred, target)
    return ops.generalized_box_iou_loss(pred, target, reduction="none", eps=eps)


def _center_term(g, eps: float) -> Tensor:
    """DIoU's normalised centre distance ``rho^2(b, b_gt) / c^2``."""
    c2 = g.enclose_w.pow(2) + g.enclose_h.pow(2)
    return (g.dx.pow(2) + g.dy.pow(2)) / (c2 + eps)


def diou_loss(pred: Tensor, target: Tensor, eps: float = EPS) -> Tensor:
    """DIoU loss ``1 - IoU + rho^2 / c^2`` (Zheng et al., AAAI 2020, eq. 6). ``-> [...]``.

    ``torchvision.ops.distance_box_iou_loss`` (eps in the IoU and the diagonal).
    """
    pred, target = _pair_up(pred, target)
    return ops.distance_box_iou_loss(pred, target, reduction="none", eps=eps)


def ciou_loss(
    pred: Tensor,
    target: Tensor,
    eps: float = EPS,
    iou_gate: float | None = None,
    alpha: Tensor | None = None,
) -> Tensor:
    """CIoU loss ``1 - IoU + rho^2/c^2 + alpha v`` (Zheng et al., AAAI 2020, eqs. 8-11).

    ``v = 4/pi^2 (atan(w_gt/h_gt) - atan(w/h))^2`` and the trade-off
    ``alpha = v / ((1 - IoU) + v)`` is computed under ``no_grad`` as in the paper.
    ``iou_gate=0.5`` sets ``alpha = 0`` where IoU < 0.5 (Zheng et al., TPAMI 2021).
    ``alpha`` may be given explicitly (used by gradient checks). ``-> [...]``.

    Written here rather than ``torchvision.ops.complete_box_iou_loss`` (which it equals on
    valid boxes, see the tests): torchvision's ``atan(w / h)`` has no eps, so a prediction
    of zero width and height gives NaN, and it has neither the gate nor a given alpha.
    """
    g = pair_geometry(pred, target, eps)
    v = aspect_term(g, eps)
    if alpha is None:
        with torch.no_grad():
            alpha = v / (1.0 - g.iou + v + eps)
            if iou_gate is not None:
                alpha = torch.where(g.iou >= iou_gate, alpha, torch.zeros_like(alpha))
    return 1.0 - g.iou + _center_term(g, eps) + alpha * v


def eiou_loss(pred: Tensor, target: Tensor, eps: float = EPS) -> Tensor:
    """EIoU loss ``1 - IoU + rho^2/c^2 + (w-w_gt)^2/C_w^2 + (h-h_gt)^2/C_h^2``.

    Zhang et al., "Focal and Efficient IOU Loss", Neurocomputing 2022, eq. 12. ``-> [...]``.
    """
    g = pair_geometry(pred, target, eps)
    return (
        1.0
        - g.iou
        + _center_term(g, eps)
        + (g.w1 - g.w2).pow(2) / (g.enclose_w.pow(2) + eps)
        + (g.h1 - g.h2).pow(2) / (g.enclose_h.pow(2) + eps)
    )


def siou_loss(pred: Tensor, target: Tensor, eps: float = EPS, theta: float = 4.0) -> Tensor:
    """SIoU loss ``1 - IoU + (Delta + Omega) / 2`` (Gevorgyan, arXiv 2205.12740, 2022).

    Angle cost ``Lambda = cos(2 arcsin(sin_a) - pi/2)`` with ``sin_a`` the sine of the
    smaller angle of the centre offset to an axis; distance cost
    ``Delta = sum_t (1 - exp(-(2 - Lambda) rho_t))`` with ``rho_x = (dx / C_w)^2``;
    shape cost ``Omega = sum_t (1 - exp(-omega_t))^theta`` with
    ``omega_w = |w - w_gt| / max(w, w_gt)``. ``-> [...]``.
    """
    g = pair_geometry(pred, target, eps)
    sigma = torch.sqrt(g.dx.pow(2) + g.dy.pow(2) + eps)
    sin_x = g.dx.abs() / sigma
    sin_y = g.dy.abs() / sigma
    sin_a = torch.where(sin_x > math.sqrt(0.5), sin_y, sin_x).clamp(max=1.0 - 1e-6)
    angle = torch.cos(2.0 * torch.arcsin(sin_a) - math.pi / 2)
    gamma = 2.0 - angle
    rho_x = (g.dx / (g.enclose_w + eps)).pow(2)
    rho_y = (g.dy / (g.enclose_h + eps)).pow(2)
    distance = 2.0 - torch.exp(-gamma * rho_x) - torch.exp(-gamma * rho_y)
    omega_w = (g.w1 - g.w2).abs() / (torch.maximum(g.w1, g.w2) + eps)
    omega_h = (g.h1 - g.h2).abs() / (torch.maximum(g.h1, g.h2) + eps)
    shape = (1.0 - torch.exp(-omega_w)).pow(theta) + (1.0 - torch.exp(-omega_h)).pow(theta)
    return 1.0 - g.iou + 0.5 * (distance + shape)


#: IoU-family box losses on decoded boxes, by recipe name.
IOU_LOSSES: dict[str, Callable[..., Tensor]] = {
    "iou": iou_loss,
    "giou": giou_loss,
    "diou": diou_loss,
    "ciou": ciou_loss,
    "eiou": eiou_loss,
    "siou": siou_loss,
}


# --------------------------------------------------------------------------- box: on t
def mse_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over the last dim (YOLOv2/v3 box regression on ``t``).

    ``Tensor[..., 4], Tensor[..., 4] -> Tensor[...]``.
    """
    return (_up(pred) - _up(target)).pow(2).sum(-1)


def smooth_l1_loss(pred: Tensor, target: Tensor, beta: float = 1.0) -> Tensor:
    """Smooth L1 (Huber / beta) summed over the last dim (Fast R-CNN, SSD, RetinaNet).

    ``beta = 0`` is plain L1. ``Tensor[..., 4], Tensor[..., 4] -> Tensor[...]``.
    """
    if beta <= 0:
        return (_up(pred) - _up(target)).abs().sum(-1)
    return F.smooth_l1_loss(_up(pred), _up(target), beta=beta, reduction="none").sum(-1)


# --------------------------------------------------------------------------- objectness / class
def bce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Sigmoid binary cross-entropy, elementwise (YOLOv3 objectness and classes)."""
    return F.binary_cross_entropy_with_logits(_up(logits), _up(targets).to(_up(logits).dtype), reduction="none")


def mse_prob_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Squared error between ``sigmoid(logits)`` and the target, elementwise (YOLOv1/v2 objectness)."""
    return (torch.sigmoid(_up(logits)) - _up(targets)).pow(2)


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float | None = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal loss ``-alpha_t (1 - p_t)^gamma log(p_t)`` (Lin et al., ICCV 2017, eq. 5), elementwise.

    ``torchvision.ops.sigmoid_focal_loss`` on fp32 (or fp64) logits. ``alpha=None``
    disables the class weighting; with ``gamma=0`` it is BCE. Targets may be soft (in
    [0, 1]): ``p_t = p q + (1 - p)(1 - q)``, ``alpha_t = alpha q + (1 - alpha)(1 - q)``.
    """
    logits = _up(logits)
    return ops.sigmoid_focal_loss(logits, targets.to(logits.dtype), -1.0 if alpha is None else float(alpha), gamma,
                                  reduction="none")


#: Elements per chunk of the fused dense focal loss: its temporaries stay in cache.
FOCAL_CHUNK = 1 << 20


def _softplus_from_p(x: Tensor, p: Tensor) -> Tensor:
    """``softplus(x) = x - log(sigmoid(x))`` from an already computed ``p = sigmoid(x)``.

    Clamping ``p >= 1e-30`` and the result at 0 keeps far-negative logits, whose true
    softplus is below 1e-26, finite. Returns a new tensor (the caller may work in place).
    """
    return torch.log(p.clamp(min=1e-30)).neg_().add_(x).clamp_(min=0)


def _focal_neg_chunk(x: Tensor, alpha_neg: float, gamma: float) -> tuple[Tensor, Tensor]:
    """Focal loss of logits treated as negatives, per row, and its elementwise gradient.

    ``l = a p^g softplus(x)``, ``dl/dx = a p^g (g (1-p) softplus(x) + p)`` with
    ``softplus(x) = x - log(p)`` from the same sigmoid: two vectorised transcendentals per
    element (``log1p`` and ``where`` are several times slower on the CPU). Where the
    clamp of :func:`_softplus_from_p` acts the loss and gradient carry a factor ``p^g``
    anyway. ``Tensor[r, C] -> (Tensor[r], Tensor[r, C])``.
    """
    p = torch.sigmoid(x)
    sp = _softplus_from_p(x, p)
    pg = p * p if gamma == 2.0 else p.pow(gamma)  # p^g
    loss = (pg * sp).sum(-1).mul_(alpha_neg)
    # g (1-p) sp + p, then times a p^g
    grad = sp.addcmul_(sp, p, value=-1.0).mul_(gamma).add_(p).mul_(pg).mul_(alpha_neg)
    return loss, grad


def _focal_soft_chunk(x: Tensor, q: float, alpha_q: float, gamma: float) -> tuple[Tensor, Tensor]:
    """Focal loss of logits against one soft target ``0 < q < 1``, per row, and its gradient.

    With ``m = 1 - p_t = p + q - 2pq`` (> 0 for such ``q``) and ``ce = softplus(x) - q x``:
    ``l = a m^g ce``, ``dl/dx = a m^(g-1) (g (1 - 2q) p (1-p) ce + m (p - q))``; ``a`` is
    ``alpha_t`` at ``q``. ``Tensor[r, C] -> (Tensor[r], Tensor[r, C])``.
    """
    p = torch.sigmoid(x)
    ce = _softplus_from_p(x, p).sub_(x, alpha=q)
    m = p * (1.0 - 2.0 * q) + q
    mg1 = m if gamma == 2.0 else m.pow(gamma - 1.0)  # m^(g-1)
    loss = (mg1 * m * ce).sum(-1).mul_(alpha_q)
    # g (1-2q) p (1-p) ce + m (p - q), then times a m^(g-1)
    grad = (p - p * p).mul_(ce).mul_(gamma * (1.0 - 2.0 * q)).addcmul_(m, p - q).mul_(mg1).mul_(alpha_q)
    return loss, grad


def _alpha_at(q: float, alpha: float) -> float:
    """``alpha_t`` of a target ``q``; ``alpha < 0`` is no weighting."""
    return 1.0 if alpha < 0 else alpha * q + (1.0 - alpha) * (1.0 - q)


def _focal_at(x: Tensor, q: float, alpha: float, gamma: float) -> Tensor:
    """Differentiable focal loss of logits ``x [P]`` against the target ``q`` (``alpha < 0``: off).

    The hard targets use the forms without ``(1 - p_t)`` so that ``gamma < 1`` keeps a
    finite gradient where ``p_t -> 1``. ``-> Tensor[P]``.
    """
    a = _alpha_at(q, alpha)
    p = torch.sigmoid(x)
    if q == 1.0:
        return a * (1 - p).pow(gamma) * F.softplus(-x)
    if q == 0.0:
        return a * p.pow(gamma) * F.softplus(x)
    return a * (p + q - 2 * p * q).pow(gamma) * (F.softplus(x) - q * x)


class _DenseFocal(torch.autograd.Function):
    """Sigmoid focal loss over ``[R, C]`` logits with one-hot targets given sparsely,
    summed per row and then over rows with ``G`` sets of row weights.

    Every element is first treated as a negative (target ``q_neg``); the ``P`` positive
    elements (target ``q_pos``) are then corrected by gather. Loss and gradient are
    computed together in cache-sized chunks of rows (this runs over every anchor x class
    in RetinaNet: ~10^8 elements), so the dense work reads the logits once; the saved
    gradient is scaled out of place in backward, so a graph kept with ``retain_graph``
    gives the same gradient on every backward.

    First-order only: a backward with ``create_graph=True`` (second-order gradients,
    ``gradgradcheck``) raises a ``RuntimeError`` rather than return a gradient without a
    graph; the row weights get no gradient.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, row_w: Tensor, pos_rows: Tensor, pos_cols: Tensor, alpha: float, gamma: float,  # type: ignore[override]
                q_neg: float, q_pos: float):
        R, C = logits.shape
        row_loss = logits.new_empty(R)
        grad = logits.new_empty(R, C)
        step = max(1, FOCAL_CHUNK // max(C, 1))
        with torch.no_grad():
            for i in range(0, R, step):
                xi = logits[i : i + step]
                if q_neg == 0.0:
                    row_loss[i : i + step], grad[i : i + step] = _focal_neg_chunk(xi, _alpha_at(0.0, alpha), gamma)
                else:
                    row_loss[i : i + step], grad[i : i + step] = _focal_soft_chunk(xi, q_neg, _alpha_at(q_neg, alpha), gamma)
            xp = logits[pos_rows, pos_cols].detach().requires_grad_(True)
        with torch.enable_grad():
            corr = _focal_at(xp, q_pos, alpha, gamma) - _focal_at(xp, q_neg, alpha, gamma)  # [P]
            (gp,) = torch.autograd.grad(corr.sum(), xp)
        row_loss.index_add_(0, pos_rows, corr.detach())
        grad.index_put_((pos_rows, pos_cols), gp, accumulate=True)
        ctx.save_for_backward(grad, row_w)
        return row_w @ row_loss  # [G]

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():  # backward runs with grad mode on only under create_graph=True
            raise RuntimeError(
                "dense_focal_loss_sum is differentiable once (analytic gradient); "
                "create_graph=True / second-order gradients are not supported"
            )
        grad, row_w = ctx.saved_tensors
        row_scale = grad_out @ row_w  # [R]
        # out of place: ``grad`` is saved and a retained graph reads it again
        return grad * row_scale[:, None], None, None, None, None, None, None, None


def dense_focal_loss_sum(
    logits: Tensor,
    cls_target: Tensor,
    row_weight: Tensor,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Sigmoid focal loss of every row, one-hot targets given as class indices, summed
    over rows with one or several sets of row weights.

    Args:
        logits: ``Tensor[R, C]`` class logits (R = anchors of all images).
        cls_target: ``Tensor[R]`` class index for positives, ``-1`` for background rows.
        row_weight: ``Tensor[R]`` or ``Tensor[G, R]`` weights per row (0 drops a row).
        alpha: focal alpha (``None``: off), gamma: focusing parameter (>= 0).
        label_smoothing: ``eps`` in [0, 1): targets ``1 - eps/2`` and ``eps/2`` instead of
            1 and 0 (YOLOv5's ``smooth_BCE``, as the criterion's other sigmoid paths).

    Returns:
        ``sum_r w[g, r] * sum_c FL(logits[r, c], onehot[r, c])``: a scalar for 1-D
        weights, ``Tensor[G]`` for 2-D. Differentiable once (see :class:`_DenseFocal`).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing: must be in [0, 1), got {label_smoothing}")
    squeeze = row_weight.ndim == 1
    row_w = row_weight.float().reshape(-1, logits.shape[0])
    pos_rows = torch.nonzero(cls_target >= 0).squeeze(1)
    pos_cols = cls_target[pos_rows]
    logits = _up(logits)
    q_neg = 0.5 * float(label_smoothing)
    out = _DenseFocal.apply(logits, row_w.to(logits.dtype), pos_rows, pos_cols, -1.0 if alpha is None else float(alpha),
                            float(gamma), q_neg, 1.0 - q_neg)
    return out[0] if squeeze else out


def softmax_ce_loss(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Softmax cross-entropy per row (SSD with a background class at index 0).

    ``Tensor[R, C], Tensor[R] (long) -> Tensor[R]``.
    """
    return F.cross_entropy(_up(logits), target, reduction="none", label_smoothing=label_smoothing)


def sse_prob_loss(logits: Tensor, onehot: Tensor) -> Tensor:
    """Sum of squared errors of softmax probabilities (YOLOv1 / YOLOv2 region layer).

    ``Tensor[R, C], Tensor[R, C] -> Tensor[R]``.
    """
    return (torch.softmax(_up(logits), dim=-1) - onehot.to(_up(logits).dtype)).pow(2).sum(-1)


# --------------------------------------------------------------------------- hard negative mining
def ohem_negative_mask(neg_loss: Tensor, is_neg: Tensor, num_pos: Tensor, neg_pos_ratio: float, min_neg: int = 0) -> Tensor:
    """Online hard example mining as in SSD (Liu et al., ECCV 2016, sec. 2.2).

    Per image keep the ``min(ratio * positives, negatives)`` negatives with the highest
    loss (at least ``min_neg`` where an image has no positive, so that background is
    still learned).

    Args:
        neg_loss: ``Tensor[B, N]`` the loss each anchor would pay as a negative.
        is_neg: ``Tensor[B, N]`` bool, which anchors are negatives.
        num_pos: ``Tensor[B]`` positives per image.

    Returns:
        ``Tensor[B, N]`` bool: the kept negatives (never a positive or ignored anchor).
    """
    with torch.no_grad():
        num_neg = is_neg.sum(1)  # [B]
        k = torch.minimum((num_pos.float() * neg_pos_ratio).long().clamp(min=min_neg), num_neg)  # [B]
        score = torch.where(is_neg, neg_loss.detach().float(), torch.full_like(neg_loss, -math.inf, dtype=torch.float))
        order = score.argsort(dim=1, descending=True)  # [B, N]
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        return (rank < k[:, None]) & is_neg
