"""Tests of ``ablate.data``: the synthetic generator, the COCO dataset and the transforms."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.ops import box_iou
from typer.testing import CliRunner

import ablate.data.coco as coco_module
import ablate.data.synth as synth_module
from ablate.data import (
    AugmentConfig,
    CocoDetection,
    DatasetError,
    DetectionTransform,
    boxes_to_original,
    collate,
    fingerprint,
    generate_synthetic,
    letterbox_geometry,
)
from ablate.data.synth import (
    CATEGORIES,
    MIN_VISIBLE,
    SHAPES,
    _shape_mask,
    render_image,
    synth_command,
)
from torchvision.transforms.v2 import functional as F

from ablate.data.transforms import PAD_VALUE, batch_input

# -- synthetic set ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """100 + 10 images at 160 px, seed 0."""
    return generate_synthetic(tmp_path_factory.mktemp("synth") / "set", num_train=100, num_val=10, seed=0)


@pytest.fixture(scope="module")
def train_json(synth):
    return json.loads(synth.annotations("train").read_text())


def _pixels(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


def test_synth_layout_and_coco_format(synth, train_json):
    root = synth.root
    assert (root / "synth.json").is_file()
    assert len(list((root / "train").glob("*.png"))) == 100 and len(list((root / "val").glob("*.png"))) == 10
    assert set(train_json) >= {"images", "annotations", "categories"}
    assert train_json["images"][0] == {"id": 1, "file_name": "000000.png", "width": 160, "height": 160}
    ann = train_json["annotations"][0]
    assert set(ann) >= {"id", "image_id", "category_id", "bbox", "area", "iscrowd"} and ann["iscrowd"] == 0
    cats = train_json["categories"]
    assert [c["id"] for c in cats] == list(range(1, len(cats) + 1))  # COCO-style, from 1
    assert len({c["name"] for c in cats}) == len(cats) >= 5
    assert np.asarray(Image.open(root / "train" / "000000.png")).shape == (160, 160, 3)


def test_synth_is_deterministic_by_seed(tmp_path):
    a = generate_synthetic(tmp_path / "a", num_train=5, num_val=2, image_size=64, seed=3)
    b = generate_synthetic(tmp_path / "b", num_train=5, num_val=2, image_size=64, seed=3)
    c = generate_synthetic(tmp_path / "c", num_train=5, num_val=2, image_size=64, seed=4)
    for split in ("train", "val"):
        assert a.annotations(split).read_bytes() == b.annotations(split).read_bytes()
        for pa, pb in zip(_pixels(a.images(split)), _pixels(b.images(split)), strict=True):
            np.testing.assert_array_equal(pa, pb)
    assert a.annotations("train").read_bytes() != c.annotations("train").read_bytes()
    assert all(np.any(pa != pc) for pa, pc in zip(_pixels(a.images("train")), _pixels(c.images("train"))))


def test_synth_statistics(train_json):
    per_image = np.bincount([a["image_id"] for a in train_json["annotations"]], minlength=101)[1:]
    assert per_image.max() <= 8
    assert (per_image == 0).sum() >= 1 and (per_image >= 5).sum() >= 10
    boxes = np.array([a["bbox"] for a in train_json["annotations"]])  # [N, 4] xywh
    w, h = boxes[:, 2], boxes[:, 3]
    assert np.all(w > 0) and np.all(h > 0)
    assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 0] + w <= 160) and np.all(boxes[:, 1] + h <= 160)
    np.testing.assert_allclose([a["area"] for a in train_json["annotations"]], w * h)
    area = w * h
    for name, fraction in (("small", (area < 32**2).mean()), ("medium", ((area >= 32**2) & (area < 96**2)).mean()),
                           ("large", (area >= 96**2).mean())):
        assert fraction >= 0.05, name
    assert np.sqrt(area).min() <= 10 and np.sqrt(area).max() >= 100
    aspect = w / h
    assert aspect.min() < 0.5 and aspect.max() > 2.0
    labels = np.array([a["category_id"] for a in train_json["annotations"]])
    assert set(labels.tolist()) == set(range(1, len(CATEGORIES) + 1))


def test_synth_has_overlapping_objects(train_json):
    by_image: dict[int, list[list[float]]] = {}
    for a in train_json["annotations"]:
        x, y, w, h = a["bbox"]
        by_image.setdefault(a["image_id"], []).append([x, y, x + w, y + h])
    overlapping = 0
    for boxes in by_image.values():
        iou = box_iou(torch.tensor(boxes), torch.tensor(boxes)).triu(diagonal=1)
        overlapping += int((iou > 0.1).sum())
    assert overlapping >= 10


def test_synth_boxes_are_tight_around_visible_pixels():
    """Boxes equal the extents of each object's visible pixels, every object keeps >= MIN_VISIBLE of them."""
    objects = occluded = 0
    for i in range(30):
        r = render_image(np.random.default_rng([0, 0, i]), 160)
        for k, (x1, y1, x2, y2) in enumerate(r.boxes.tolist()):
            mine = r.owner == k
            rows, cols = np.flatnonzero(mine.any(axis=1)), np.flatnonzero(mine.any(axis=0))
            assert (x1, y1, x2, y2) == (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
            # each border row / column of the box holds object pixels, none lie outside it
            assert mine[y1, x1:x2].any() and mine[y2 - 1, x1:x2].any()
            assert mine[y1:y2, x1].any() and mine[y1:y2, x2 - 1].any()
            assert mine.sum() == mine[y1:y2, x1:x2].sum()
            assert mine.sum() >= MIN_VISIBLE * r.full_areas[k] - 1e-9
            objects += 1
            occluded += int(mine.sum() < r.full_areas[k])
    assert objects > 50 and occluded >= 5


def test_synth_files_match_the_renderer(synth, train_json):
    for i in (0, 7):
        r = render_image(np.random.default_rng([0, 0, i]), 160)
        np.testing.assert_array_equal(np.asarray(Image.open(synth.images("train") / f"{i:06d}.png")), r.image)
        anns = [a for a in train_json["annotations"] if a["image_id"] == i + 1]
        assert [a["category_id"] - 1 for a in anns] == r.labels.tolist()
        assert [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)] == r.boxes.tolist()


