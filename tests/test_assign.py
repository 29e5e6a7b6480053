"""Assigners: the behaviours DESIGN.md and the issue pin down."""

import pytest
import torch

from ablate.detect import IGNORED, NEGATIVE, POSITIVE, Targets, build_criterion, build_priors, get_layout, preset
from ablate.detect.anchors import AnchorLayout, LevelSpec
from ablate.detect.assign import (
    apply_ignore_mask,
    assign,
    assign_best_anchor,
    assign_max_iou,
    assign_wh_ratio,
    assign_yolov1,
)
from ablate.detect.boxes import box_iou, elementwise_iou
from ablate.detect.coding import ScaledYoloCoding, YoloCoding, build_coding


def grid_2x2():
    """One level, stride 32, one 32x32 anchor per cell, 64 px input: four anchors tiling the image."""
    return build_priors(AnchorLayout("t", (LevelSpec(32, ((32.0, 32.0),)),)), 64)


def one_image(*boxes, labels=None):
    b = torch.tensor([boxes], dtype=torch.float32)
    lab = torch.tensor([labels or [0] * len(boxes)])
    return Targets(b, lab, torch.ones(1, len(boxes), dtype=torch.bool))


# --------------------------------------------------------------------------- max_iou
def test_max_iou_low_quality_match_gets_best_anchor():
    priors = grid_2x2()
    tg = one_image([0.0, 0.0, 32.0, 9.6])  # IoU 0.3 with anchor 0, 0 with the rest
    assert box_iou(priors.boxes, tg.boxes[0])[0, 0].item() == pytest.approx(0.3)
    on = assign_max_iou(priors, tg, pos_iou=0.5, neg_iou=0.4, low_quality=True)
    assert on.labels[0].tolist() == [POSITIVE, NEGATIVE, NEGATIVE, NEGATIVE]
    assert on.matched_gt[0, 0] == 0
    off = assign_max_iou(priors, tg, pos_iou=0.5, neg_iou=0.4, low_quality=False)
    assert off.labels[0].tolist() == [NEGATIVE] * 4
    # min_pos_iou above the best IoU turns the low-quality match off again
    gated = assign_max_iou(priors, tg, pos_iou=0.5, neg_iou=0.4, low_quality=True, min_pos_iou=0.35)
    assert gated.labels[0].tolist() == [NEGATIVE] * 4


def test_max_iou_band_between_thresholds_is_ignored():
    priors = grid_2x2()
    tg = one_image([0.0, 0.0, 60.0, 32.0])  # IoU 0.533 with anchor 0, 0.4375 with anchor 1
    a = assign_max_iou(priors, tg, pos_iou=0.5, neg_iou=0.4, low_quality=False)
    assert a.labels[0].tolist() == [POSITIVE, IGNORED, NEGATIVE, NEGATIVE]
    # 0.3/0.7: anchor 0 now in the band too
    b = assign_max_iou(priors, tg, pos_iou=0.7, neg_iou=0.3, low_quality=False)
    assert b.labels[0].tolist() == [IGNORED, IGNORED, NEGATIVE, NEGATIVE]
    # the boundaries: IoU == pos_iou is positive, IoU == neg_iou is ignored
    c = assign_max_iou(grid_2x2(), one_image([8.0, 0.0, 48.0, 32.0]), pos_iou=0.5, neg_iou=0.2857143, low_quality=False)
    assert c.labels[0, 0] == POSITIVE  # 768 / 1536 = 0.5
    assert c.labels[0, 1] == IGNORED  # 512 / 1792 = 0.2857...


def test_max_iou_targets_follow_matched_gt():
    priors = grid_2x2()
    tg = one_image([0.0, 0.0, 30.0, 30.0], [34.0, 34.0, 64.0, 64.0], labels=[3, 7])
    a = assign_max_iou(priors, tg, 0.5, 0.4)
    assert a.labels[0].tolist() == [POSITIVE, NEGATIVE, NEGATIVE, POSITIVE]
    assert a.cls_targets[0].tolist() == [3, -1, -1, 7]
    assert torch.equal(a.box_targets[0, 3], tg.boxes[0, 1])


