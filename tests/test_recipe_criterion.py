"""LossRecipe validation and overrides; the criterion of every preset."""

import pytest
import torch
import torch.nn.functional as F

from ablate.detect import PRESETS, LossRecipe, Targets, build_criterion, preset
from ablate.detect import losses as L


# --------------------------------------------------------------------------- recipe
def test_presets_are_the_seven_seed_systems():
    assert set(PRESETS) == {"yolov1", "yolov2", "yolov3", "yolov4", "scaled_yolov4", "ssd", "retinanet"}
    assert preset("retinanet").cls_loss == "focal" and preset("retinanet").obj_loss is None
    assert preset("ssd").neg_mining == "ohem" and preset("ssd").neg_pos_ratio == 3.0
    assert preset("yolov3").ignore_thresh == 0.7 and preset("yolov4").iou_thresh == 0.213
    assert preset("scaled_yolov4").level_balance == (4.0, 1.0, 0.4)
    assert preset("yolov1").lambda_box == 5.0 and preset("yolov1").lambda_noobj == 0.5


def test_override_by_name_and_from_strings():
    r = preset("yolov3").override(box_loss="ciou", ignore_thresh=None)
    assert r.box_loss == "ciou" and r.ignore_thresh is None and r.name == "yolov3"
    s = preset("scaled_yolov4").override_from(["level_balance=[4, 1, 0.5]", "focal_gamma=1", "obj_loss=null",
                                               "obj_target=one", "normalize=mean"])
    assert s.level_balance == (4.0, 1.0, 0.5) and s.focal_gamma == 1.0 and s.obj_loss is None
    assert preset("yolov3").diff(r) == {"box_loss": ("mse", "ciou"), "ignore_thresh": (0.7, None)}
    with pytest.raises(AttributeError):
        r.box_loss = "iou"  # frozen


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"box_loss": "l3"}, "box_loss: unknown value 'l3'; choose one of mse, sse_sqrt, smooth_l1, iou, giou"),
        ({"assigner": "atss"}, "assigner: unknown value 'atss'; choose one of best_anchor, max_iou"),
        ({"neg_iou": 0.7, "pos_iou": 0.3}, "neg_iou (0.7) must be <= pos_iou (0.3)"),
        ({"focal_gamma": -1.0}, "focal_gamma: must be >= 0"),
        ({"focal_alpha": 1.5}, "focal_alpha: must be in [0, 1]"),
        ({"ignore_thresh": 1.5}, "ignore_thresh: 1.5 is outside [0, 1]"),
        ({"lambda_box": -1}, "lambda_box: must be a finite number >= 0"),
        ({"lambda_box": "big"}, "lambda_box: expected float, got 'big'"),
        ({"low_quality": "yes"}, "low_quality: expected bool"),
        ({"level_balance": (1.0, 2.0)}, "level_balance: 2 values for 3 levels"),
        ({"anchors": "yolov1"}, "assigner: best_anchor matches by anchor shape"),
        ({"colour": "red"}, "unknown recipe field 'colour'"),
        ({"obj_loss": None, "normalize": "level_mean"}, "normalize: level_mean is YOLOv5's per-level reduction"),
        ({"obj_loss": None, "obj_target": "ciou"}, "obj_target: ciou needs an objectness loss"),
        ({"scale_by_batch": 1}, "scale_by_batch: expected bool"),
    ],
)
def test_bad_recipes_fail_with_one_clear_line(changes, message):
    with pytest.raises(ValueError) as e:
        preset("yolov3").override(**changes)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_override_from_rejects_malformed_items():
    with pytest.raises(ValueError, match="not of the form field=value"):
        preset("yolov3").override_from(["box_loss"])


def test_head_channels():
    assert preset("yolov3").head_channels(80) == 85
    assert preset("retinanet").head_channels(80) == 84
    assert preset("ssd").head_channels(80) == 85  # background class


# --------------------------------------------------------------------------- criterion
def make_targets(B, G, size, C, gen):
    wh = (torch.rand(B, G, 2, generator=gen) * 0.5 + 0.05) * size
    xy = torch.rand(B, G, 2, generator=gen) * (size - wh)
    return Targets(torch.cat((xy, xy + wh), -1), torch.randint(0, C, (B, G), generator=gen),
                   torch.ones(B, G, dtype=torch.bool))


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("G", [0, 1, 30])
def test_every_preset_finite_losses_and_gradients(name, G):
    gen = torch.Generator().manual_seed(G)
    C, size, B = 4, 128, 2
    crit = build_criterion(preset(name), C, size)
    pred = (torch.randn(B, crit.priors.num, crit.channels, generator=gen) * 3).requires_grad_(True)
    out = crit(pred, make_targets(B, G, size, C, gen))
    expected = {"box", "cls", "noobj"} | ({"obj"} if preset(name).has_objectness else set())
    assert set(out.losses) == expected
    for k, v in out.losses.items():
        assert torch.isfinite(v), (k, v)
    assert torch.isfinite(out.total)
    out.total.backward()
    assert torch.isfinite(pred.grad).all()
    if G == 0 and preset(name).neg_mining == "ohem":
        # SSD keeps 3 negatives per positive: an image without objects teaches nothing (ssd.pytorch)
        assert pred.grad.abs().sum() == 0
    else:
        assert pred.grad.abs().sum() > 0
    if G:
        assert out.stats["num_pos"] > 0
        assert out.losses["box"] > 0