def test_synth_classes_differ_by_shape_not_colour():
    masks = [_shape_mask(label, 10.0, 10.0, 40.0, 40.0, 64)[2] for label in range(len(SHAPES))]
    for a in range(len(masks)):
        for b in range(a + 1, len(masks)):
            union = (masks[a] | masks[b]).sum()
            assert (masks[a] & masks[b]).sum() / union < 0.9, (CATEGORIES[a], CATEGORIES[b])
    colours: dict[int, list[np.ndarray]] = {}
    for i in range(40):
        r = render_image(np.random.default_rng([1, 0, i]), 160)
        for k, label in enumerate(r.labels.tolist()):
            colours.setdefault(label, []).append(r.image[r.owner == k].mean(axis=0) / 255)
    for label, cs in colours.items():
        assert np.stack(cs).std(axis=0).min() > 0.15, CATEGORIES[label]  # colours spread, per class


def test_synth_progress_reports_every_tenth(tmp_path):
    lines: list[str] = []
    generate_synthetic(tmp_path / "p", num_train=16, num_val=4, image_size=64, progress=lines.append)
    assert len(lines) == 10 and lines[-1].startswith("synth: 20/20")


def test_synth_reuses_an_identical_set_and_refuses_others(tmp_path):
    out = tmp_path / "s"
    first = generate_synthetic(out, num_train=3, num_val=1, image_size=64, seed=1)
    before = first.annotations("train").stat().st_mtime_ns
    again = generate_synthetic(out, num_train=3, num_val=1, image_size=64, seed=1)
    assert first.generated and not again.generated and again.stats == first.stats
    assert first.annotations("train").stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="other parameters: seed 1 \\(asked 2\\)"):
        generate_synthetic(out, num_train=3, num_val=1, image_size=64, seed=2)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty and holds no synthetic set"):
        generate_synthetic(tmp_path / "other", num_train=3, num_val=1, image_size=64)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


