"""Each preset's loss against a small reference computation written from its paper's or
reference code's formula, on fixed raw outputs and targets.

The reference takes the criterion's own assignment (positives, their GT, negatives) as
input, so these tests check the loss arithmetic: decoding, terms, weights, reductions.
Decoding, IoU and CIoU are written again here from the formulas (float64), not imported.
"""

import inspect
import math

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from ablate.detect import PRESETS, Targets, build_criterion, preset
from ablate.detect.assign import assign_wh_ratio
from ablate.detect.postprocess import oracle_prediction

S, C, B = 128, 3, 2


def targets(G: int, seed: int) -> Targets:
    gen = torch.Generator().manual_seed(seed)
    wh = (torch.rand(B, G, 2, generator=gen) * 0.45 + 0.08) * S
    xy = torch.rand(B, G, 2, generator=gen) * (S - wh)
    return Targets(torch.cat((xy, xy + wh), -1), torch.randint(0, C, (B, G), generator=gen),
                   torch.ones(B, G, dtype=torch.bool))


def run(recipe, seed: int = 0, G: int = 4, scale: float = 1.5):
    crit = build_criterion(recipe, C, S)
    gen = torch.Generator().manual_seed(100 + seed)
    pred = torch.randn(B, crit.priors.num, crit.channels, generator=gen) * scale
    tg = targets(G, seed)
    out = crit(pred, tg)
    a = out.assignment
    b, n = a.positive.nonzero(as_tuple=True)
    assert b.numel() > 0
    p = crit.priors
    ctx = dict(pred=pred.double(), tg=tg, a=a, b=b, n=n, gt=a.box_targets[b, n].double(), cls=a.cls_targets[b, n],
               cell=p.cell[n].double(), stride=p.stride[n].double()[:, None], wh=p.wh[n].double(), level=p.level[n],
               priors=p)
    return out, ctx


def cxcywh(x):
    return torch.cat(((x[..., :2] + x[..., 2:]) / 2, x[..., 2:] - x[..., :2]), -1)


def xyxy(c):
    return torch.cat((c[..., :2] - c[..., 2:] / 2, c[..., :2] + c[..., 2:] / 2), -1)


def pair_iou(p, g):
    return box_iou(p, g).diagonal()


def ciou(p, g):
    """Zheng et al., AAAI 2020, eqs. 8-11: IoU - rho^2 / c^2 - alpha v, alpha = v / (1 - IoU + v)."""
    iou = pair_iou(p, g)
    pc, gc = cxcywh(p), cxcywh(g)
    rho2 = ((pc[:, :2] - gc[:, :2]) ** 2).sum(-1)
    enc = torch.maximum(p[:, 2:], g[:, 2:]) - torch.minimum(p[:, :2], g[:, :2])
    c2 = (enc**2).sum(-1)
    v = 4 / math.pi**2 * (torch.atan(gc[:, 2] / gc[:, 3]) - torch.atan(pc[:, 2] / pc[:, 3])) ** 2
    alpha = v / (1 - iou + v)
    return iou - rho2 / c2 - alpha * v


def bce(x, t):
    return F.binary_cross_entropy_with_logits(x, t, reduction="none")


def close(value, expected, what):
    got = torch.as_tensor(float(value), dtype=torch.float64)
    assert torch.allclose(got, expected.double(), rtol=1e-5, atol=1e-7), (what, float(value), float(expected))


def check(out, box, obj, cls):
    """Compare the weighted terms: box, objectness (positives + negatives, or background) and class."""
    w = out.weighted
    close(w["box"], box, "box")
    close(w.get("obj", 0.0) + w["noobj"], obj, "obj")
    close(w["cls"], cls, "cls")
    close(out.total, box + obj + cls, "total")


def yolo_xy(t, cell, stride, s=1.0):
    """YOLOv2/v3/v4 centre: (s sigma(t) - (s - 1) / 2 + c) stride (YOLOv4 scale_x_y)."""
    return (s * torch.sigmoid(t) - (s - 1) / 2 + cell) * stride


def darknet_ignore(ctx, decoded, thresh):
    """Negatives of darknet's [yolo]/[region] layer: not positive, best IoU with any GT <= thresh."""
    neg = torch.ones(decoded.shape[:2], dtype=torch.bool)
    for i in range(B):
        neg[i] = box_iou(decoded[i], ctx["tg"].boxes[i].double()).amax(1) <= thresh
    neg[ctx["b"], ctx["n"]] = False
    return neg