@pytest.mark.parametrize("name", list(PRESETS))
def test_weighted_is_lambda_times_unweighted(name):
    gen = torch.Generator().manual_seed(0)
    r = preset(name).override(lambda_box=2.5, lambda_obj=1.5, lambda_noobj=0.3, lambda_cls=0.7)
    crit = build_criterion(r, 3, 96)
    out = crit(torch.randn(2, crit.priors.num, crit.channels, generator=gen), make_targets(2, 3, 96, 3, gen))
    neg_base = 1.5 if r.has_objectness else 0.7
    w = {"box": 2.5, "obj": 1.5, "noobj": 0.3 * neg_base, "cls": 0.7}
    for k, v in out.losses.items():
        assert torch.allclose(out.weighted[k], v * w[k])
    assert torch.allclose(out.total, sum(out.weighted.values()))


def test_retinanet_focal_matches_elementwise_reference():
    gen = torch.Generator().manual_seed(3)
    crit = build_criterion(preset("retinanet"), 5, 128)
    pred = torch.randn(2, crit.priors.num, crit.channels, generator=gen)
    out = crit(pred, make_targets(2, 4, 128, 5, gen))
    a = out.assignment
    onehot = F.one_hot(a.cls_targets.clamp(min=0), 5).float() * a.positive[..., None]
    fl = L.sigmoid_focal_loss(pred[..., 4:], onehot, 0.25, 2.0).sum(-1)  # [B, N]
    P = a.positive.sum()
    assert torch.allclose(out.losses["cls"], (fl * a.positive).sum() / P, rtol=1e-5)
    assert torch.allclose(out.losses["noobj"], (fl * a.negative).sum() / P, rtol=1e-5)  # ignored anchors excluded


def test_ssd_ohem_keeps_three_negatives_per_positive():
    gen = torch.Generator().manual_seed(4)
    crit = build_criterion(preset("ssd"), 5, 128)
    pred = torch.randn(2, crit.priors.num, crit.channels, generator=gen)
    out = crit(pred, make_targets(2, 3, 128, 5, gen))
    a = out.assignment
    cls = pred[..., 4:].flatten(0, 1)  # background is class 0
    bg = F.cross_entropy(cls, torch.zeros(cls.shape[0], dtype=torch.long), reduction="none").view(2, -1)
    expected = 0.0
    for i in range(2):
        k = min(3 * int(a.positive[i].sum()), int(a.negative[i].sum()))
        expected += bg[i][a.negative[i]].sort(descending=True).values[:k].sum()
    assert torch.allclose(out.losses["noobj"] * a.positive.sum(), torch.as_tensor(expected), rtol=1e-5)


def test_objectness_iou_target_and_small_box_weight():
    gen = torch.Generator().manual_seed(5)
    base = preset("yolov3")
    tg = make_targets(1, 2, 128, 3, gen)
    pred = torch.randn(1, build_criterion(base, 3, 128).priors.num, 8, generator=gen)
    one = build_criterion(base.override(box_small_weight=False), 3, 128)(pred, tg)
    small = build_criterion(base, 3, 128)(pred, tg)
    assert small.losses["box"] > one.losses["box"]  # 2 - w*h > 1
    iou_t = build_criterion(base.override(obj_target="iou"), 3, 128)(pred, tg)
    assert not torch.allclose(iou_t.losses["obj"], one.losses["obj"])


def test_pred_shape_is_checked():
    crit = build_criterion(preset("yolov3"), 3, 64)
    with pytest.raises(ValueError, match=r"expected \[B, 252, 8\]"):
        crit(torch.zeros(1, 10, 8), make_targets(1, 1, 64, 3, torch.Generator()))


def test_custom_combination_retinanet_thresholds_on_yolo_head():
    r = preset("yolov3").override(assigner="max_iou", pos_iou=0.5, neg_iou=0.4, ignore_thresh=None, box_loss="giou")
    gen = torch.Generator().manual_seed(6)
    crit = build_criterion(r, 3, 128)
    pred = torch.randn(2, crit.priors.num, crit.channels, generator=gen, requires_grad=True)
    out = crit(pred, make_targets(2, 5, 128, 3, gen))
    out.total.backward()
    assert out.stats["num_pos"] > 0 and torch.isfinite(pred.grad).all()
    assert isinstance(r, LossRecipe)