@pytest.fixture()
def cli():
    app = typer.Typer()
    app.command()(synth_command)
    return lambda *args: CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize(("args", "option"), [(("--size", 32), "--size"), (("--train", -1), "--train"),
                                               (("--val", -2), "--val")])
def test_synth_command_rejects_bad_values(cli, tmp_path, args, option):
    result = cli("--out", tmp_path / "x", *args)
    assert result.exit_code == 2 and option in result.output
    assert not (tmp_path / "x").exists()


def test_synth_command_generates_skips_and_refuses(cli, tmp_path):
    out = tmp_path / "s"
    first = cli("--out", out, "--train", 3, "--val", 1, "--size", 64)
    assert first.exit_code == 0, first.output
    assert (out / "annotations" / "instances_val.json").is_file()
    second = cli("--out", out, "--train", 3, "--val", 1, "--size", 64)
    assert second.exit_code == 0 and "already holds" in second.output
    third = cli("--out", out, "--train", 4, "--val", 1, "--size", 64)
    assert third.exit_code == 2 and "--out" in third.output and "num_train 3 (asked 4)" in third.output


# -- the easy variant ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def easy(tmp_path_factory):
    """60 + 5 images of the easy variant at 160 px, seed 0."""
    return generate_synthetic(tmp_path_factory.mktemp("easy") / "set", num_train=60, num_val=5, seed=0, variant="easy")


