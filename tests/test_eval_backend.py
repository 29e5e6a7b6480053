"""The COCOeval backends agree (pycocotools, the reference, and faster-coco-eval), and batched
post-processing returns what the per-image loop returned.

Parity: the 12 numbers and per-class AP equal to 1e-4, NaN where the other is NaN, on the
synthetic validation set, on a hand-built set with crowd regions, empty images, a class
without ground truth and every area range, and with no detections at all.
"""

import json
import math
import sys

import pytest
import torch
from torchvision.ops import batched_nms

from ablate.bench_eval import (coco_from_dict, coco_like_gt, max_abs_difference, per_image_postprocess,
                               perturbed_detections)
from ablate.data.synth import generate_synthetic
from ablate.detect import build_priors, get_layout, preset
from ablate.detect.coding import build_coding
from ablate.detect.postprocess import grouped_nms, postprocess
from ablate.evaluate import COCO_METRICS, coco_evaluate, load_coco_gt, resolve_backend

BACKENDS = ("pycocotools", "faster_coco_eval")


def both(gt, results, **kw) -> tuple[dict, dict]:
    ref, fast = (coco_evaluate(gt, results, backend=b, **kw) for b in BACKENDS)
    assert (ref["eval_backend"], fast["eval_backend"]) == BACKENDS
    assert ref["cocoeval_seconds"] > 0 and fast["cocoeval_seconds"] > 0
    return ref, fast


def assert_same(ref: dict, fast: dict) -> None:
    for k in COCO_METRICS:
        a, b = ref[k], fast[k]
        assert math.isnan(a) == math.isnan(b) and (math.isnan(a) or abs(a - b) <= 1e-4), (k, a, b)
    assert ref["per_class_AP"].keys() == fast["per_class_AP"].keys()
    for c, a in ref["per_class_AP"].items():
        b = fast["per_class_AP"][c]
        assert math.isnan(a) == math.isnan(b) and (math.isnan(a) or abs(a - b) <= 1e-4), (c, a, b)
    assert max_abs_difference(ref, fast) <= 1e-4


# --------------------------------------------------------------------------- parity
@pytest.fixture(scope="module")
def synth_val(tmp_path_factory):
    info = generate_synthetic(tmp_path_factory.mktemp("synth") / "set", num_train=0, num_val=40, image_size=96, seed=3)
    ann = info.annotations("val")
    return load_coco_gt(str(ann)), json.loads(ann.read_text())


def test_backends_agree_on_the_synthetic_validation_set(synth_val):
    gt, dataset = synth_val
    results = perturbed_detections(dataset, dets=30, seed=1)
    ref, fast = both(gt, results)
    assert_same(ref, fast)
    assert 0.05 < ref["AP"] < 0.95 and 0 < ref["AP50"] < 1  # a real ranking, not all-or-nothing
    assert len(ref["per_class_AP"]) == 6
    # a subset of the images, as evaluate_model passes the ids it ran
    ids = sorted(gt.getImgIds())[::3]
    assert_same(*both(gt, [r for r in results if r["image_id"] in ids], image_ids=ids))


def _ann(i, img, cat, box, crowd=0, area=None):
    return {"id": i, "image_id": img, "category_id": cat, "bbox": box,
            "area": float(area if area is not None else box[2] * box[3]), "iscrowd": crowd}


@pytest.fixture(scope="module")
def crowd_set():
    """Six images: 1-2 with every area range and crowd regions, 3 empty without detections, 4 empty
    with false positives, 5 only small objects, 6 only a crowd region; category "c" has no ground truth."""
    sizes = {1: (320, 240), 2: (300, 300), 3: (200, 100), 4: (256, 256), 5: (128, 96), 6: (200, 200)}
    images = [{"id": i, "width": w, "height": h, "file_name": f"{i}.jpg"} for i, (w, h) in sizes.items()]
    anns = [
        _ann(1, 1, 1, [10, 10, 12, 14]),  # small
        _ann(2, 1, 1, [40, 40, 50, 60]),  # medium
        _ann(3, 1, 2, [100, 20, 150, 200]),  # large
        _ann(4, 1, 1, [200, 100, 110, 130], crowd=1),  # a crowd region of class a
        _ann(5, 1, 2, [60, 150, 40, 40], area=900.0),  # the segment's area, not the box's: medium by COCO's rule
        _ann(6, 2, 2, [10, 10, 100, 100]),
        _ann(7, 2, 2, [20, 20, 90, 90]),  # overlaps the previous one heavily
        _ann(8, 2, 2, [150, 150, 140, 140], crowd=1),
        _ann(9, 2, 1, [150, 10, 40, 30]),
        _ann(10, 5, 1, [5, 5, 10, 10]), _ann(11, 5, 2, [50, 50, 20, 8]),
        _ann(12, 6, 1, [0, 0, 200, 200], crowd=1),
    ]
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
    gt = coco_from_dict({"images": images, "annotations": anns, "categories": cats})

    def det(img, cat, box, score):
        return {"image_id": img, "category_id": cat, "bbox": box, "score": score}

    results = [
        det(1, 1, [11, 10, 12, 13], 0.9), det(1, 1, [42, 41, 48, 57], 0.8), det(1, 1, [41, 40, 50, 61], 0.8),  # tie
        det(1, 2, [105, 25, 140, 190], 0.7), det(1, 2, [100, 20, 150, 200], 0.3),
        det(1, 1, [210, 110, 40, 40], 0.95), det(1, 1, [250, 150, 30, 30], 0.6), det(1, 1, [205, 105, 100, 120], 0.5),
        det(1, 2, [62, 150, 36, 41], 0.65), det(1, 3, [0, 0, 30, 30], 0.85), det(1, 2, [300, 200, 15, 15], 0.8),
        det(2, 2, [12, 12, 96, 98], 0.9), det(2, 2, [22, 18, 88, 92], 0.9), det(2, 2, [15, 15, 95, 95], 0.4),
        det(2, 2, [160, 160, 60, 60], 0.99), det(2, 2, [200, 200, 80, 80], 0.2), det(2, 1, [150, 12, 38, 30], 0.35),
        det(2, 3, [150, 150, 100, 100], 0.5),
        det(4, 1, [10, 10, 50, 50], 0.9), det(4, 2, [100, 100, 20, 20], 0.45), det(4, 3, [0, 0, 256, 256], 0.7),
        det(5, 1, [6, 4, 9, 11], 0.55), det(5, 2, [48, 52, 24, 8], 0.25), det(5, 2, [0, 0, 128, 96], 0.6),
        det(6, 1, [10, 10, 50, 50], 0.8), det(6, 1, [100, 100, 90, 90], 0.7), det(6, 2, [20, 20, 30, 30], 0.4),
    ]
    return gt, results


