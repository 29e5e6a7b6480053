"""The export check on the synthetic validation set, through the real data loader.

Ground truth fed through the evaluation path as score-1 detections must give AP = 1.000;
through encode -> raw head output -> decode -> NMS -> inverse letterbox, AP >= 0.99 for
every coding. These catch coordinate and letterbox mistakes.
"""

import pytest

from ablate.data.coco import CocoDetection
from ablate.data.synth import generate_synthetic
from ablate.detect import build_priors, get_layout, preset
from ablate.evaluate import export_check, load_coco_gt


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic(root, num_train=1, num_val=40, image_size=160, seed=11)
    return CocoDetection(root / "annotations/instances_val.json", root / "val", image_size=128, train=False)


@pytest.fixture(scope="module")
def loaded(val_set):
    items = [val_set[i] for i in range(len(val_set))]
    targets = [t for _, t in items]
    return load_coco_gt(val_set.ann_file), targets


def test_ground_truth_as_detections_scores_ap_1(val_set, loaded):
    coco_gt, targets = loaded
    assert sum(len(t["boxes"]) for t in targets) > 50
    m = export_check(coco_gt, targets, val_set.category_ids, targets=targets)
    assert m["AP"] == pytest.approx(1.0, abs=1e-6)
    assert m["AP50"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name", ["yolov3", "yolov4", "scaled_yolov4", "ssd", "retinanet", "yolov1", "yolov2"])
def test_every_coding_round_trips_through_the_evaluation_path(name, val_set, loaded):
    coco_gt, targets = loaded
    recipe = preset(name)
    priors = build_priors(get_layout(recipe.anchors), 128)
    m = export_check(coco_gt, targets, val_set.category_ids, recipe=recipe, priors=priors, targets=targets)
    assert m["AP"] >= 0.99, (name, m["AP"], m["unplaced"], m["unreachable"])