def test_synth_easy_variant_has_few_large_disjoint_objects(easy):
    data = json.loads(easy.annotations("train").read_text())
    per_image: dict[int, list[list[float]]] = {im["id"]: [] for im in data["images"]}
    for a in data["annotations"]:
        per_image[a["image_id"]].append(a["bbox"])
    counts = [len(b) for b in per_image.values()]
    assert min(counts) >= 1 and max(counts) <= 3 and len(set(counts)) >= 2  # 1-3 objects, not all the same
    for boxes in per_image.values():
        xywh = np.asarray(boxes)  # [G, 4]
        side = np.sqrt(xywh[:, 2] * xywh[:, 3])
        # nothing is occluded, so a box is its shape's full box (up to the pixel grid)
        assert np.all(side >= 0.3 * 160 - 2) and np.all(side <= 0.55 * 160 + 2)
        assert np.all(np.maximum(xywh[:, 2] / xywh[:, 3], xywh[:, 3] / xywh[:, 2]) <= 2.0 * 1.1)
        xyxy = torch.as_tensor(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1))
        iou = box_iou(xyxy, xyxy).fill_diagonal_(0)
        assert float(iou.max()) == 0.0  # no two boxes overlap
        cells = {(int((x + w / 2) // 32), int((y + h / 2) // 32)) for x, y, w, h in boxes}
        assert len(cells) == len(boxes)  # one object per cell of a 5 x 5 (stride-32) grid
    record = json.loads((easy.root / "synth.json").read_text())
    assert record["params"]["variant"] == "easy"


def test_synth_variant_is_part_of_the_set_identity(tmp_path):
    out = tmp_path / "s"
    generate_synthetic(out, num_train=2, num_val=1, image_size=64, seed=1, variant="easy")
    with pytest.raises(FileExistsError, match="other parameters: variant easy \\(asked standard\\)"):
        generate_synthetic(out, num_train=2, num_val=1, image_size=64, seed=1)
    std = generate_synthetic(tmp_path / "std", num_train=2, num_val=1, image_size=64, seed=1)
    # a standard set records no variant, so sets generated before variants existed are still reused
    assert "variant" not in json.loads((std.root / "synth.json").read_text())["params"]
    with pytest.raises(FileExistsError, match="other parameters: variant standard \\(asked easy\\)"):
        generate_synthetic(std.root, num_train=2, num_val=1, image_size=64, seed=1, variant="easy")
    a = render_image(np.random.default_rng([1, 0, 0]), 64, "easy")
    b = render_image(np.random.default_rng([1, 0, 0]), 64)
    assert not np.array_equal(a.image, b.image)
    with pytest.raises(ValueError, match="unknown synthetic variant 'hard'; choose one of standard, easy"):
        generate_synthetic(tmp_path / "h", num_train=2, num_val=1, image_size=64, variant="hard")
    assert not (tmp_path / "h").exists()


def test_synth_command_variant(cli, tmp_path):
    ok = cli("--out", tmp_path / "e", "--train", 2, "--val", 1, "--size", 64, "--variant", "easy")
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "e" / "synth.json").read_text())["params"]["variant"] == "easy"
    bad = cli("--out", tmp_path / "x", "--train", 2, "--val", 1, "--size", 64, "--variant", "hard")
    assert bad.exit_code == 2 and "--variant" in bad.output and "hard" in bad.output
    assert not (tmp_path / "x").exists()


# -- COCO dataset ----------------------------------------------------------------------------------


def _coco_dict() -> dict:
    """Three images: 80x50 (landscape), 40x64 (portrait), 32x32 (no objects); category ids 1, 3, 7."""
    return {
        "images": [
            {"id": 11, "file_name": "a.png", "width": 80, "height": 50},
            {"id": 12, "file_name": "b.png", "width": 40, "height": 64},
            {"id": 13, "file_name": "c.png", "width": 32, "height": 32},
        ],
        "annotations": [
            {"id": 1, "image_id": 11, "category_id": 3, "bbox": [10, 5, 30, 20], "area": 600, "iscrowd": 0},
            {"id": 2, "image_id": 11, "category_id": 1, "bbox": [40, 10, 20, 20], "area": 400, "iscrowd": 1},
            {"id": 3, "image_id": 11, "category_id": 7, "bbox": [60.5, 30.25, 20, 20.5], "area": 410},  # 0.5 px out
            {"id": 4, "image_id": 12, "category_id": 7, "bbox": [5.5, 10, 12, 30], "area": 360, "iscrowd": 0},
        ],
        "categories": [{"id": 7, "name": "seven"}, {"id": 1, "name": "one"}, {"id": 3, "name": "three"}],
    }


#: The non-crowd boxes of ``_coco_dict`` as xyxy, clipped to the image, per image id.
EXPECTED_XYXY = {11: [[10, 5, 40, 25], [60.5, 30.25, 80, 50]], 12: [[5.5, 10, 17.5, 40]], 13: []}


def _write_set(root: Path, data: dict) -> tuple[Path, Path]:
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for img in data["images"]:
        pixels = rng.integers(0, 256, (img["height"], img["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / img["file_name"])
    ann = root / "instances.json"
    ann.write_text(json.dumps(data))
    return ann, images


@pytest.fixture()
def small_set(tmp_path):
    return _write_set(tmp_path, _coco_dict())


def test_dataset_attributes_and_sample(small_set):
    ds = CocoDetection(*small_set, image_size=96, train=False)
    assert len(ds) == 3 and ds.image_ids == [11, 12, 13]
    assert ds.category_ids == [1, 3, 7] and ds.category_names == ["one", "three", "seven"] and ds.num_classes == 3
    image, target = ds[0]
    assert image.shape == (3, 96, 96) and image.dtype == torch.uint8  # to_input makes floats on the device
    assert target["boxes"].shape == (2, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].dtype == torch.long and target["labels"].tolist() == [1, 2]  # ids 3, 7
    assert target["image_id"] == 11 and target["orig_size"] == (50, 80)
    # 80x50 -> 96x60, centred: 18 grey rows above and below
    assert target["scale"] == pytest.approx(1.2) and target["pad"] == (0, 18)
    assert torch.all(image[:, :18] == PAD_VALUE) and torch.all(image[:, 78:] == PAD_VALUE)
    assert image[:, 18:78].float().std() > 25
    _, portrait = ds[1]
    assert portrait["scale"] == pytest.approx(1.5) and portrait["pad"] == (18, 0)
    _, empty = ds[2]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def test_dataset_boxes_round_trip_to_the_annotations(small_set):
    ds = CocoDetection(*small_set, image_size=96, train=False)
    for i in range(len(ds)):
        _, t = ds[i]
        boxes = t["boxes"]
        assert torch.all(boxes >= 0) and torch.all(boxes <= 96)
        left, top = t["pad"]
        back = (boxes - torch.tensor([left, top, left, top])) / t["scale"]
        expected = torch.tensor(EXPECTED_XYXY[t["image_id"]], dtype=torch.float32).reshape(-1, 4)
        torch.testing.assert_close(back, expected, atol=1e-3, rtol=0)
        torch.testing.assert_close(boxes_to_original(boxes, t["scale"], t["pad"], t["orig_size"]), expected,
                                   atol=1e-3, rtol=0)


def test_box_sizes_are_in_network_input_pixels(small_set):
    ds = CocoDetection(*small_set, image_size=96, train=True)  # augmentation does not enter
    # image 11 (80x50, scale 1.2): 30x20 and the clipped 19.5x19.75; image 12 (40x64, scale 1.5): 12x30; no crowd box
    want = torch.tensor([[30.0, 20.0], [19.5, 19.75]]) * 1.2
    torch.testing.assert_close(ds.box_sizes(), torch.cat((want, torch.tensor([[12.0, 30.0]]) * 1.5)))


def test_anchor_fit_needs_as_many_boxes_as_anchors(small_set):
    from ablate.detect import preset
    from ablate.train import build_layout

    ds = CocoDetection(*small_set, image_size=96, train=True)
    with pytest.raises(DatasetError, match=r"instances.json: 3 training boxes, fewer than the 9 anchors") as e:
        build_layout(preset("yolov3"), ds)
    assert "\n" not in str(e.value)
    assert build_layout(preset("yolov3").override(anchor_fit="none"), ds).name == "yolov3"
    assert build_layout(preset("yolov3").override(anchors="yolov1", assigner="yolov1", anchor_fit="none"), ds).anchor_free


def test_dataset_ignores_crowd_annotations(small_set):
    ds = CocoDetection(*small_set, image_size=96, train=False)
    _, t = ds[0]
    crowd = torch.tensor([[40.0, 10.0, 60.0, 30.0]]) * t["scale"] + torch.tensor([0.0, 18.0, 0.0, 18.0])
    assert len(t["boxes"]) == 2 and not torch.isclose(t["boxes"], crowd).all(dim=1).any()
    assert 0 not in t["labels"].tolist()  # category 1 only had the crowd box


@pytest.mark.parametrize(("cache", "decodes"), [("memory", 3), ("none", 6)])
def test_dataset_cache_avoids_decoding_twice(small_set, monkeypatch, cache, decodes):
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    real = coco_module.decode_image
    monkeypatch.setattr(coco_module, "decode_image", counting)
    ds = CocoDetection(*small_set, image_size=64, train=True, cache=cache)
    for _ in range(2):
        for i in range(len(ds)):
            ds[i]
    assert len(calls) == decodes


def test_collate_and_dataloader(small_set):
    ds = CocoDetection(*small_set, image_size=64, train=True)
    images, targets = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate)))
    assert images.shape == (3, 3, 64, 64) and images.dtype == torch.uint8
    assert isinstance(targets, list) and [t["image_id"] for t in targets] == [11, 12, 13]
    assert [len(t["boxes"]) for t in targets] == [2, 1, 0]


def test_dataset_on_the_synthetic_set(synth, train_json):
    ds = CocoDetection(synth.annotations("train"), synth.images("train"), image_size=160, train=False)
    assert len(ds) == 100 and ds.category_names == list(CATEGORIES)
    _, t = ds[0]
    anns = [a for a in train_json["annotations"] if a["image_id"] == t["image_id"]]
    expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4)
    assert t["scale"] == 1.0 and t["pad"] == (0, 0)
    torch.testing.assert_close(t["boxes"], expected.float())