def decode_yolo(ctx, s=1.0):
    p = ctx["priors"]
    t = ctx["pred"][..., :4]
    st = p.stride.double()[:, None]
    if isinstance(s, tuple):
        s = torch.tensor(s, dtype=torch.float64)[p.level][:, None]
    xy = (s * torch.sigmoid(t[..., :2]) - (s - 1) / 2 + p.cell.double()) * st
    return xyxy(torch.cat((xy, p.wh.double() * torch.exp(t[..., 2:])), -1))


# --------------------------------------------------------------------------- presets
def test_yolov1_matches_eq3():
    """Redmon et al. 2016, eq. 3, summed over the grid and averaged over images: outputs are
    (x, y) in the cell, sqrt(w / W), sqrt(h / H); confidence target is the predicted box's IoU."""
    r = preset("yolov1")
    out, c = run(r)
    b, n, pred = c["b"], c["n"], c["pred"]
    t = pred[b, n, :4]
    g = cxcywh(c["gt"])
    x_hat = g[:, :2] / c["stride"] - c["cell"]
    sqrt_hat = torch.sqrt(g[:, 2:] / S)
    box = r.lambda_box * ((t[:, :2] - x_hat) ** 2 + (t[:, 2:] - sqrt_hat) ** 2).sum() / B
    pbox = xyxy(torch.cat(((t[:, :2] + c["cell"]) * c["stride"], t[:, 2:] ** 2 * S), -1))
    conf = torch.sigmoid(pred[..., 4])
    neg = torch.ones_like(conf, dtype=torch.bool)
    neg[b, n] = False
    obj = ((conf[b, n] - pair_iou(pbox, c["gt"])) ** 2).sum() / B + r.lambda_noobj * (conf[neg] ** 2).sum() / B
    probs = torch.softmax(pred[b, n, 5:], -1)
    cls = ((probs - F.one_hot(c["cls"], C)) ** 2).sum() / B
    check(out, box, obj, cls)


def test_yolov2_matches_darknet_region_layer():
    """darknet region_layer.c (yolov2.cfg), each delta as the gradient of scale x squared error:
    box coord_scale (2 - w h) on (sigma(tx), sigma(ty), tw, th) against (offset, log(w / p_w));
    objectness object_scale (IoU - sigma)^2 (rescore), noobject_scale sigma^2 where the best IoU
    of the prediction with any GT is <= thresh .6; classes class_scale on softmax probabilities;
    averaged over images."""
    r = preset("yolov2")
    out, c = run(r)
    b, n, pred = c["b"], c["n"], c["pred"]
    t = pred[b, n, :4]
    g = cxcywh(c["gt"])
    scale = 1.0 * (2 - g[:, 2] * g[:, 3] / S**2)  # coord_scale = 1
    err = ((torch.sigmoid(t[:, :2]) - (g[:, :2] / c["stride"] - c["cell"])) ** 2).sum(-1) + \
        ((t[:, 2:] - torch.log(g[:, 2:] / c["wh"])) ** 2).sum(-1)
    box = (scale * err).sum() / B
    decoded = decode_yolo(c)
    conf = torch.sigmoid(pred[..., 4])
    neg = darknet_ignore(c, decoded, 0.6)
    obj = 5.0 * ((pair_iou(decoded[b, n], c["gt"]) - conf[b, n]) ** 2).sum() / B + 1.0 * (conf[neg] ** 2).sum() / B
    cls = 1.0 * ((torch.softmax(pred[b, n, 5:], -1) - F.one_hot(c["cls"], C)) ** 2).sum() / B
    check(out, box, obj, cls)


