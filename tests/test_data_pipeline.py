"""The data pipeline: per-sample seeding, loader workers, cache modes, JPEG sets, uint8 batches."""

import json

import pytest
import torch
from torchvision.io import decode_image, read_file

from ablate.config import TrialConfig
from ablate.data.coco import CocoDetection, SeededBatchSampler, make_loader
from ablate.data.synth import generate_synthetic
from ablate.data.transforms import AugmentConfig, batch_input, to_input

AUG = AugmentConfig(hflip=0.5, jitter=0.4, hue=0.05)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("pipe") / "s", num_train=24, num_val=8, image_size=64, seed=3)


def _train_set(info, **kw):
    return CocoDetection(info.annotations("train"), info.images("train"), 64, train=True, augment=AUG, **kw)


def _epoch(loader, sampler, seed):
    sampler.set_seed(seed)
    out = []
    for x, ts in loader:
        assert x.dtype == torch.uint8
        out.append((batch_input(x, ts, "cpu"), [(t["image_id"], t["boxes"].clone()) for t in ts]))  # jitter applied
    return out


def _same(a, b):
    assert len(a) == len(b)
    for (xa, ta), (xb, tb) in zip(a, b):
        assert torch.equal(xa, xb)
        assert [i for i, _ in ta] == [i for i, _ in tb]
        for (_, ba), (_, bb) in zip(ta, tb):
            torch.testing.assert_close(ba, bb, atol=0, rtol=0)


def test_sampler_orders_and_seeds_follow_its_seed():
    s = SeededBatchSampler(10, 4, shuffle=True, seed=5)
    first, again = list(s), list(s)
    assert first == again and [len(b) for b in first] == [4, 4, 2] and len(s) == 3
    assert sorted(i for b in first for i, _ in b) == list(range(10))
    s.set_seed(6)
    assert list(s) != first
    plain = SeededBatchSampler(10, 4, shuffle=False, drop_last=True)
    assert [i for b in plain for i, _ in b] == list(range(8)) and len(plain) == 2


def test_batches_are_the_same_with_0_or_2_workers(tiny):
    ds = _train_set(tiny)
    l0, s0 = make_loader(ds, 5, shuffle=True, workers=0)
    l2, s2 = make_loader(ds, 5, shuffle=True, workers=2, prefetch=1)
    e0, e2 = _epoch(l0, s0, 11), _epoch(l2, s2, 11)
    _same(e0, e2)
    _same(_epoch(l2, s2, 12), _epoch(l0, s0, 12))  # persistent workers see the next epoch's seed
    fixed, fs = make_loader(ds, 5, shuffle=False)  # same images in the same order, other seeds
    a, b = _epoch(fixed, fs, 1), _epoch(fixed, fs, 2)
    assert [i for _, t in a for i, _ in t] == [i for _, t in b for i, _ in t]
    assert any(not torch.equal(x, y) for (x, _), (y, _) in zip(a, b))  # jitter differs
    assert any(not torch.equal(p, q) for (_, ta), (_, tb) in zip(a, b) for (_, p), (_, q) in zip(ta, tb))  # so do flips


def test_cache_modes_give_the_same_batches(tiny, tmp_path):
    epochs = []
    for cache in ("none", "memory", "disk"):
        ds = _train_set(tiny, cache=cache, cache_dir=tmp_path / "c")
        assert ds.cache == cache
        loader, sampler = make_loader(ds, 6, shuffle=True)
        epochs.append(_epoch(loader, sampler, 3))
        if cache == "memory":
            assert len(ds._decoded) == len(ds)
    _same(epochs[0], epochs[1])
    _same(epochs[0], epochs[2])
    assert len(list((tmp_path / "c").glob("*.u8img"))) == 1


def test_auto_cache_is_disk_for_a_small_set_and_none_above_the_limit(tiny, tmp_path, monkeypatch):
    import ablate.data.coco as coco

    lines = []
    assert _train_set(tiny, cache="auto", cache_dir=tmp_path / "c", progress=lines.append).cache == "disk"
    monkeypatch.setattr(coco, "AUTO_DISK_LIMIT", 1000)
    assert _train_set(tiny, cache="auto", cache_dir=tmp_path / "c", progress=lines.append).cache == "none"
    assert any("image cache: none for instances_train.json" in line for line in lines)