def test_fingerprint_is_stable_and_content_sensitive(small_set, tmp_path):
    ann, images = small_set
    first = fingerprint(ann, images)
    assert first == fingerprint(ann, images) and len(first) == 64
    copy_ann, copy_images = _write_set(tmp_path / "copy", _coco_dict())  # same bytes elsewhere
    assert fingerprint(copy_ann, copy_images) == first
    (copy_images / "extra.png").write_bytes(b"x")
    assert fingerprint(copy_ann, copy_images) != first
    data = _coco_dict()
    data["annotations"][0]["bbox"] = [11, 5, 30, 20]
    ann.write_text(json.dumps(data))
    assert fingerprint(ann, images) != first


# -- bad input: one line, naming the file, image or annotation -----------------------------------


def _mutated(mutate) -> dict:
    data = _coco_dict()
    mutate(data)
    return data


BAD_SETS = {
    "non-positive box": (lambda d: d["annotations"][0].update(bbox=[10, 5, 0, 20]),
                         ["annotation id 1", "a.png", "non-positive box size w=0"]),
    "negative height": (lambda d: d["annotations"][3].update(bbox=[5, 10, 12, -3]),
                        ["annotation id 4", "b.png", "non-positive box size"]),
    "box outside": (lambda d: d["annotations"][0].update(bbox=[70, 5, 12, 20]),
                    ["annotation id 1", "a.png", "outside the 80x50 image"]),
    "box left of image": (lambda d: d["annotations"][3].update(bbox=[-2, 10, 12, 30]),
                          ["annotation id 4", "outside the 40x64 image"]),
    "unknown category": (lambda d: d["annotations"][1].update(category_id=99),
                         ["annotation id 2", "unknown category id 99"]),
    "category id not an integer": (lambda d: d["annotations"][0].update(category_id=[3]),
                                   ["annotation id 1", "unknown category id [3]"]),
    "unknown image": (lambda d: d["annotations"][1].update(image_id=5),
                      ["annotation id 2", "unknown image id 5"]),
    "missing key": (lambda d: d.pop("categories"), ["instances.json", "missing key 'categories'"]),
    "annotation missing bbox": (lambda d: d["annotations"][2].pop("bbox"), ["annotation id 3", "missing key 'bbox'"]),
    "bad bbox": (lambda d: d["annotations"][2].update(bbox=[1, 2, 3]), ["annotation id 3", "4 finite numbers"]),
    "duplicate image id": (lambda d: d["images"][1].update(id=11), ["duplicate image id 11"]),
}


