"""IoU family and loss functions against torchvision, hand-checked values, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision import ops

from ablate.detect import losses as L
from ablate.detect.boxes import box_iou_batched, elementwise_iou, wh_iou

BOX_LOSSES = [L.iou_loss, L.giou_loss, L.diou_loss, L.ciou_loss, L.eiou_loss, L.siou_loss]


def random_boxes(n, gen, dtype=torch.float32, scale=100.0):
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * scale
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * scale * 0.5 + 0.5
    return torch.cat((xy, xy + wh), 1).to(dtype)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def test_hand_checked_reference_pair():
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[2.0, 2.0, 12.0, 14.0]])
    assert 1 - L.iou_loss(pred, gt).item() == pytest.approx(0.410256, abs=1e-6)
    assert 1 - L.giou_loss(pred, gt).item() == pytest.approx(0.338828, abs=1e-6)
    assert 1 - L.diou_loss(pred, gt).item() == pytest.approx(0.372021, abs=1e-6)
    # CIoU adds alpha * v: w/h 1 vs 10/12
    v = 4 / math.pi**2 * (math.atan(10 / 12) - math.atan(1.0)) ** 2
    alpha = v / (1 - 0.410256 + v)
    assert L.ciou_loss(pred, gt).item() == pytest.approx(1 - 0.372021 + alpha * v, abs=1e-6)


def test_iou_family_agrees_with_torchvision(gen):
    a = random_boxes(500, gen, torch.float64)
    b = random_boxes(500, gen, torch.float64)
    # pairwise torchvision ops, diagonal = matched pairs
    assert torch.allclose(elementwise_iou(a, b), ops.box_iou(a, b).diagonal(), atol=1e-6)
    assert torch.allclose(1 - L.giou_loss(a, b), ops.generalized_box_iou(a, b).diagonal(), atol=1e-6)
    assert torch.allclose(1 - L.diou_loss(a, b), ops.distance_box_iou(a, b).diagonal(), atol=1e-6)
    assert torch.allclose(1 - L.ciou_loss(a, b), ops.complete_box_iou(a, b).diagonal(), atol=1e-6)
    # and their elementwise losses
    assert torch.allclose(L.giou_loss(a, b), ops.generalized_box_iou_loss(a, b), atol=1e-6)
    assert torch.allclose(L.diou_loss(a, b), ops.distance_box_iou_loss(a, b), atol=1e-6)
    assert torch.allclose(L.ciou_loss(a, b), ops.complete_box_iou_loss(a, b), atol=1e-6)


def test_batched_iou_matches_per_image(gen):
    a = torch.stack([random_boxes(7, gen) for _ in range(3)])
    b = torch.stack([random_boxes(5, gen) for _ in range(3)])
    got = box_iou_batched(a, b)
    for i in range(3):
        assert torch.allclose(got[i], ops.box_iou(a[i], b[i]), atol=1e-6)


def test_wh_iou():
    got = wh_iou(torch.tensor([[2.0, 4.0]]), torch.tensor([[2.0, 4.0], [4.0, 2.0], [1.0, 1.0]]))
    assert torch.allclose(got, torch.tensor([[1.0, 4 / 12, 1 / 8]]), atol=1e-6)


@pytest.mark.parametrize("fn", BOX_LOSSES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_identical_boxes_zero_loss_finite_grad(fn, dtype, gen):
    boxes = random_boxes(64, gen, dtype)
    pred = boxes.clone().requires_grad_(True)
    loss = fn(pred, boxes)
    assert loss.dtype == torch.float32  # fp16 upcast
    assert torch.allclose(loss, torch.zeros_like(loss), atol=1e-6)
    loss.sum().backward()
    assert torch.isfinite(pred.grad).all()


@pytest.mark.parametrize("fn", BOX_LOSSES, ids=lambda f: f.__name__)
def test_zero_width_prediction_is_finite(fn):
    pred = torch.tensor([[5.0, 5.0, 5.0, 15.0], [5.0, 5.0, 5.0, 5.0]], requires_grad=True)
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    loss = fn(pred, gt)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(pred.grad).all()


@pytest.mark.parametrize("name", ["iou", "giou", "diou", "ciou", "eiou", "siou", "mse", "smooth_l1", "l1"])
def test_gradcheck_float64(name, gen):
    # overlapping, generic-position pairs (no ties in max/min, no zero sizes)
    target = random_boxes(6, gen, torch.float64, scale=10.0)
    pred = (target + torch.randn(6, 4, generator=gen, dtype=torch.float64) * 0.7).detach()
    pred[:, 2:] = torch.maximum(pred[:, 2:], pred[:, :2] + 0.3)
    pred.requires_grad_(True)
    if name == "ciou":  # alpha is a no_grad trade-off weight: check with it held fixed
        with torch.no_grad():
            g = L.pair_geometry(pred, target)
            v = L.aspect_term(g)
            alpha = v / (1 - g.iou + v + 1e-7)
        fn = lambda p: L.ciou_loss(p, target, alpha=alpha)  # noqa: E731
    elif name in ("mse", "smooth_l1", "l1"):
        f = {"mse": L.mse_loss, "smooth_l1": lambda p, t: L.smooth_l1_loss(p, t, 1.0),
             "l1": lambda p, t: L.smooth_l1_loss(p, t, 0.0)}[name]
        fn = lambda p: f(p, target)  # noqa: E731
    else:
        fn = lambda p: L.IOU_LOSSES[name](p, target)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (pred,), eps=1e-6, atol=1e-5)


def test_ciou_alpha_is_not_differentiated():
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0]], requires_grad=True)
    gt = torch.tensor([[2.0, 2.0, 12.0, 14.0]])
    L.ciou_loss(pred, gt).sum().backward()
    g1 = pred.grad.clone()
    pred.grad = None
    with torch.no_grad():
        g = L.pair_geometry(pred, gt)
        v = L.aspect_term(g)
        alpha = v / (1 - g.iou + v + 1e-7)
    L.ciou_loss(pred, gt, alpha=alpha).sum().backward()
    assert torch.allclose(g1, pred.grad)


def test_ciou_gate():
    far = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[5.0, 5.0, 15.0, 25.0]])  # IoU < 0.5 and different aspect
    assert L.ciou_loss(far, gt, iou_gate=0.5).item() == pytest.approx(L.diou_loss(far, gt).item(), abs=1e-7)
    assert L.ciou_loss(far, gt).item() > L.diou_loss(far, gt).item()


def test_focal_gamma0_no_alpha_is_bce(gen):
    x = torch.randn(200, 5, generator=gen) * 3
    t = (torch.rand(200, 5, generator=gen) > 0.7).float()
    assert torch.allclose(L.sigmoid_focal_loss(x, t, alpha=None, gamma=0.0),
                          F.binary_cross_entropy_with_logits(x, t, reduction="none"), atol=1e-6)


def test_focal_matches_torchvision(gen):
    x = torch.randn(200, 5, generator=gen) * 3
    t = (torch.rand(200, 5, generator=gen) > 0.7).float()
    assert torch.allclose(L.sigmoid_focal_loss(x, t, 0.25, 2.0), ops.sigmoid_focal_loss(x, t, 0.25, 2.0), atol=1e-6)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (None, 0.0), (0.5, 1.5), (None, 2.0)])
def test_dense_focal_equals_elementwise(alpha, gamma, gen, monkeypatch):
    monkeypatch.setattr(L, "FOCAL_CHUNK", 64)  # several chunks
    R, C = 300, 7
    x = (torch.randn(R, C, generator=gen, dtype=torch.float64) * 4).requires_grad_(True)
    cls = torch.randint(-1, C, (R,), generator=gen)
    w = torch.rand(2, R, generator=gen, dtype=torch.float64)
    onehot = F.one_hot(cls.clamp(min=0), C).double() * (cls >= 0)[:, None]
    x_ref = x.detach().clone().requires_grad_(True)
    ref = (L.sigmoid_focal_loss(x_ref.double(), onehot, alpha, gamma).double().sum(-1) * w).sum(-1)  # [2]
    got = L.dense_focal_loss_sum(x, cls, w, alpha, gamma)
    assert torch.allclose(got, ref, rtol=1e-5)
    coef = torch.tensor([1.0, -3.0], dtype=torch.float64)
    (got * coef).sum().backward()
    (ref * coef).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)


def test_dense_focal_no_objects_is_finite():
    x = torch.randn(50, 3, requires_grad=True)
    out = L.dense_focal_loss_sum(x, torch.full((50,), -1), torch.ones(50))
    assert torch.isfinite(out)
    out.backward()
    assert torch.isfinite(x.grad).all()


def test_ohem_keeps_ratio_times_positives_hardest_negatives():
    neg_loss = torch.tensor([[5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 0.5],
                             [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])
    is_pos = torch.tensor([[True, False, False, False, False, False, False, False],
                           [False] * 8])
    is_pos[1, 7] = True
    is_neg = ~is_pos
    is_neg[1, :5] = True
    is_neg[1, 5:7] = False  # two ignored anchors in image 1
    keep = L.ohem_negative_mask(neg_loss, is_neg, is_pos.sum(1), neg_pos_ratio=3)
    # image 0: 1 positive -> 3 hardest negatives (the positive, loss 5, is never kept)
    assert keep[0].tolist() == [False, False, True, False, True, False, True, False]
    # image 1: 1 positive -> min(3, 5 negatives) = the 3 hardest negatives
    assert keep[1].tolist() == [False, False, True, True, True, False, False, False]
    assert not (keep & ~is_neg).any()


def test_ohem_caps_at_available_negatives():
    neg_loss = torch.rand(1, 10)
    is_neg = torch.zeros(1, 10, dtype=torch.bool)
    is_neg[0, :2] = True
    keep = L.ohem_negative_mask(neg_loss, is_neg, torch.tensor([4]), 3.0)
    assert keep.sum() == 2


def test_dense_focal_extreme_logits_fp32_match_fp64_reference():
    x = torch.linspace(-120, 120, 4800).view(-1, 3)  # [1600, 3]
    cls = torch.arange(1600) % 4 - 1  # background and every class
    w = torch.ones(1600)
    x32 = x.clone().requires_grad_(True)
    got = L.dense_focal_loss_sum(x32, cls, w)
    got.backward()
    x64 = x.double().requires_grad_(True)
    onehot = F.one_hot(cls.clamp(min=0), 3).double() * (cls >= 0)[:, None]
    ref = L.sigmoid_focal_loss(x64, onehot, 0.25, 2.0).sum()
    ref.backward()
    assert torch.isfinite(got) and torch.isfinite(x32.grad).all()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(x32.grad.double(), x64.grad, atol=1e-5)


# --------------------------------------------------------------------------- issue 11: losses named after what they are
def _dense_inputs(gen, R=40, C=3, G=2):
    x = (torch.randn(R, C, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    cls = torch.randint(-1, C, (R,), generator=gen)
    w = torch.rand(G, R, generator=gen, dtype=torch.float64)
    return x, cls, w


def _smoothed_onehot(cls, C, eps):
    onehot = F.one_hot(cls.clamp(min=0), C).double() * (cls >= 0)[:, None]
    return onehot * (1.0 - eps) + 0.5 * eps


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (None, 0.0), (0.5, 1.5), (None, 0.5)])
@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_dense_focal_label_smoothing_equals_elementwise(alpha, gamma, eps, gen, monkeypatch):
    monkeypatch.setattr(L, "FOCAL_CHUNK", 64)  # several chunks
    R, C = 300, 7
    x = (torch.randn(R, C, generator=gen, dtype=torch.float64) * 4).requires_grad_(True)
    cls = torch.randint(-1, C, (R,), generator=gen)
    w = torch.rand(2, R, generator=gen, dtype=torch.float64)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = (L.sigmoid_focal_loss(x_ref, _smoothed_onehot(cls, C, eps), alpha, gamma).sum(-1) * w).sum(-1)  # [2]
    got = L.dense_focal_loss_sum(x, cls, w, alpha, gamma, label_smoothing=eps)
    assert torch.allclose(got, ref, rtol=1e-7)
    coef = torch.tensor([1.0, -3.0], dtype=torch.float64)
    (got * coef).sum().backward()
    (ref * coef).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-9)


def test_dense_focal_label_smoothing_extreme_logits_fp32_match_fp64_reference():
    x = torch.linspace(-120, 120, 4800).view(-1, 3)  # [1600, 3]
    cls = torch.arange(1600) % 4 - 1
    x32 = x.clone().requires_grad_(True)
    got = L.dense_focal_loss_sum(x32, cls, torch.ones(1600), label_smoothing=0.1)
    got.backward()
    x64 = x.double().requires_grad_(True)
    ref = L.sigmoid_focal_loss(x64, _smoothed_onehot(cls, 3, 0.1), 0.25, 2.0).sum()
    ref.backward()
    assert torch.isfinite(got) and torch.isfinite(x32.grad).all()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(x32.grad.double(), x64.grad, atol=1e-5)


def test_criterion_dense_focal_path_applies_label_smoothing(monkeypatch):
    """RetinaNet's fused focal path against the elementwise focal loss on YOLOv5's smoothed
    targets, through the same criterion (so through the same normalisation)."""
    from ablate.detect import build_criterion, preset
    from ablate.detect.assign import Targets

    eps = 0.2
    recipe = preset("retinanet").override(label_smoothing=eps)
    crit = build_criterion(recipe, 4, 96)
    gen = torch.Generator().manual_seed(11)
    pred = torch.randn(2, crit.priors.num, crit.channels, generator=gen)
    tg = Targets(torch.tensor([[[10.0, 12.0, 50.0, 60.0]], [[30.0, 20.0, 90.0, 70.0]]]),
                 torch.tensor([[1], [3]]), torch.ones(2, 1, dtype=torch.bool))
    fused = crit(pred, tg)
    unsmoothed = build_criterion(recipe.override(label_smoothing=0.0), 4, 96)(pred, tg)
    assert not torch.allclose(fused.losses["noobj"], unsmoothed.losses["noobj"], rtol=1e-3)

    def elementwise(logits, cls_target, row_weight, alpha, gamma, *args, **kwargs):  # the recipe's eps, not an argument
        onehot = _smoothed_onehot(cls_target, logits.shape[1], eps)
        return (L.sigmoid_focal_loss(logits.double(), onehot, alpha, gamma).sum(-1) * row_weight.double()).sum(-1).float()

    monkeypatch.setattr(L, "dense_focal_loss_sum", elementwise)
    ref = crit(pred, tg)
    for k in ("cls", "noobj"):
        assert torch.allclose(fused.losses[k], ref.losses[k], rtol=1e-5), k


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (None, 1.5)])
def test_dense_focal_gradcheck(eps, alpha, gamma, gen):
    x, cls, w = _dense_inputs(gen)
    kw = {"label_smoothing": eps} if eps else {}
    for weights in (w, w[0]):  # Tensor[G] and a scalar
        fn = lambda v: L.dense_focal_loss_sum(v, cls, weights, alpha, gamma, **kw)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6)


def test_dense_focal_second_backward_through_retained_graph_gives_the_same_gradient(gen):
    x, cls, w = _dense_inputs(gen)
    out = L.dense_focal_loss_sum(x, cls, w[0]) * 3.0  # grad_out = 3: an in-place scale would give 9 the second time
    (g1,) = torch.autograd.grad(out, x, retain_graph=True)
    (g2,) = torch.autograd.grad(out, x, retain_graph=True)
    assert torch.equal(g1, g2)
    out.backward(retain_graph=True)
    out.backward()
    assert torch.allclose(x.grad, 2 * g1)


def test_dense_focal_refuses_second_order(gen):
    x, cls, w = _dense_inputs(gen)
    out = L.dense_focal_loss_sum(x, cls, w[0])
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(out, x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.gradgradcheck(lambda v: L.dense_focal_loss_sum(v, cls, w[0]), (x,))


def test_reduce_loss_reductions_and_unknown_name():
    loss = torch.tensor([1.0, 2.0, 3.0])
    w = torch.tensor([0.0, 1.0, 2.0])
    assert L.reduce_loss(loss, w).item() == 8.0
    assert L.reduce_loss(loss, w, "mean").item() == pytest.approx(8 / 3)
    assert torch.equal(L.reduce_loss(loss, w, "none"), loss * w)
    assert L.reduce_loss(torch.zeros(0), reduction="mean").item() == 0.0
    with pytest.raises(ValueError, match="reduction: unknown value 'avg'"):
        L.reduce_loss(loss, reduction="avg")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "ours,name",
    [(L.giou_loss, "generalized_box_iou_loss"), (L.diou_loss, "distance_box_iou_loss")],
)
def test_giou_diou_are_torchvisions(ours, name, gen, monkeypatch):
    calls = []
    real = getattr(ops, name)
    monkeypatch.setattr(ops, name, lambda *a, **k: calls.append(k) or real(*a, **k))
    a, b = random_boxes(50, gen), random_boxes(50, gen)
    assert torch.equal(ours(a, b), real(a, b, reduction="none", eps=1e-7))
    assert len(calls) == 1 and calls[0]["eps"] == 1e-7


def test_sigmoid_focal_is_torchvisions(gen, monkeypatch):
    calls = []
    real = ops.sigmoid_focal_loss
    monkeypatch.setattr(ops, "sigmoid_focal_loss", lambda *a, **k: calls.append(a) or real(*a, **k))
    x = torch.randn(100, 4, generator=gen, dtype=torch.float16) * 3
    t = (torch.rand(100, 4, generator=gen) > 0.7).half()
    got = L.sigmoid_focal_loss(x, t, alpha=None, gamma=1.5)
    assert got.dtype == torch.float32 and len(calls) == 1  # fp16 computed in fp32
    assert torch.equal(got, real(x.float(), t.float(), alpha=-1.0, gamma=1.5))


def test_ciou_matches_torchvision_complete_box_iou_loss_in_fp32(gen):
    a = random_boxes(500, gen, torch.float32)
    b = random_boxes(500, gen, torch.float32)
    assert torch.allclose(L.ciou_loss(a, b), ops.complete_box_iou_loss(a, b), atol=1e-6)


def test_ciou_is_ours_because_torchvisions_is_nan_on_a_zero_size_prediction():
    pred = torch.tensor([[5.0, 5.0, 5.0, 5.0]])
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    assert torch.isnan(ops.complete_box_iou_loss(pred, gt)).all()
    assert torch.isfinite(L.ciou_loss(pred, gt)).all()