def test_workers_and_cache_leave_the_trial_hash_alone(tiny):
    from ablate import spec

    base = {"data": {"synthetic": {"root": str(tiny.root), "train": 24, "val": 8, "size": 64, "seed": 3},
                     "image_size": 64}}
    configs = [TrialConfig.model_validate(base),
               TrialConfig.model_validate({"data": {**base["data"], "workers": 3, "cache": "memory", "prefetch": 4,
                                                    "cache_dir": "/tmp/elsewhere"}})]
    fp = spec.dataset_fingerprint(configs[0].data)
    assert spec.trial_hash(configs[0], fp, "code") == spec.trial_hash(configs[1], fp, "code")
    jpeg = TrialConfig.model_validate({"data": {**base["data"], "synthetic": {**base["data"]["synthetic"],
                                                                            "format": "jpeg"}}})
    assert spec.dataset_fingerprint(jpeg.data) != fp  # other pixels


def test_loader_workers_default_to_the_cpu_share_minus_one():
    from ablate.train import loader_workers

    assert loader_workers(TrialConfig.model_validate({"threads": 4})) == 3
    assert loader_workers(TrialConfig.model_validate({"threads": 1})) == 0
    assert loader_workers(TrialConfig.model_validate({"threads": 4, "data": {"synthetic": {}, "workers": 0}})) == 0


def test_to_input_makes_float_on_the_device():
    x = torch.tensor([[[[0, 255], [128, 51]]] * 3], dtype=torch.uint8)  # [1, 3, 2, 2]
    y = to_input(x, "cpu")
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y[0, 0], torch.tensor([[0.0, 1.0], [128 / 255, 0.2]]))
    f = torch.rand(1, 3, 2, 2)
    assert torch.equal(to_input(f, "cpu"), f)


def test_jpeg_synthetic_set(tmp_path):
    png = generate_synthetic(tmp_path / "png", num_train=6, num_val=2, image_size=64, seed=1)
    jpg = generate_synthetic(tmp_path / "jpg", num_train=6, num_val=2, image_size=64, seed=1, image_format="jpeg")
    a = json.loads(png.annotations("train").read_text())
    b = json.loads(jpg.annotations("train").read_text())
    assert [i["file_name"] for i in b["images"]][:2] == ["000000.jpg", "000001.jpg"]
    assert a["annotations"] == b["annotations"]  # boxes of the rendered pixels, before compression
    assert json.loads((jpg.root / "synth.json").read_text())["params"]["format"] == "jpeg"
    assert "format" not in json.loads((png.root / "synth.json").read_text())["params"]
    assert (jpg.images("train") / "000000.jpg").read_bytes()[:2] == b"\xff\xd8"  # a JPEG stream
    pa = decode_image(read_file(str(png.images("train") / "000000.png")))
    pb = decode_image(read_file(str(jpg.images("train") / "000000.jpg")))
    assert pa.shape == pb.shape and 0 < (pa.float() - pb.float()).abs().mean() < 16  # lossy (the pixel noise), close
    with pytest.raises(FileExistsError, match=r"format png \(asked jpeg\)"):
        generate_synthetic(tmp_path / "png", num_train=6, num_val=2, image_size=64, seed=1, image_format="jpeg")
    with pytest.raises(ValueError, match="unknown image format 'gif'"):
        generate_synthetic(tmp_path / "gif", num_train=1, num_val=1, image_size=64, image_format="gif")


@pytest.mark.slow
def test_training_is_the_same_with_0_or_2_workers(tiny, tmp_path):
    """One epoch of a tiny trial: identical losses and final metrics whichever process loads the data."""
    from ablate.train import train

    results = []
    for workers in (0, 2):
        config = TrialConfig.model_validate({
            "preset": "yolov3", "model": {"width": 0.25, "depth": 0.33}, "threads": 1, "device": "cpu",
            "data": {"synthetic": {"root": str(tiny.root), "train": 24, "val": 8, "size": 64, "seed": 3},
                     "image_size": 64, "workers": workers, "cache": "none"},
            "train": {"epochs": 2, "batch_size": 6, "eval_every": 1, "log_every": 1}})
        events = []
        res = train(config, report=events.append)
        losses = [e["loss/total"] for e in events if e["kind"] == "train"]
        results.append((losses, {k: res[k] for k in ("AP", "AP50", "AR100", "num_detections")}))
    assert results[0][0] == results[1][0] and len(results[0][0]) == 8
    assert results[0][1] == results[1][1]