def test_yolov3_matches_darknet_yolo_layer():
    """darknet yolo_layer.c (yolov3.cfg): box (2 - w h) squared error on (sigma(tx), sigma(ty), tw, th);
    logistic objectness, 1 at positives, 0 at negatives whose best IoU is <= ignore_thresh .7;
    logistic classes; averaged over images."""
    out, c = run(preset("yolov3"))
    b, n, pred = c["b"], c["n"], c["pred"]
    t = pred[b, n, :4]
    g = cxcywh(c["gt"])
    err = ((torch.sigmoid(t[:, :2]) - (g[:, :2] / c["stride"] - c["cell"])) ** 2).sum(-1) + \
        ((t[:, 2:] - torch.log(g[:, 2:] / c["wh"])) ** 2).sum(-1)
    box = ((2 - g[:, 2] * g[:, 3] / S**2) * err).sum() / B
    neg = darknet_ignore(c, decode_yolo(c), 0.7)
    o = pred[..., 4]
    obj = (bce(o[b, n], torch.ones_like(o[b, n])).sum() + bce(o[neg], torch.zeros_like(o[neg])).sum()) / B
    cls = bce(pred[b, n, 5:], F.one_hot(c["cls"], C).double()).sum() / B
    check(out, box, obj, cls)


def test_yolov4_matches_darknet_ciou():
    """darknet yolov4.cfg: scale_x_y 1.2/1.1/1.05, iou_normalizer 0.07 x (1 - CIoU), logistic
    objectness with ignore_thresh .7, logistic classes; averaged over images."""
    r = preset("yolov4")
    out, c = run(r)
    b, n, pred = c["b"], c["n"], c["pred"]
    decoded = decode_yolo(c, (1.2, 1.1, 1.05))
    box = 0.07 * (1 - ciou(decoded[b, n], c["gt"])).sum() / B
    neg = darknet_ignore(c, decoded, 0.7)
    o = pred[..., 4]
    obj = (bce(o[b, n], torch.ones_like(o[b, n])).sum() + bce(o[neg], torch.zeros_like(o[neg])).sum()) / B
    cls = bce(pred[b, n, 5:], F.one_hot(c["cls"], C).double()).sum() / B
    check(out, box, obj, cls)


def yolov5_reference(c, hyp=(0.05, 1.0, 0.5), balance=(4.0, 1.0, 0.4), smooth=0.0):
    """ultralytics yolov5 v7.0 utils/loss.py ComputeLoss.__call__, level by level:
    lbox += (1 - CIoU).mean(); tobj[b, a, gj, gi] = CIoU.detach().clamp(0);
    lcls += BCEWithLogits(pcls, smooth-BCE targets).mean(); lobj += BCEobj(pi[..., 4], tobj) * balance[i];
    then x hyp box / obj / cls. Returns (lbox, lobj, lcls) before the final `* bs`."""
    p, pred, b, n = c["priors"], c["pred"], c["b"], c["n"]
    t = pred[b, n, :4]
    xy = (2 * torch.sigmoid(t[:, :2]) - 0.5 + c["cell"]) * c["stride"]
    pbox = xyxy(torch.cat((xy, c["wh"] * (2 * torch.sigmoid(t[:, 2:])) ** 2), -1))
    iou = ciou(pbox, c["gt"])
    cp, cn = 1.0 - 0.5 * smooth, 0.5 * smooth
    lbox = lobj = lcls = torch.zeros((), dtype=torch.float64)
    for lvl, ((H, W, A), off) in enumerate(zip(p.level_shapes, p.level_offsets)):
        rows = slice(off, off + H * W * A)
        tobj = torch.zeros(B, H * W * A, dtype=torch.float64)
        k = c["level"] == lvl
        if k.any():
            lbox = lbox + (1 - iou[k]).mean()
            tobj[b[k], n[k] - off] = iou[k].detach().clamp(min=0)
            tcls = torch.full((int(k.sum()), C), cn, dtype=torch.float64)
            tcls[torch.arange(int(k.sum())), c["cls"][k]] = cp
            lcls = lcls + bce(pred[b[k], n[k], 5:], tcls).mean()
        lobj = lobj + bce(pred[:, rows, 4], tobj).mean() * balance[lvl]
    return lbox * hyp[0], lobj * hyp[1], lcls * hyp[2]