def test_backends_agree_with_crowd_and_empty_images(crowd_set):
    gt, results = crowd_set
    ref, fast = both(gt, results)
    assert_same(ref, fast)
    assert 0 < ref["AP"] < 1 and 0 < ref["APs"] < 1 and 0 < ref["APl"] < 1
    assert math.isnan(ref["per_class_AP"]["c"]) and not math.isnan(ref["per_class_AP"]["a"])
    # the images without small objects: APs and ARs are undefined (NaN) in both
    sub = both(gt, [r for r in results if r["image_id"] in (2, 3, 4, 6)], image_ids=[2, 3, 4, 6])
    assert math.isnan(sub[0]["APs"]) and math.isnan(sub[0]["ARs"])
    assert_same(*sub)
    # only the empty image with false positives and the crowd-only image: nothing is defined
    none = both(gt, [r for r in results if r["image_id"] in (4, 6)], image_ids=[4, 6])
    assert all(math.isnan(none[0][k]) for k in COCO_METRICS)
    assert_same(*none)


def test_backends_agree_without_detections(crowd_set, synth_val):
    for gt in (crowd_set[0], synth_val[0]):
        ref, fast = both(gt, [])
        assert_same(ref, fast)
        assert ref["AP"] == 0 and ref["AR100"] == 0


def test_backends_agree_on_a_coco_like_set():
    dataset = coco_like_gt(60, classes=10, seed=2)
    gt = coco_from_dict(dataset)
    assert any(a["iscrowd"] for a in dataset["annotations"])
    ref, fast = both(gt, perturbed_detections(dataset, dets=40, seed=2))
    assert_same(ref, fast)
    assert 0 < ref["APs"] < 1 and 0 < ref["APm"] < 1 and 0 < ref["APl"] < 1


def test_pycocotools_without_faster_coco_eval_and_auto_falls_back(crowd_set, monkeypatch):
    gt, results = crowd_set
    assert resolve_backend("auto") == "faster_coco_eval"  # a dependency: installed
    with_fast = coco_evaluate(gt, results)
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # `import faster_coco_eval` now fails
    assert resolve_backend("auto") == "pycocotools"
    forced = coco_evaluate(gt, results, backend="pycocotools")
    auto = coco_evaluate(gt, results)
    assert forced["eval_backend"] == auto["eval_backend"] == "pycocotools"
    assert_same(forced, with_fast)
    with pytest.raises(ImportError, match="faster-coco-eval"):
        coco_evaluate(gt, results, backend="faster_coco_eval")
    with pytest.raises(ValueError, match="choose one of auto, pycocotools, faster_coco_eval"):
        resolve_backend("detectron2")


