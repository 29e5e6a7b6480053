"""Post-processing and COCO evaluation; the export check of the coordinate path.

Fixtures are hand-written COCO JSON (no pixels: COCOeval needs none) with non-square
images, so the letterbox pads a different axis per image, and boxes of every COCO area
range. The export check runs the ground truth through the inverse letterbox (AP = 1) and,
for every box coding, through a synthesised raw head output, decoding, NMS and the
inverse letterbox (AP >= 0.99).
"""

import json
import math

import pytest
import torch

from ablate.detect import build_priors, get_layout, preset
from ablate.detect.coding import build_coding
from ablate.detect.postprocess import Detections, oracle_prediction, postprocess, scores_from_logits
from ablate.evaluate import (
    COCO_METRICS,
    coco_evaluate,
    evaluate_model,
    export_check,
    gt_detections,
    load_coco_gt,
    to_coco_results,
)

S = 128  # network input size
CATEGORIES = [(3, "cat"), (7, "dog"), (9, "bird"), (12, "zebra")]  # zebra: no ground truth
CATEGORY_IDS = [c for c, _ in CATEGORIES]
IMAGES = {  # id: (w, h)
    1: (100, 80),
    2: (60, 120),
    3: (200, 150),
}
BOXES = {  # id: [(category_id, [x, y, w, h]), ...] in original pixels
    1: [(3, [5, 5, 20, 15]), (7, [40, 10, 50, 60]), (9, [70, 50, 25, 25]), (3, [10, 40, 30, 35])],
    2: [(7, [5, 5, 50, 40]), (9, [10, 60, 12, 10]), (3, [20, 80, 35, 35])],
    3: [(7, [10, 10, 120, 100]), (3, [140, 20, 50, 40]), (9, [150, 100, 30, 30]), (9, [20, 120, 8, 6])],
}