def test_scaled_yolov4_matches_yolov5_compute_loss():
    """Per-level means (not one mean over all positives), CIoU objectness targets, balance on
    objectness only; the preset leaves out the reference's final `* batch size`."""
    r = preset("scaled_yolov4")
    out, c = run(r, G=6)
    assert len(set(c["level"].tolist())) == 3  # every level has positives, in different numbers
    lbox, lobj, lcls = yolov5_reference(c)
    check(out, lbox, lobj, lcls)
    # a level without positives adds nothing to box and class (not a 0 / 0)
    out1, c1 = run(r, seed=1, G=1)
    assert 0 not in c1["level"].tolist()
    check(out1, *yolov5_reference(c1))
    # scale_by_batch reproduces the reference's returned loss, (lbox + lobj + lcls) * bs
    out_bs, _ = run(r.override(scale_by_batch=True), G=6)
    close(out_bs.total, (lbox + lobj + lcls) * B, "total * bs")
    assert torch.allclose(out_bs.losses["box"], out.losses["box"])  # the unweighted terms are not scaled
    # label smoothing: smooth_BCE targets 1 - eps / 2, eps / 2, still means over positives x classes
    out_ls, c_ls = run(r.override(label_smoothing=0.1), G=6)
    _, _, lcls_ls = yolov5_reference(c_ls, smooth=0.1)
    close(out_ls.weighted["cls"], lcls_ls, "cls, label smoothing 0.1")


def test_scaled_yolov4_pooled_mean_is_the_other_reduction():
    """normalize=mean keeps one mean over all positives: the per-level reference it is not."""
    out, c = run(preset("scaled_yolov4").override(normalize="mean"), G=6)
    lbox, lobj, lcls = yolov5_reference(c)
    close(out.weighted["obj"] + out.weighted["noobj"], lobj, "obj")  # objectness is the same reduction
    b, n, pred = c["b"], c["n"], c["pred"]
    t = pred[b, n, :4]
    pbox = xyxy(torch.cat(((2 * torch.sigmoid(t[:, :2]) - 0.5 + c["cell"]) * c["stride"],
                           c["wh"] * (2 * torch.sigmoid(t[:, 2:])) ** 2), -1))
    close(out.weighted["box"], 0.05 * (1 - ciou(pbox, c["gt"])).mean(), "pooled box")
    close(out.weighted["cls"], 0.5 * bce(pred[b, n, 5:], F.one_hot(c["cls"], C).double()).mean(), "pooled cls")
    assert out.weighted["box"] < lbox / 2 and out.weighted["cls"] < lcls / 2  # ~3x smaller on three levels


def test_ssd_matches_multibox_loss():
    """ssd.pytorch MultiBoxLoss: Smooth L1 on (d_cx / (v0 w_a), d_cy / (v1 h_a), log(w / w_a) / v2, ...)
    over positives; softmax CE (background 0) over positives and the 3 x positives hardest
    negatives per image (ranked by their background loss); both divided by the positives N."""
    r = preset("ssd")
    out, c = run(r)
    b, n, pred, a = c["b"], c["n"], c["pred"], c["a"]
    g = cxcywh(c["gt"])
    centre = (c["cell"] + 0.5) * c["stride"]
    target = torch.cat(((g[:, :2] - centre) / (0.1 * c["wh"]), torch.log(g[:, 2:] / c["wh"]) / 0.2), -1)
    N = b.numel()
    box = F.smooth_l1_loss(pred[b, n, :4], target, beta=1.0, reduction="sum") / N
    logits = pred[..., 4:]
    ce_bg = -torch.log_softmax(logits, -1)[..., 0]  # [B, N]
    cls_pos = F.cross_entropy(logits[b, n], c["cls"] + 1, reduction="sum")
    neg_sum = 0.0
    for i in range(B):
        k = min(3 * int((b == i).sum()), int(a.negative[i].sum()))
        neg_sum = neg_sum + ce_bg[i][a.negative[i]].sort(descending=True).values[:k].sum()
    close(out.weighted["box"], box, "box")
    close(out.weighted["cls"], cls_pos / N, "cls")
    close(out.weighted["noobj"], neg_sum / N, "hard negatives")
    close(out.total, box + (cls_pos + neg_sum) / N, "total")