@pytest.mark.parametrize("case", list(BAD_SETS))
def test_bad_annotations_raise_one_line(tmp_path, case):
    mutate, needles = BAD_SETS[case]
    ann, images = _write_set(tmp_path, _mutated(mutate))
    with pytest.raises(DatasetError) as info:
        CocoDetection(ann, images, image_size=64, train=False)
    message = str(info.value)
    assert "\n" not in message and str(ann) in message
    for needle in needles:
        assert needle in message


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DatasetError, match=r"nope\.json: annotation file not found$"):
        CocoDetection(tmp_path / "nope.json", tmp_path, image_size=64, train=False)


def test_invalid_json(small_set):
    ann, images = small_set
    ann.write_text('{"images": [')
    with pytest.raises(DatasetError) as info:
        CocoDetection(ann, images, image_size=64, train=False)
    assert "\n" not in str(info.value) and str(ann) in str(info.value) and "invalid JSON" in str(info.value)


def test_missing_image_file(small_set):
    ann, images = small_set
    (images / "b.png").unlink()
    with pytest.raises(DatasetError) as info:
        CocoDetection(ann, images, image_size=64, train=False)
    assert str(info.value) == f"{images / 'b.png'}: image file not found (image id 12)"


def test_corrupt_image_raises_on_first_decode(small_set):
    ann, images = small_set
    (images / "b.png").write_bytes(b"this is not a png at all")
    ds = CocoDetection(ann, images, image_size=64, train=False)  # existence only at load
    ds[0]
    with pytest.raises(DatasetError) as info:
        ds[1]
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{images / 'b.png'}: cannot decode image")


def test_image_size_mismatch(small_set):
    ann, images = small_set
    Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(images / "c.png")
    ds = CocoDetection(ann, images, image_size=64, train=False)
    with pytest.raises(DatasetError, match=r"c\.png: image is 10x10 pixels but instances\.json says 32x32"):
        ds[2]


