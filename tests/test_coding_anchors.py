"""Box codings (encode/decode identity) and anchor layouts."""

import math

import pytest
import torch

from ablate.detect import preset
from ablate.detect.anchors import LAYOUTS, build_priors, fit_anchors, get_layout, kmeans_anchors, layout_from_anchors
from ablate.detect.boxes import wh_iou
from ablate.detect.coding import DeltaCoding, ScaledYoloCoding, Yolov1Coding, YoloCoding, build_coding


def boxes_near_priors(priors, gen, size_range=(0.5, 2.0), offset=0.45):
    """One box per prior, centred within ``offset`` cells of it, sized relative to the anchor."""
    N = priors.num
    centre = (priors.cell + 0.5 + (torch.rand(N, 2, generator=gen) * 2 - 1) * offset) * priors.stride[:, None]
    lo, hi = size_range
    wh = priors.wh * (lo + torch.rand(N, 2, generator=gen) * (hi - lo))
    return torch.cat((centre - wh / 2, centre + wh / 2), -1)


CODINGS = [
    ("yolo", YoloCoding(), "yolov3"),
    ("yolo_v4_scale", YoloCoding(scale_xy=(1.2, 1.1, 1.05)), "yolov4"),
    ("scaled_yolo", ScaledYoloCoding(), "scaled_yolov4"),
    ("delta_ssd", DeltaCoding((0.1, 0.1, 0.2, 0.2)), "ssd"),
    ("delta_retina", DeltaCoding((1.0, 1.0, 1.0, 1.0)), "retinanet"),
    ("yolov1", Yolov1Coding(), "yolov1"),
]


@pytest.mark.parametrize("name,coding,layout", CODINGS, ids=[c[0] for c in CODINGS])
def test_encode_decode_identity(name, coding, layout):
    gen = torch.Generator().manual_seed(0)
    priors = build_priors(get_layout(layout), 320, dtype=torch.float64)
    boxes = boxes_near_priors(priors, gen).double()
    t = coding.encode(boxes, priors)
    assert torch.isfinite(t).all()
    back = coding.decode(t, priors)
    assert torch.allclose(back, boxes, atol=1e-6), (back - boxes).abs().max()
    # and through the batch dimension
    back_b = coding.decode(t[None].expand(2, -1, -1), priors)
    assert torch.allclose(back_b[1], boxes, atol=1e-6)


@pytest.mark.parametrize("name,coding,layout", CODINGS, ids=[c[0] for c in CODINGS])
def test_regression_space_matches_encoding(name, coding, layout):
    gen = torch.Generator().manual_seed(1)
    priors = build_priors(get_layout(layout), 256, dtype=torch.float64)
    boxes = boxes_near_priors(priors, gen).double()
    t = coding.encode(boxes, priors)
    assert torch.allclose(coding.activate(t, priors), coding.target(boxes, priors), atol=1e-6)


def test_yolo_decode_formula():
    priors = build_priors(get_layout("yolov3"), 416)
    coding = YoloCoding(scale_xy=1.0)
    n = 5  # level 0, cell (1, 0), anchor 2
    assert priors.cell[n].tolist() == [1.0, 0.0] and priors.stride[n] == 8
    t = torch.zeros(priors.num, 4)
    t[n] = torch.tensor([0.0, 0.0, math.log(2.0), 0.0])
    box = coding.decode(t, priors)[n]
    # centre (sigma(0) + 1) * 8 = 12, (0.5 + 0) * 8 = 4; size (2 * 33, 23)
    assert torch.allclose(box, torch.tensor([12 - 33.0, 4 - 11.5, 12 + 33.0, 4 + 11.5]), atol=1e-5)


def test_yolov4_scale_extends_centre_range():
    priors = build_priors(get_layout("yolov4"), 608)
    coding = YoloCoding(scale_xy=(1.2, 1.1, 1.05))
    t = torch.full((priors.num, 4), -30.0)  # sigma -> 0
    xy = (coding.decode(t, priors)[:, :2] + coding.decode(t, priors)[:, 2:]) / 2
    frac = xy[0, 0] / priors.stride[0] - priors.cell[0, 0]
    assert frac.item() == pytest.approx(-0.1, abs=1e-4)  # -(1.2 - 1) / 2


def test_delta_variances_scale_targets():
    priors = build_priors(get_layout("ssd"), 300)
    boxes = priors.boxes + torch.tensor([3.0, 0.0, 3.0, 0.0])  # shift right by 3 px
    t1 = DeltaCoding((1.0, 1.0, 1.0, 1.0)).encode(boxes, priors)
    t2 = DeltaCoding((0.1, 0.1, 0.2, 0.2)).encode(boxes, priors)
    assert torch.allclose(t2[:, 0], t1[:, 0] / 0.1, atol=1e-5)
    assert torch.allclose(t2[:, 2:], torch.zeros_like(t2[:, 2:]), atol=1e-5)


def test_build_coding_rejects_unknown():
    with pytest.raises(ValueError, match="unknown box coding 'yolo5'.*yolo, scaled_yolo"):
        build_coding("yolo5")