# --------------------------------------------------------------------------- no GT
@pytest.mark.parametrize("name", ["best_anchor", "max_iou", "wh_ratio", "yolov1"])
def test_no_ground_truth_is_all_negative(name):
    priors = build_priors(get_layout("yolov1" if name == "yolov1" else "yolov3"), 128)
    for G in (0, 3):  # no GT at all, and three padding slots that are all invalid
        tg = Targets(torch.zeros(2, G, 4), torch.zeros(2, G, dtype=torch.long), torch.zeros(2, G, dtype=torch.bool))
        decoded = priors.boxes[None].expand(2, -1, -1)
        a = assign(name, priors, tg, decoded, ignore_thresh=0.5)
        assert (a.labels == NEGATIVE).all()
        assert (a.matched_gt == -1).all()
        stats = a.stats(tg.valid)
        assert stats["num_pos"] == 0 and stats["gt_without_pos"] == 0


# --------------------------------------------------------------------------- batched == per image
def random_targets(gen, B=4, G=6, size=256):
    wh = (torch.rand(B, G, 2, generator=gen) * 0.5 + 0.03) * size
    xy = torch.rand(B, G, 2, generator=gen) * (size - wh)
    boxes = torch.cat((xy, xy + wh), -1)
    labels = torch.randint(0, 5, (B, G), generator=gen)
    n = torch.tensor([0, 1, G, G - 2])  # GTs per image, padded
    valid = torch.arange(G)[None] < n[:, None]
    boxes = boxes * valid[..., None]
    return Targets(boxes, labels, valid)


@pytest.mark.parametrize(
    "name,layout,kw",
    [
        ("best_anchor", "yolov3", {"ignore_thresh": 0.5}),
        ("best_anchor", "yolov4", {"iou_thresh": 0.213}),
        ("max_iou", "retinanet", {"pos_iou": 0.5, "neg_iou": 0.4}),
        ("max_iou", "ssd", {"pos_iou": 0.5, "neg_iou": 0.5}),
        ("max_iou", "yolov3", {"pos_iou": 0.5, "neg_iou": 0.4, "coding": "yolo"}),
        ("max_iou", "scaled_yolov4", {"pos_iou": 0.3, "neg_iou": 0.2, "coding": "scaled_yolo"}),
        ("wh_ratio", "scaled_yolov4", {"anchor_t": 4.0, "coding": "yolo"}),  # counted, not restricted
        ("wh_ratio", "scaled_yolov4", {"anchor_t": 4.0}),
        ("yolov1", "yolov1", {}),
    ],
)
def test_batched_assignment_equals_per_image(name, layout, kw):
    gen = torch.Generator().manual_seed(7)
    priors = build_priors(get_layout(layout), 256)
    if "coding" in kw:
        kw = {k: v for k, v in kw.items() if k != "coding"} | {"reach": build_coding(kw["coding"]).centre_range(priors)}
    tg = random_targets(gen)
    B = tg.boxes.shape[0]
    decoded = priors.boxes[None] + torch.randn(B, priors.num, 4, generator=gen) * 6
    decoded = torch.cat((decoded[..., :2], torch.maximum(decoded[..., 2:], decoded[..., :2] + 1)), -1)
    full = assign(name, priors, tg, decoded, **kw)
    for i in range(B):
        n = int(tg.valid[i].sum())
        one = Targets(tg.boxes[i : i + 1, :n], tg.labels[i : i + 1, :n], tg.valid[i : i + 1, :n])
        single = assign(name, priors, one, decoded[i : i + 1], **kw)
        assert torch.equal(single.labels[0], full.labels[i])
        assert torch.equal(single.matched_gt[0], full.matched_gt[i])
        assert torch.equal(single.cls_targets[0], full.cls_targets[i])
        assert torch.allclose(single.box_targets[0], full.box_targets[i])
        assert torch.equal(single.pos_per_gt[0], full.pos_per_gt[i, :n])
        assert torch.equal(single.unreachable[0], full.unreachable[i])
    assert full.positive.any()