# -- transforms ------------------------------------------------------------------------------------


def test_letterbox_geometry():
    assert letterbox_geometry(50, 80, 96) == (1.2, 0, 18, 60, 96)
    assert letterbox_geometry(64, 40, 96) == (1.5, 18, 0, 96, 60)
    assert letterbox_geometry(480, 640, 160) == (0.25, 0, 20, 120, 160)
    assert letterbox_geometry(160, 160, 160) == (1.0, 0, 0, 160, 160)


def _white_rectangle(height: int, width: int, box: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A black image with a white rectangle filling ``box`` (xyxy)."""
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    x1, y1, x2, y2 = box
    image[:, y1:y2, x1:x2] = 255
    return image, torch.tensor([box], dtype=torch.float32)


def _extent(image: torch.Tensor) -> list[int]:
    """xyxy extent of the pixels brighter than 0.75 (of 255)."""
    mask = image.float().mean(0) > 0.75 * 255
    rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


@pytest.mark.parametrize(("height", "width", "size"), [(50, 80, 160), (64, 40, 128), (100, 100, 100)])
def test_letterbox_keeps_boxes_on_the_object(height, width, size):
    image, boxes = _white_rectangle(height, width, [10, 20, 30, 35])
    out, moved, box, jitter = DetectionTransform(size)(image, boxes)
    assert jitter is None
    assert out.shape == (3, size, size)
    assert _extent(out) == pytest.approx(moved[0].tolist(), abs=1.0)
    expected = torch.tensor([[10.0, 20.0, 30.0, 35.0]]) * box.scale + torch.tensor([box.left, box.top] * 2)
    torch.testing.assert_close(moved, expected)


def test_hflip_moves_boxes_with_the_image():
    image, boxes = _white_rectangle(50, 80, [10, 20, 30, 35])
    flip = DetectionTransform(160, AugmentConfig(hflip=1.0, jitter=0.0, hue=0.0))
    out, moved, box, _ = flip(image, boxes)
    # flipped in the original frame: x -> 80 - x, then letterboxed (scale 2, pad top 30)
    torch.testing.assert_close(moved, torch.tensor([[100.0, 70.0, 140.0, 100.0]]))
    assert (box.scale, box.left, box.top) == (2.0, 0, 30)
    assert _extent(out) == pytest.approx(moved[0].tolist(), abs=1.0)
    plain, _, _, _ = DetectionTransform(160)(image, boxes)
    torch.testing.assert_close(out, plain.flip(-1), atol=0, rtol=0)  # the resized image is flipped
    unflipped, same, _, _ = DetectionTransform(160, AugmentConfig(hflip=0.0, jitter=0.0, hue=0.0))(image, boxes)
    torch.testing.assert_close(unflipped, plain)
    torch.testing.assert_close(same, torch.tensor([[20.0, 70.0, 60.0, 100.0]]))


def test_augmentations_follow_torch_seed(small_set):
    ds = CocoDetection(*small_set, image_size=64, train=True, augment=AugmentConfig(hflip=0.5, jitter=0.4, hue=0.1))

    def epoch(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        torch.manual_seed(seed)
        return [(image, t["boxes"]) for image, t in (ds[i] for i in range(len(ds)) for _ in range(4))]

    first, again, other = epoch(0), epoch(0), epoch(1)
    for (a, ba), (b, bb) in zip(first, again):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(ba, bb, atol=0, rtol=0)
    assert any(not torch.equal(a, b) for (a, _), (b, _) in zip(first, other))
    evaluation = CocoDetection(*small_set, image_size=64, train=False)
    plain = evaluation[0][0]
    assert any(not torch.equal(a, plain) for a, _ in first[:4])  # jitter changes the training image
    torch.testing.assert_close(evaluation[0][0], plain, atol=0, rtol=0)  # evaluation is deterministic


def test_colour_jitter_changes_colours_not_boxes_or_padding(small_set):
    augment = AugmentConfig(hflip=0.0, jitter=0.4, hue=0.1)
    jittered = CocoDetection(*small_set, image_size=96, train=True, augment=augment)
    plain_image, plain = CocoDetection(*small_set, image_size=96, train=False)[0]
    torch.manual_seed(0)
    raw, target = jittered[0]
    torch.testing.assert_close(target["boxes"], plain["boxes"])
    assert torch.equal(raw, plain_image)  # drawn by the loader, applied on the training device
    assert target["jitter"].region == (18, 0, 60, 96) and plain["jitter"] is None
    image = batch_input(raw[None], [target], "cpu")[0]
    pad = PAD_VALUE / 255
    assert torch.all(image[:, :18] == pad) and torch.all(image[:, 78:] == pad)  # the padding is not jittered
    assert (image[:, 18:78] - plain_image[:, 18:78] / 255).abs().mean() > 0.01
    j = target["jitter"]  # the same as torchvision's float functions in the drawn order
    expected = plain_image[:, 18:78].float() / 255
    ops = {0: (F.adjust_brightness, j.brightness), 1: (F.adjust_contrast, j.contrast),
           2: (F.adjust_saturation, j.saturation), 3: (F.adjust_hue, j.hue)}
    for k in j.order:
        expected = ops[k][0](expected, ops[k][1])
    torch.testing.assert_close(image[:, 18:78], expected)


def test_augment_config_rejects_bad_values():
    with pytest.raises(ValueError, match="hflip"):
        AugmentConfig(hflip=1.5)
    with pytest.raises(ValueError, match="jitter"):
        AugmentConfig(jitter=-0.1)
    with pytest.raises(ValueError, match="hue"):
        AugmentConfig(hue=0.7)


def test_data_package_imports_no_service_libraries():
    code = ("import sys, ablate.data, ablate.data.synth; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow', 'sqlalchemy'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_synth_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing(rng, size, *variant):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(rng, size, *variant)

    real = synth_module.render_image
    monkeypatch.setattr(synth_module, "render_image", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic(tmp_path / "s", num_train=4, num_val=1, image_size=64)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(synth_module, "render_image", real)
    assert generate_synthetic(tmp_path / "s", num_train=4, num_val=1, image_size=64).generated


def test_synth_concurrent_generation_ends_with_one_set(tmp_path):
    with ThreadPoolExecutor(3) as pool:
        infos = list(pool.map(lambda _: generate_synthetic(tmp_path / "s", num_train=20, num_val=2, image_size=64),
                              range(3)))
    assert sum(i.generated for i in infos) >= 1 and len({json.dumps(i.stats) for i in infos}) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    assert len(list((tmp_path / "s" / "train").glob("*.png"))) == 20


# -- the image cache as a config field (data.cache) --------------------------------------------------


@pytest.mark.parametrize(("cache", "kept"), [("memory", 3), ("none", 0)])
def test_data_cache_config_reaches_the_datasets(small_set, cache, kept):
    """``data.cache`` in a trial config is what ``build_data`` gives both datasets: ``none`` keeps no
    decoded image after a full pass, ``memory`` keeps every one."""
    from ablate.config import TrialConfig
    from ablate.train import build_data

    ann, images = small_set
    coco = {"train_ann": ann, "train_images": images, "val_ann": ann, "val_images": images}
    config = TrialConfig.model_validate({"data": {"coco": coco, "image_size": 64, "cache": cache}})
    for ds in build_data(config):
        assert ds.cache == cache
        for i in range(len(ds)):
            ds[i]
        assert len(ds._decoded) == kept


def test_data_cache_default_and_bad_values(small_set, tmp_path):
    from ablate.config import ConfigError, DataConfig, load_trial_config

    assert DataConfig(synthetic={}).cache == "auto"
    path = tmp_path / "trial.yaml"
    path.write_text("data: {synthetic: {}, cache: ram}\n")
    with pytest.raises(ConfigError, match=r"trial.yaml: data.cache: Input should be 'auto', 'none', 'memory' or 'disk'") as e:
        load_trial_config(path)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"cache: unknown mode 'ram'; choose one of auto, none, memory, disk"):
        CocoDetection(*small_set, image_size=64, train=False, cache="ram")