def test_retinanet_matches_focal_loss():
    """Lin et al. 2017, eq. 5 and sec. 4: sigmoid focal loss (alpha .25, gamma 2) over every
    non-ignored anchor x class, Smooth L1 (beta 0.1, detectron2) on deltas over positives,
    both divided by the number of positives."""
    r = preset("retinanet")
    out, c = run(r)
    b, n, pred, a = c["b"], c["n"], c["pred"], c["a"]
    g = cxcywh(c["gt"])
    centre = (c["cell"] + 0.5) * c["stride"]
    target = torch.cat(((g[:, :2] - centre) / c["wh"], torch.log(g[:, 2:] / c["wh"])), -1)
    N = b.numel()
    box = F.smooth_l1_loss(pred[b, n, :4], target, beta=0.1, reduction="sum") / N
    onehot = torch.zeros(B, pred.shape[1], C, dtype=torch.float64)
    onehot[b, n, c["cls"]] = 1.0
    prob = torch.sigmoid(pred[..., 4:])
    p_t = torch.where(onehot > 0, prob, 1 - prob)
    alpha_t = torch.where(onehot > 0, 0.25, 0.75)
    fl = (-alpha_t * (1 - p_t) ** 2 * torch.log(p_t)).sum(-1)  # [B, N]
    keep = a.positive | a.negative
    close(out.weighted["box"], box, "box")
    close(out.weighted["cls"] + out.weighted["noobj"], (fl * keep).sum() / N, "focal")
    close(out.total, box + (fl * keep).sum() / N, "total")


def test_every_preset_has_a_reference_test():
    names = {f.__name__ for f in globals().values() if inspect.isfunction(f) and f.__name__.startswith("test_")}
    for name in PRESETS:
        assert any(t.startswith(f"test_{name}_matches") for t in names), name


# --------------------------------------------------------------------------- wh_ratio vs build_targets
def ultralytics_cells(g: torch.Tensor, W: int, H: int) -> list[list[tuple[int, int]]]:
    """ultralytics yolov5 v7.0 ComputeLoss.build_targets' cells for centres ``g [M, 2]`` in grid
    units, duplicates kept: offsets (0, 0), (0.5, 0), (0, 0.5), (-0.5, 0), (0, -0.5) where
    ``gxy % 1 < .5 & gxy > 1`` (j, k) and ``gxi % 1 < .5 & gxi > 1`` (l, m), ``gij = (gxy - off).long()``."""
    gxi = torch.tensor([W, H], dtype=g.dtype) - g
    j, k = ((g % 1 < 0.5) & (g > 1)).T
    l, m = ((gxi % 1 < 0.5) & (gxi > 1)).T
    use = torch.stack((torch.ones_like(j), j, k, l, m))  # [5, M]
    off = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], dtype=g.dtype) * 0.5
    gij = (g[None] - off[:, None]).long()  # [5, M, 2]
    gij[..., 0].clamp_(0, W - 1)
    gij[..., 1].clamp_(0, H - 1)
    return [[tuple(gij[o, i].tolist()) for o in range(5) if use[o, i]] for i in range(g.shape[0])]


def test_wh_ratio_cells_are_build_targets_cells_without_the_border_duplicate():
    """The reference repeats the centre cell for a centre exactly on a cell border (its l/m test
    holds at fraction 0 and -0.5 truncates back); wh_ratio gives the same cells once. The
    docstrings that describe it say so (they claimed a far neighbour before)."""
    r = preset("scaled_yolov4")
    crit = build_criterion(r, C, S)
    p = crit.priors
    boxes = torch.tensor([[[44.0, 44.0, 84.0, 76.0], [10.3, 70.9, 41.7, 101.3]]])  # centre (64, 60): x on a border
    tg = Targets(boxes, torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.bool))
    a = assign_wh_ratio(p, tg, r.anchor_t)
    c = cxcywh(boxes[0])
    for lvl, ((H, W, A), off, s) in enumerate(zip(p.level_shapes, p.level_offsets, p.level_strides)):
        ref = ultralytics_cells(c[:, :2] / s, W, H)
        if lvl == 0:  # stride 8: x = 8.0 on a border: centre cell (8, 7) twice, (7, 7) once, no (9, 7)
            assert sorted(ref[0]) == [(7, 7), (8, 7), (8, 7)]
        rows = torch.arange(off, off + H * W * A)
        for gi in range(2):
            for a_in in range(A):
                aw = p.anchor_wh[(p.anchor_level == lvl).nonzero()[a_in, 0]]
                ratio = torch.maximum(c[gi, 2:] / aw, aw / c[gi, 2:]).max()
                mine = rows[(a.matched_gt[0, rows] == gi) & ((rows - off) % A == a_in)] - off
                cells = {(int(q // A % W), int(q // A // W)) for q in mine}
                assert cells == (set(ref[gi]) if ratio < r.anchor_t else set()), (lvl, gi, a_in)
    assert "centre cell twice" in " ".join(inspect.getdoc(assign_wh_ratio).split())
    assert "twice instead" in " ".join(inspect.getdoc(oracle_prediction).split())