def test_yolov3_layout_416_and_rescaled():
    priors = build_priors(get_layout("yolov3"), 640)
    assert priors.num == 25200  # 3 x (80^2 + 40^2 + 20^2)
    assert priors.level_shapes == ((80, 80, 3), (40, 40, 3), (20, 20, 3))
    assert torch.allclose(priors.anchor_wh[0], torch.tensor([10.0, 13.0]) * 640 / 416)
    assert torch.allclose(build_priors(get_layout("yolov3"), 416).anchor_wh[-1], torch.tensor([373.0, 326.0]))


def test_retinanet_layout():
    layout = get_layout("retinanet")
    assert layout.anchors_per_level == (9,) * 5 and layout.strides == (8, 16, 32, 64, 128)
    areas = torch.tensor([w * h for w, h in layout.levels[0].anchors])
    assert torch.allclose(areas[:3], torch.full((3,), 32.0**2))  # scale 1, three ratios
    assert torch.allclose(areas[3:6], torch.full((3,), (32 * 2 ** (1 / 3)) ** 2))


def test_ssd_layout_counts():
    layout = get_layout("ssd")
    assert layout.anchors_per_level == (4, 6, 6, 6, 4, 4)
    assert build_priors(layout, 300).level_shapes[0][:2] == (38, 38)


def test_yolov2_and_yolov1_layouts():
    assert get_layout("yolov2").anchors_per_level == (5,)
    v1 = get_layout("yolov1")
    assert v1.anchor_free and v1.anchors_per_level == (2,)


def test_prior_order_is_level_y_x_anchor():
    priors = build_priors(get_layout("yolov3"), 64)
    h, w, a = priors.level_shapes[1]
    off = priors.level_offsets[1]
    n = off + (2 * w + 3) * a + 1
    assert priors.level[n] == 1 and priors.cell[n].tolist() == [3.0, 2.0] and priors.anchor_id[n] == 4


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_all_layouts_build(name):
    priors = build_priors(get_layout(name), 160)
    assert priors.boxes.shape == (priors.num, 4)
    assert (priors.boxes[:, 2:] > priors.boxes[:, :2]).all()


def test_kmeans_recovers_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 10.0], [30.0, 60.0], [120.0, 80.0]])
    wh = torch.cat([c * (1 + 0.05 * torch.randn(100, 2, generator=gen)) for c in centres])
    got = kmeans_anchors(wh, 3, seed=0)
    assert torch.allclose(got, centres, rtol=0.05)
    assert (wh_iou(got, centres).diagonal() > 0.95).all()
    layout = layout_from_anchors("mine", got, (8,), 416)
    assert layout.anchors_per_level == (3,)
    with pytest.raises(ValueError):
        kmeans_anchors(wh[:2], 3)


def test_fit_anchors_deals_clusters_to_levels_by_area():
    gen = torch.Generator().manual_seed(1)
    centres = torch.tensor([[8.0, 10.0], [14.0, 30.0], [30.0, 14.0], [40.0, 40.0], [60.0, 90.0], [90.0, 60.0],
                            [120.0, 50.0], [50.0, 120.0], [140.0, 140.0]])
    wh = torch.cat([c * (1 + 0.03 * torch.randn(60, 2, generator=gen)) for c in centres])
    fitted = fit_anchors(get_layout("yolov3"), wh)
    assert fitted.strides == (8, 16, 32) and fitted.anchors_per_level == (3, 3, 3) and fitted.ref_size is None
    got = torch.tensor([a for lv in fitted.levels for a in lv.anchors])  # [9, 2], by level
    assert (got.prod(1).diff() >= 0).all()  # smallest shapes on the finest level
    assert (wh_iou(got, centres).amax(1) > 0.9).all() and (wh_iou(centres, got).amax(1) > 0.9).all()
    # the priors use the fitted shapes in pixels, not rescaled by a reference size
    priors = build_priors(fitted, 320)
    assert torch.allclose(priors.anchor_wh, got)
    # uneven layouts keep their per-level counts (SSD: 4, 6, 6, 6, 4, 4)
    ssd = fit_anchors(get_layout("ssd"), torch.cat([wh, wh * 1.5, wh * 2]))
    assert ssd.anchors_per_level == get_layout("ssd").anchors_per_level
    with pytest.raises(ValueError, match="no prior shapes"):
        fit_anchors(get_layout("yolov1"), wh)


def test_anchor_fit_in_the_recipe():
    assert preset("yolov3").anchor_fit == "kmeans" and preset("yolov2").anchor_fit == "kmeans"
    assert preset("retinanet").anchor_fit == "none"
    with pytest.raises(ValueError, match="anchor_fit: unknown value 'auto'"):
        preset("yolov3").override(anchor_fit="auto")
    with pytest.raises(ValueError, match="anchor_fit: anchors=yolov1 has no prior shapes"):
        preset("yolov1").override(anchor_fit="kmeans")