# --------------------------------------------------------------------------- best_anchor
def test_best_anchor_centre_cell_and_extra_anchors():
    priors = build_priors(get_layout("yolov3"), 416)
    # a 30x60 box: best anchor is (30, 61), anchor id 3 on level 1, centred at (100, 200)
    tg = one_image([85.0, 170.0, 115.0, 230.0])
    a = assign_best_anchor(priors, tg)
    pos = a.positive[0].nonzero().squeeze(1)
    assert pos.numel() == 1
    n = pos.item()
    assert priors.anchor_id[n] == 3 and priors.level[n] == 1
    assert priors.cell[n].tolist() == [100 // 16, 200 // 16]
    # YOLOv4's iou_thresh adds every anchor above the shape-IoU threshold, in its own level's centre cell
    b = assign_best_anchor(priors, tg, iou_thresh=0.213)
    ids = sorted(priors.anchor_id[b.positive[0]].tolist())
    assert 3 in ids and len(ids) > 1
    for m in b.positive[0].nonzero().squeeze(1).tolist():
        s = priors.stride[m].item()
        assert priors.cell[m].tolist() == [100 // s, 200 // s]


def test_best_anchor_conflict_goes_to_better_shape():
    priors = build_priors(get_layout("yolov3"), 416)
    # two GTs in the same cell both best-matching anchor 3: the one closer in shape wins
    tg = one_image([85.0, 170.0, 115.0, 230.0], [86.0, 171.0, 114.0, 225.0])
    a = assign_best_anchor(priors, tg)
    assert a.positive.sum() == 1
    assert a.matched_gt[a.positive].item() == 0
    assert a.stats(tg.valid)["gt_without_pos"] == 1


# --------------------------------------------------------------------------- ignore mask
@pytest.mark.parametrize("thresh,expect_grad", [(0.7, [False, True]), (None, [True, True])])
def test_ignore_mask_blocks_objectness_gradient_above_thresh(thresh, expect_grad):
    recipe = preset("yolov3").override(ignore_thresh=thresh)
    crit = build_criterion(recipe, num_classes=3, image_size=64)
    priors, coding = crit.priors, YoloCoding()
    gt = torch.tensor([10.0, 10.0, 40.0, 40.0])
    tg = one_image(gt.tolist())
    pos = assign_best_anchor(priors, tg).positive[0]
    # same-size boxes shifted right: IoU = (30 - d) / (30 + d)
    def shifted(iou):
        d = 30 * (1 - iou) / (1 + iou)
        return gt + torch.tensor([d, 0.0, d, 0.0])
    boxes = {0.71: shifted(0.71), 0.69: shifted(0.69)}
    rows = {}
    for iou, box in boxes.items():
        centre = (box[:2] + box[2:]) / 2
        cand = ((priors.cell + 0.5) * priors.stride[:, None] - centre).abs().max(1).values <= priors.stride / 2
        cand &= ~pos & ~torch.isin(torch.arange(priors.num), torch.tensor(list(rows.values()) or [-1]))
        rows[iou] = cand.nonzero()[0].item()
    # every other prediction: a tiny box in its own cell (no overlap with the GT)
    far = priors.boxes.clone()
    c = (far[:, :2] + far[:, 2:]) / 2
    far = torch.cat((c - 0.5, c + 0.5), 1)
    far[rows[0.71]], far[rows[0.69]] = boxes[0.71], boxes[0.69]
    t = coding.encode(far, priors)
    pred = torch.zeros(1, priors.num, crit.channels)
    pred[0, :, :4] = t
    pred.requires_grad_(True)
    from ablate.detect.boxes import elementwise_iou

    dec = coding.decode(t, priors)
    assert elementwise_iou(dec[rows[0.71]], gt).item() == pytest.approx(0.71, abs=1e-4)
    assert elementwise_iou(dec[rows[0.69]], gt).item() == pytest.approx(0.69, abs=1e-4)
    out = crit(pred, tg)
    out.losses["noobj"].backward()
    g = pred.grad[0, :, 4]
    assert [bool(g[rows[0.71]] != 0), bool(g[rows[0.69]] != 0)] == expect_grad
    if thresh is not None:
        assert out.assignment.labels[0, rows[0.71]] == IGNORED
        assert out.stats["ignored_per_image"] >= 1


def test_ignore_mask_only_touches_negatives():
    priors = build_priors(get_layout("yolov3"), 128)
    tg = one_image([20.0, 20.0, 60.0, 70.0])
    a = assign_best_anchor(priors, tg)
    decoded = tg.boxes[:, :1].expand(1, priors.num, 4)  # every prediction is the GT itself
    b = apply_ignore_mask(a, decoded, tg, 0.5)
    assert torch.equal(b.positive, a.positive)
    assert (b.labels[~a.positive] == IGNORED).all()


# --------------------------------------------------------------------------- wh_ratio
def test_wh_ratio_three_cells_per_matched_anchor_and_none_on_far_levels():
    priors = build_priors(get_layout("scaled_yolov4"), 640)
    # centre at cell (10, 10) of stride 8 with fraction (0.3, 0.7); 24 x 24 px
    cx, cy = (10 + 0.3) * 8, (10 + 0.7) * 8
    tg = one_image([cx - 12, cy - 12, cx + 12, cy + 12])
    a = assign_wh_ratio(priors, tg, anchor_t=4.0)
    pos = a.positive[0]
    lvl0 = pos & (priors.level == 0)
    per_anchor = torch.bincount(priors.anchor_id[lvl0], minlength=9)
    assert per_anchor[:3].tolist() == [3, 3, 3]  # all three level-0 anchors within ratio 4
    cells = {tuple(c) for c in priors.cell[lvl0].long().tolist()}
    assert cells == {(10, 10), (9, 10), (10, 11)}  # centre, left (x frac < .5), below (y frac > .5)
    # level 2 anchors (142x110 and up) are > 4x the 24 px box: nothing there
    assert not (pos & (priors.level == 2)).any()
    assert a.pos_per_gt[0, 0, 2] == 0 and a.pos_per_gt[0, 0, 0] == 9
    # and with a tighter anchor_t, anchors beyond it drop out
    b = assign_wh_ratio(priors, tg, anchor_t=1.6)
    # 12x16 (ratio 2) and 40x28 (ratio 1.67) exceed 1.6; 19x36 (ratio 1.5) stays
    assert torch.bincount(priors.anchor_id[b.positive[0]], minlength=9)[:3].tolist() == [0, 3, 0]


def test_wh_ratio_centre_on_a_cell_border_gets_only_reachable_cells():
    priors = build_priors(get_layout("scaled_yolov4"), 640)
    cx, cy = 10 * 8.0, (10 + 0.7) * 8  # x exactly on the border between cells 9 and 10
    tg = one_image([cx - 12, cy - 12, cx + 12, cy + 12])
    a = assign_wh_ratio(priors, tg, anchor_t=4.0)
    lvl0 = a.positive[0] & (priors.level == 0)
    cells = {tuple(c) for c in priors.cell[lvl0].long().tolist()}
    assert cells == {(10, 10), (9, 10), (10, 11)}  # not (11, 10): offset -1 is out of 2 sigma - 0.5's range
    off = (cx / 8 - priors.cell[lvl0][:, 0])
    assert ((off > -0.5) & (off < 1.5)).all()


def test_wh_ratio_no_neighbour_outside_the_grid():
    priors = build_priors(get_layout("scaled_yolov4"), 64)
    tg = one_image([0.5, 0.5, 3.7, 3.7])  # centre in the corner cell, fraction < .5 on both axes
    a = assign_wh_ratio(priors, tg, anchor_t=4.0)
    cells = priors.cell[a.positive[0] & (priors.level == 0)].long().tolist()
    assert all(c == [0, 0] for c in cells)


# --------------------------------------------------------------------------- yolov1
def test_yolov1_responsible_predictor_has_highest_iou():
    priors = build_priors(get_layout("yolov1"), 128)  # stride 32: 4x4 cells x 2 predictors
    tg = one_image([40.0, 40.0, 80.0, 90.0])  # centre (60, 65): cell (1, 2)
    decoded = torch.zeros(1, priors.num, 4)
    decoded[..., 2:] = 1.0
    cell_rows = ((priors.cell == torch.tensor([1.0, 2.0])).all(1)).nonzero().squeeze(1)
    decoded[0, cell_rows[0]] = torch.tensor([40.0, 40.0, 60.0, 60.0])  # IoU ~0.2
    decoded[0, cell_rows[1]] = torch.tensor([42.0, 42.0, 80.0, 88.0])  # IoU ~0.87
    a = assign_yolov1(priors, tg, decoded)
    assert a.positive[0].nonzero().squeeze(1).tolist() == [cell_rows[1].item()]
    decoded[0, cell_rows[0]] = torch.tensor([40.0, 40.0, 80.0, 90.0])
    b = assign_yolov1(priors, tg, decoded)
    assert b.positive[0].nonzero().squeeze(1).tolist() == [cell_rows[0].item()]


def test_assign_rejects_unknown_name():
    priors = grid_2x2()
    with pytest.raises(ValueError, match="unknown assigner 'atss'"):
        assign("atss", priors, one_image([0.0, 0.0, 10.0, 10.0]))


# --------------------------------------------------------------------------- reachability (max_iou on a YOLO coding)
def _offsets(priors, boxes, rows, gt):
    """Centre of GT ``gt[k]`` in grid units of row ``rows[k]``, minus its cell: ``[K, 2]``."""
    c = (boxes[gt, :2] + boxes[gt, 2:]) / 2
    return c / priors.stride[rows, None] - priors.cell[rows]


def test_max_iou_on_yolo_coding_keeps_only_reachable_positives():
    priors = grid_2x2()
    # centre (31, 16): cell 0; IoU 0.483 with anchor 0 and 0.433 with anchor 1 (cell 1, offset -0.03)
    tg = one_image([4.0, 0.0, 58.0, 32.0])
    plain = assign_max_iou(priors, tg, pos_iou=0.4, neg_iou=0.3)
    assert plain.labels[0].tolist() == [POSITIVE, POSITIVE, NEGATIVE, NEGATIVE]
    yolo = assign_max_iou(priors, tg, pos_iou=0.4, neg_iou=0.3, reach=YoloCoding().centre_range(priors))
    assert yolo.labels[0].tolist() == [POSITIVE, IGNORED, NEGATIVE, NEGATIVE]  # overlaps, but sigma(t) + 1 > 1
    assert yolo.unreachable.tolist() == [1] and yolo.stats(tg.valid)["unreachable_per_image"] == 1
    # YOLOv4's s sigma - (s-1)/2 with s = 1.1 reaches 0.05 into the neighbours; 2 sigma - 0.5 half a cell
    for coding in (YoloCoding(scale_xy=1.1), ScaledYoloCoding()):
        a = assign_max_iou(priors, tg, pos_iou=0.4, neg_iou=0.3, reach=coding.centre_range(priors))
        assert a.labels[0].tolist() == plain.labels[0].tolist() and a.unreachable.tolist() == [0]


@pytest.mark.parametrize("low_quality", [True, False])
def test_max_iou_reach_on_yolov3_random_targets(low_quality):
    gen = torch.Generator().manual_seed(3)
    priors = build_priors(get_layout("yolov3"), 256)
    reach = YoloCoding().centre_range(priors)  # [N, 2]: (0, 1) everywhere
    tg = random_targets(gen)
    plain = assign_max_iou(priors, tg, 0.5, 0.4, low_quality=low_quality)
    a = assign_max_iou(priors, tg, 0.5, 0.4, low_quality=low_quality, reach=reach)
    lost = 0
    for i in range(tg.boxes.shape[0]):
        rows = a.positive[i].nonzero().squeeze(1)
        off = _offsets(priors, tg.boxes[i], rows, a.matched_gt[i, rows])
        assert ((off >= 0) & (off <= 1)).all()
        rows = plain.positive[i].nonzero().squeeze(1)
        off = _offsets(priors, tg.boxes[i], rows, plain.matched_gt[i, rows])
        bad = ((off < 0) | (off > 1)).any(1)
        assert a.unreachable[i] == bad.sum()
        lost += int(bad.sum())
        # an unreachable plain positive that overlaps a GT by >= neg_iou is no background now (ignored,
        # or positive for another GT); below it (a tied low-quality match) it is a negative, as its IoU says
        if not bad.any():
            continue
        iou = box_iou(priors.boxes[rows[bad]], tg.boxes[i][tg.valid[i]]).amax(1)
        assert torch.equal(a.labels[i, rows[bad]] != NEGATIVE, iou >= 0.4)
    assert lost > 0
    if low_quality:  # every GT keeps its best reachable anchor
        assert a.stats(tg.valid)["gt_without_pos"] == 0


def test_criterion_max_iou_on_yolov3_head_reports_unreachable():
    from ablate.detect.coding import YoloCoding as Yolo

    recipe = preset("yolov3").override(assigner="max_iou", neg_iou=0.4, pos_iou=0.5, ignore_thresh=None)
    crit = build_criterion(recipe, 5, 256)
    gen = torch.Generator().manual_seed(5)
    tg = random_targets(gen)
    out = crit(torch.zeros(tg.boxes.shape[0], crit.priors.num, crit.channels), tg)
    assert out.stats["unreachable_per_image"] > 0
    pos = out.assignment.positive
    b, n = pos.nonzero(as_tuple=True)
    gt = out.assignment.matched_gt[b, n]
    c = (tg.boxes[b, gt, :2] + tg.boxes[b, gt, 2:]) / 2
    off = c / crit.priors.stride[n, None] - crit.priors.cell[n]
    assert ((off >= 0) & (off <= 1)).all()
    # the coding reproduces every target it trains on
    rows = crit.priors.rows(n)
    back = Yolo().decode(Yolo().encode(out.assignment.box_targets[b, n], rows), rows)
    assert (elementwise_iou(back, out.assignment.box_targets[b, n]) > 0.99).all()
    # unbounded codings count nothing
    retina = build_criterion(preset("retinanet"), 5, 256)
    r_out = retina(torch.zeros(tg.boxes.shape[0], retina.priors.num, retina.channels), tg)
    assert r_out.stats["unreachable_per_image"] == 0