# --------------------------------------------------------------------------- batched NMS
def assert_same_detections(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.labels.tolist() == w.labels.tolist(), i
        assert torch.equal(g.scores, w.scores), i
        assert torch.allclose(g.boxes, w.boxes, rtol=0, atol=1e-4), i


@pytest.mark.parametrize("name", ["yolov3", "ssd", "retinanet"])
def test_batched_postprocess_matches_the_per_image_loop(name):
    r = preset(name)
    S, C, B = 128, 6, 4
    priors = build_priors(get_layout(r.anchors), S)
    g = torch.Generator().manual_seed(7)
    pred = torch.randn(B, priors.num, r.head_channels(C), generator=g)
    pred[..., 4:] = pred[..., 4:] * 2.0 - 2.0
    pred[2, :, 4:] = -30.0  # an image without any candidate
    if r.background_class:
        pred[2, :, 4] = 30.0
    for kw in ({}, {"pre_nms_topk": 200, "max_det": 30},  # top-k binds in every image
               {"conf_thresh": 0.3, "max_det": 10},  # a few candidates: no top-k
               {"conf_thresh": 0.3, "nms_iou": 0.3, "pre_nms_topk": 50}):  # top-k binds in some images only
        got = postprocess(pred, priors, r, **kw)
        assert_same_detections(got, per_image_postprocess(pred, priors, r, **kw))
        assert len(got[2].boxes) == 0 and sum(len(d.boxes) for d in got) > 0
    assert postprocess(pred[:0], priors, r) == []


def test_batched_nms_is_exact_for_any_image_of_the_batch():
    """Two same-class boxes with IoU 0.5998 in the last image of a 32-image batch: NMS at 0.6 keeps
    both, with either strategy. The coordinate trick over B * C groups offsets that image's class-79
    boxes by 2559 x 128 px, where float32 has 1/32 px: the pair would round to IoU 0.6, which float32
    stores as 0.60000002, and one would be suppressed."""
    r = preset("yolov3")
    S, C, B = 128, 80, 32
    priors = build_priors(get_layout(r.anchors), S)
    coding = build_coding(r.coding, r.scale_xy, r.variances)
    pred = torch.full((B, priors.num, r.head_channels(C)), -30.0)
    pred[..., :4] = 0
    boxes = torch.tensor([[10.0, 10.0, 16.0, 16.0], [11.501, 10.0, 17.501, 16.0], [100.0, 100.0, 127.0, 127.0]])
    dist = (((priors.boxes[:, :2] + priors.boxes[:, 2:]) - (boxes[:, None, :2] + boxes[:, None, 2:])) / 2).abs().sum(-1)
    dist[1, dist[0].argmin()] = float("inf")  # two rows for the two close boxes: nearby priors
    rows = dist.argmin(1)  # [3]
    pred[B - 1, rows, :4] = coding.encode(boxes, priors.rows(rows))
    assert torch.allclose(coding.decode(pred[B - 1, rows, :4], priors.rows(rows)), boxes, atol=1e-4)
    pred[B - 1, rows, 4] = 10.0
    for row, cls, logit in zip(rows.tolist(), (79, 79, 0), (5.0, 4.0, 3.0)):
        pred[B - 1, row, 5 + cls] = logit
    got = postprocess(pred, priors, r, nms_iou=0.6)
    assert got[B - 1].labels.tolist() == [79, 79, 0]
    assert_same_detections(got, per_image_postprocess(pred, priors, r, nms_iou=0.6))
    groups = torch.tensor([(B - 1) * C + 79, (B - 1) * C + 79, (B - 1) * C])
    for per_group in (True, False):
        keep = grouped_nms(boxes, torch.tensor([0.9, 0.8, 0.7]), groups, 0.6, per_group=per_group)
        assert keep.tolist() == [0, 1, 2], per_group
        keep = grouped_nms(boxes, torch.tensor([0.9, 0.8, 0.7]), groups, 0.59, per_group=per_group)
        assert keep.tolist() == [0, 2], per_group


def test_grouped_nms_strategies_agree():
    g = torch.Generator().manual_seed(3)
    M = 3000
    xy = torch.rand(M, 2, generator=g) * 600
    boxes = torch.cat((xy, xy + 5 + torch.rand(M, 2, generator=g) * 100), 1)
    scores = torch.rand(M, generator=g)
    groups = torch.randint(0, 40, (M,), generator=g) * 31  # ids up to 1209, as for 16 images of 80 classes
    a = grouped_nms(boxes, scores, groups, 0.5, per_group=True)
    b = grouped_nms(boxes, scores, groups, 0.5, per_group=False)
    assert torch.equal(a, b) and 0 < len(a) < M
    assert torch.equal(a, batched_nms(boxes, scores, groups, 0.5))  # torchvision's own loop over groups
    empty = grouped_nms(boxes[:0], scores[:0], groups[:0], 0.5)
    assert empty.dtype == torch.long and empty.numel() == 0


# --------------------------------------------------------------------------- benchmark command
def test_bench_eval_command_prints_figures_ratio_and_agreement(tmp_path):
    from typer.testing import CliRunner

    from ablate.cli import app

    out = CliRunner().invoke(app, ["bench", "eval", "--images", "30", "--repeats", "1", "--postprocess-batch", "0",
                                   "--json", str(tmp_path / "b.json")])
    assert out.exit_code == 0, out.output
    assert "pycocotools" in out.output and "faster_coco_eval" in out.output and "agree to 1e-4" in out.output
    d = json.loads((tmp_path / "b.json").read_text())
    assert d["images"] == 30 and d["detections"] == 3000 and d["max_abs_diff"] <= 1e-4
    assert d["speedup"] == pytest.approx(d["median_s"]["pycocotools"] / d["median_s"]["faster_coco_eval"])
    bad = CliRunner().invoke(app, ["bench", "eval", "--repeats", "0"])
    assert bad.exit_code == 2 and "--repeats: must be >= 1, got 0" in bad.output