def letterbox_meta(image_id: int, S: int = S) -> dict:
    """The meta a letterboxing loader would record: scale to fit, centre with integer pads."""
    w, h = IMAGES[image_id]
    s = S / max(w, h)
    nw, nh = round(w * s), round(h * s)
    return {"image_id": image_id, "orig_size": (h, w), "scale": s, "pad": ((S - nw) // 2, (S - nh) // 2)}


@pytest.fixture(scope="module")
def coco_gt(tmp_path_factory):
    anns, k = [], 1
    for img, boxes in BOXES.items():
        for cat, b in boxes:
            anns.append({"id": k, "image_id": img, "category_id": cat, "bbox": b, "area": b[2] * b[3], "iscrowd": 0})
            k += 1
    data = {
        "images": [{"id": i, "width": w, "height": h, "file_name": f"{i}.png"} for i, (w, h) in IMAGES.items()],
        "annotations": anns,
        "categories": [{"id": c, "name": n} for c, n in CATEGORIES],
    }
    path = tmp_path_factory.mktemp("coco") / "instances.json"
    path.write_text(json.dumps(data))
    return load_coco_gt(str(path))


@pytest.fixture(scope="module")
def metas():
    return [letterbox_meta(i) for i in IMAGES]


def letterboxed_gt(image_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth of one image forward-mapped into the input: ``input = orig * scale + pad``."""
    m = letterbox_meta(image_id)
    xywh = torch.tensor([b for _, b in BOXES[image_id]], dtype=torch.float32)
    xyxy = torch.cat((xywh[:, :2], xywh[:, :2] + xywh[:, 2:]), 1)
    pl, pt = m["pad"]
    boxes = xyxy * m["scale"] + torch.tensor([pl, pt, pl, pt], dtype=torch.float32)
    labels = torch.tensor([CATEGORY_IDS.index(c) for c, _ in BOXES[image_id]])
    return boxes, labels


# --------------------------------------------------------------------------- export check
def test_fixture_covers_every_area_range_and_both_pad_axes(metas):
    areas = [b[2] * b[3] for boxes in BOXES.values() for _, b in boxes]
    assert min(areas) < 32**2 and any(32**2 <= a < 96**2 for a in areas) and max(areas) >= 96**2
    pads = [m["pad"] for m in metas]
    assert any(p[0] > 0 for p in pads) and any(p[1] > 0 for p in pads)


def test_ground_truth_as_detections_scores_ap_1(coco_gt, metas):
    dets = []
    for m in metas:
        boxes, labels = letterboxed_gt(m["image_id"])
        dets.append(Detections(boxes, torch.ones(len(labels)), labels))
    res = coco_evaluate(coco_gt, to_coco_results(dets, metas, CATEGORY_IDS))
    assert res["AP"] == pytest.approx(1.0) and res["AP50"] == pytest.approx(1.0)
    for k in COCO_METRICS:
        if k != "AR1":  # AR1 allows one detection per image and class; two cats share image 1
            assert res[k] == pytest.approx(1.0), k
    assert res["per_class_AP"]["cat"] == pytest.approx(1.0)
    assert res["per_class_AP"]["dog"] == pytest.approx(1.0)
    assert res["per_class_AP"]["bird"] == pytest.approx(1.0)
    assert math.isnan(res["per_class_AP"]["zebra"])  # a class without ground truth
    # the helper does the same forward map
    for d, g in zip(dets, gt_detections(coco_gt, metas, CATEGORY_IDS)):
        assert torch.allclose(d.boxes, g.boxes, atol=1e-4) and torch.equal(d.labels, g.labels)
    assert export_check(coco_gt, metas, CATEGORY_IDS)["AP"] == pytest.approx(1.0)
    targets = [{"boxes": d.boxes, "labels": d.labels} for d in dets]  # as a loader yields them
    assert export_check(coco_gt, metas, CATEGORY_IDS, targets=targets)["AP"] == pytest.approx(1.0)


def test_wrong_letterbox_mapping_fails_the_check(coco_gt, metas):
    """Proves the check can fail: forgetting the pad on the way back, or a 3 px shift."""
    dets = gt_detections(coco_gt, metas, CATEGORY_IDS)
    no_pad = [{**m, "pad": (0, 0)} for m in metas]
    assert coco_evaluate(coco_gt, to_coco_results(dets, no_pad, CATEGORY_IDS))["AP"] < 0.9
    shifted = [Detections(d.boxes + torch.tensor([3.0, 3.0, 3.0, 3.0]), d.scores, d.labels) for d in dets]
    assert coco_evaluate(coco_gt, to_coco_results(shifted, metas, CATEGORY_IDS))["AP"] < 0.9
    # a loader whose forward letterbox disagrees with the metas fails export_check too
    targets = [{"boxes": d.boxes, "labels": d.labels} for d in shifted]
    assert export_check(coco_gt, metas, CATEGORY_IDS, targets=targets)["AP"] < 0.9
    recipe = preset("yolov3")
    priors = build_priors(get_layout(recipe.anchors), S)
    assert export_check(coco_gt, metas, CATEGORY_IDS, recipe, priors, targets=targets)["AP"] < 0.9


CODINGS = [  # (id, preset, coding it exercises)
    ("yolov3", "yolo, scale_xy 1"),
    ("yolov4", "yolo, per-level scale_xy"),
    ("scaled_yolov4", "scaled_yolo"),
    ("ssd", "delta, variances 0.1/0.2, softmax + background"),
    ("retinanet", "delta, variances 1, sigmoid without objectness"),
    ("yolov1", "yolov1, sqrt w/h, no anchor"),
    ("yolov2", "yolo, one level, softmax with objectness"),
]


@pytest.mark.parametrize("name", [n for n, _ in CODINGS])
def test_export_check_through_every_coding(coco_gt, metas, name):
    """Letterboxed GT -> encode on the recipe's assigned priors -> raw head output ->
    postprocess -> inverse letterbox -> COCOeval."""
    recipe = preset(name)
    priors = build_priors(get_layout(recipe.anchors), S)
    dets, unplaced = [], 0
    for m in metas:
        boxes, labels = letterboxed_gt(m["image_id"])
        o = oracle_prediction(boxes, labels, priors, recipe, len(CATEGORY_IDS))
        assert o.pred.shape == (1, priors.num, recipe.head_channels(len(CATEGORY_IDS)))
        unplaced += o.unplaced
        (d,) = postprocess(o.pred, priors, recipe)
        assert len(d.boxes) == len(labels)  # NMS folds each GT's positives into one box
        dets.append(d)
    res = coco_evaluate(coco_gt, to_coco_results(dets, metas, CATEGORY_IDS))
    assert unplaced == 0
    assert res["AP"] >= 0.99 and res["AP50"] >= 0.99, res
    # the library helper gives the same
    assert export_check(coco_gt, metas, CATEGORY_IDS, recipe, priors)["AP"] == pytest.approx(res["AP"])


def test_oracle_places_colliding_ground_truths():
    """Two GTs with the same best anchor in one cell: the second falls back to a free row."""
    recipe = preset("yolov3")
    priors = build_priors(get_layout(recipe.anchors), S)
    boxes = torch.tensor([[40.0, 40.0, 60.0, 60.0], [41.0, 41.0, 61.0, 59.0]])
    o = oracle_prediction(boxes, torch.tensor([0, 1]), priors, recipe, 2)
    (d,) = postprocess(o.pred, priors, recipe)
    assert o.unplaced == 0 and sorted(d.labels.tolist()) == [0, 1]


def test_oracle_on_a_cell_border_has_only_reachable_rows():
    """A GT centred exactly on a cell border gets the centre cell and the cell before the border
    (the cells of ultralytics' build_targets, which lists the centre cell twice), both reachable
    by 2 sigma - 0.5; no row on the far side, which would need an offset of -1."""
    recipe = preset("scaled_yolov4")
    priors = build_priors(get_layout(recipe.anchors), S)
    box = torch.tensor([[44.0, 44.0, 84.0, 76.0]])  # centre (64, 60): x on a border of every level
    o = oracle_prediction(box, torch.tensor([1]), priors, recipe, 2)
    assert o.unreachable == 0 and o.unplaced == 0
    (d,) = postprocess(o.pred, priors, recipe)
    assert len(d.boxes) == 1 and torch.allclose(d.boxes[0], box[0], atol=1e-3)


# --------------------------------------------------------------------------- scores
def test_scores_from_logits_per_head_type():
    g = torch.Generator().manual_seed(0)
    C = 3
    # objectness x sigmoid classes (YOLOv3)
    r = preset("yolov3")
    pred = torch.randn(2, 5, r.head_channels(C), generator=g)
    s = scores_from_logits(pred, r)
    assert s.shape == (2, 5, C)
    assert torch.allclose(s, torch.sigmoid(pred[..., 4:5]) * torch.sigmoid(pred[..., 5:]))
    # objectness x softmax classes (YOLOv1: sse; YOLOv3 with ce)
    for r in (preset("yolov1"), preset("yolov3").override(cls_loss="ce")):
        pred = torch.randn(2, 5, r.head_channels(C), generator=g)
        s = scores_from_logits(pred, r)
        assert torch.allclose(s, torch.sigmoid(pred[..., 4:5]) * torch.softmax(pred[..., 5:], -1))
        assert torch.allclose(s.sum(-1), torch.sigmoid(pred[..., 4]))  # objectness multiplies
    # softmax with background (SSD): background column dropped
    r = preset("ssd")
    pred = torch.randn(2, 5, r.head_channels(C), generator=g)
    assert pred.shape[-1] == 4 + C + 1
    s = scores_from_logits(pred, r)
    assert s.shape == (2, 5, C)
    assert torch.allclose(s, torch.softmax(pred[..., 4:], -1)[..., 1:])
    assert (s.sum(-1) < 1).all()
    pred[..., 4] = 20.0  # a confident background logit leaves no class confidence
    assert scores_from_logits(pred, r).max() < 1e-6
    # sigmoid without objectness (RetinaNet)
    r = preset("retinanet")
    pred = torch.randn(2, 5, r.head_channels(C), generator=g)
    assert torch.allclose(scores_from_logits(pred, r), torch.sigmoid(pred[..., 4:]))


# --------------------------------------------------------------------------- postprocess
def _raw(recipe, priors, entries, C=2):
    """A raw output with ``(row, box, class, logit)`` entries and every other score ~0."""
    coding = build_coding(recipe.coding, recipe.scale_xy, recipe.variances)
    pred = torch.full((1, priors.num, recipe.head_channels(C)), -20.0)
    pred[..., :4] = 0
    for row, box, cls, logit in entries:
        rows = torch.tensor([row])
        pred[0, row, :4] = coding.encode(torch.tensor([box], dtype=torch.float32), priors.rows(rows))[0]
        pred[0, row, 4 + cls] = logit
    return pred


def test_nms_removes_same_class_duplicate_keeps_other_class():
    r = preset("retinanet")
    priors = build_priors(get_layout(r.anchors), S)
    pred = _raw(r, priors, [
        (10, [20.0, 20.0, 60.0, 60.0], 0, 3.0),
        (11, [22.0, 22.0, 62.0, 62.0], 0, 2.0),  # IoU 0.82 with the first, same class: suppressed
        (12, [21.0, 21.0, 61.0, 61.0], 1, 1.0),  # overlaps, other class: kept
        (13, [90.0, 90.0, 110.0, 110.0], 0, 0.0),  # elsewhere: kept
    ])
    (d,) = postprocess(pred, priors, r)
    assert d.labels.dtype == torch.long
    assert torch.allclose(d.scores, torch.sigmoid(torch.tensor([3.0, 1.0, 0.0])), atol=1e-6)
    assert d.labels.tolist() == [0, 1, 0]
    assert torch.allclose(d.boxes[0], torch.tensor([20.0, 20.0, 60.0, 60.0]), atol=1e-4)
    assert torch.allclose(d.boxes[1], torch.tensor([21.0, 21.0, 61.0, 61.0]), atol=1e-4)
    # nms_iou above the duplicates' IoU keeps them all
    (d,) = postprocess(pred, priors, r, nms_iou=0.9)
    assert len(d.boxes) == 4


def test_postprocess_conf_thresh_max_det_topk_and_clipping():
    r = preset("yolov3")
    priors = build_priors(get_layout(r.anchors), S)
    coding = build_coding(r.coding, r.scale_xy, r.variances)
    rows = torch.arange(0, priors.num, 7)[:40]
    pred = torch.full((2, priors.num, r.head_channels(2)), -20.0)
    pred[..., :4] = 0
    pred[0, rows, 4] = 10.0  # objectness
    pred[0, rows, 5] = torch.linspace(-4, 4, len(rows))  # class 0 logits
    # the boxes as decoded, all distinct small anchors of separate cells: NMS keeps them
    (d,) = postprocess(pred[:1], priors, r, conf_thresh=0.001, max_det=1000)
    probs = torch.sigmoid(torch.tensor(10.0)) * torch.sigmoid(torch.linspace(-4, 4, len(rows)))
    assert len(d.scores) == int((probs > 0.001).sum())
    dets = postprocess(pred, priors, r, conf_thresh=0.5, max_det=1000)
    assert len(dets) == 2 and len(dets[1].boxes) == 0  # image 2 has no confident prior
    assert (dets[0].scores > 0.5).all() and len(dets[0].scores) == int((probs > 0.5).sum())
    (d5,) = postprocess(pred[:1], priors, r, max_det=5)
    assert len(d5.scores) == 5 and torch.allclose(d5.scores, probs.sort(descending=True).values[:5])
    (d1,) = postprocess(pred[:1], priors, r, pre_nms_topk=3)
    assert len(d1.scores) == 3
    # a box reaching out of the input is clipped to it
    pred2 = torch.full((1, priors.num, r.head_channels(2)), -20.0)
    pred2[0, 0, :4] = coding.encode(torch.tensor([[-10.0, -5.0, 12.0, 9.0]]), priors.rows(torch.tensor([0])))[0]
    pred2[0, 0, 4] = pred2[0, 0, 5] = 10.0
    (dc,) = postprocess(pred2, priors, r)
    assert torch.allclose(dc.boxes, torch.tensor([[0.0, 0.0, 12.0, 9.0]]), atol=1e-3)


# --------------------------------------------------------------------------- COCOeval
def test_empty_results_give_zeros_and_nan_only_without_gt(coco_gt):
    res = coco_evaluate(coco_gt, [])
    for k in COCO_METRICS:
        assert res[k] == 0.0, k
    assert res["per_class_AP"]["cat"] == 0.0 and math.isnan(res["per_class_AP"]["zebra"])
    # an image without detections contributes no results
    empty = [Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))]
    assert to_coco_results(empty, [letterbox_meta(1)], CATEGORY_IDS) == []


def test_undefined_area_range_is_nan_and_image_subset(coco_gt, metas):
    dets = gt_detections(coco_gt, metas[:1], CATEGORY_IDS)
    res = coco_evaluate(coco_gt, to_coco_results(dets, metas[:1], CATEGORY_IDS), image_ids=[1])
    assert res["AP"] == pytest.approx(1.0)
    assert math.isnan(res["APl"]) and math.isnan(res["ARl"])  # image 1 has no large object
    # over every image, the two unseen images count as misses
    full = coco_evaluate(coco_gt, to_coco_results(dets, metas[:1], CATEGORY_IDS), per_class=False)
    assert full["AP"] < 0.6 and full["per_class_AP"] == {}


def test_to_coco_results_maps_back_and_clips():
    meta = {"image_id": torch.tensor(2), "orig_size": torch.tensor([120, 60]), "scale": torch.tensor(128 / 120),
            "pad": torch.tensor([32, 0])}
    s = 128 / 120
    boxes = torch.tensor([[32 + 6 * s, 12 * s, 32 + 18 * s, 30 * s],  # inside
                          [10.0, -4.0, 40.0, 10.0]])  # left of the content and above it: clipped
    d = Detections(boxes, torch.tensor([0.9, 0.2]), torch.tensor([1, 0]))
    res = to_coco_results([d], [meta], CATEGORY_IDS)
    assert [r["image_id"] for r in res] == [2, 2] and [r["category_id"] for r in res] == [7, 3]
    assert res[0]["bbox"] == pytest.approx([6.0, 12.0, 12.0, 18.0], abs=1e-4)
    assert res[1]["bbox"] == pytest.approx([0.0, 0.0, 8 / s, 10 / s], abs=1e-4)
    assert res[0]["score"] == pytest.approx(0.9) and all(isinstance(v, float) for v in res[0]["bbox"])


def test_load_coco_gt_is_quiet(tmp_path, capsys):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    load_coco_gt(str(path))
    assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------- evaluate_model
class OracleModel(torch.nn.Module):
    """Returns the oracle head output of the image whose id is written in pixel (0, 0)."""

    def __init__(self, preds: dict[int, torch.Tensor]):
        super().__init__()
        self.preds = preds
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.saw_eval = []

    def forward(self, images):
        self.saw_eval.append(not self.training and torch.is_inference_mode_enabled())
        return torch.cat([self.preds[int(i)] for i in images[:, 0, 0, 0]], 0)


def test_evaluate_model_end_to_end(coco_gt, metas, capsys):
    recipe = preset("scaled_yolov4")
    priors = build_priors(get_layout(recipe.anchors), S)
    preds = {}
    for m in metas:
        boxes, labels = letterboxed_gt(m["image_id"])
        preds[m["image_id"]] = oracle_prediction(boxes, labels, priors, recipe, len(CATEGORY_IDS)).pred

    def loader():
        for batch in (metas[:2], metas[2:]):
            images = torch.zeros(len(batch), 3, S, S)
            images[:, 0, 0, 0] = torch.tensor([float(m["image_id"]) for m in batch])
            yield images, [{**m, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0)} for m in batch]

    model = OracleModel(preds).train()
    res = evaluate_model(model, loader(), priors, recipe, coco_gt, CATEGORY_IDS)
    assert all(model.saw_eval) and model.training  # eval + inference mode inside, mode restored after
    assert res["AP"] >= 0.99 and res["num_detections"] == sum(len(b) for b in BOXES.values())
    assert res["infer_ms_per_image"] > 0
    assert set(COCO_METRICS) <= set(res) and "per_class_AP" in res
    assert res["eval_backend"] == "faster_coco_eval"  # auto, with the package installed
    assert res["infer_images_per_second"] == pytest.approx(1000 / res["infer_ms_per_image"])
    assert 0 < res["cocoeval_seconds"] < res["eval_seconds"]
    assert res["eval_images_per_second"] == pytest.approx(len(metas) / res["eval_seconds"])
    ref = evaluate_model(model, loader(), priors, recipe, coco_gt, CATEGORY_IDS, backend="pycocotools")
    assert ref["eval_backend"] == "pycocotools"
    assert all(ref[k] == pytest.approx(res[k], abs=1e-4, nan_ok=True) for k in COCO_METRICS)
    assert capsys.readouterr().out == ""
