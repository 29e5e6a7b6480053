"""``ablate bench loss``: a row per preset, the reference column, candidates interleaved in each
repeat, ratios as medians of per-repeat ratios, the command line; the YOLOv5-style reference
loss against ablate's scaled_yolov4; the ignore mask's max IoU against the pairwise form.

Small sizes (128 px, two images, three classes): no test times anything."""

import json
import statistics

import pytest
import torch
from torchvision.ops import box_iou
from typer.testing import CliRunner

import ablate.bench as bench
from ablate.bench import bench_loss, floor_label
from ablate.bench_loss_ref import Yolov5Loss, yolov5_targets
from ablate.cli import app
from ablate.detect import IGNORED, NEGATIVE, POSITIVE, PRESETS, Targets, build_criterion, build_priors, preset
from ablate.detect.anchors import AnchorLayout, LevelSpec
from ablate.detect.assign import Assignment, _best_iou, apply_ignore_mask
from ablate.detect.boxes import box_iou_batched
from ablate.detect.postprocess import oracle_prediction

SMALL = {"batch": 2, "size": 128, "classes": 3, "gts": 3}
SMALL_ARGS = ["--batch", "2", "--size", "128", "--classes", "3", "--gts", "3"]


class ScriptedClock:
    """Stands in for ``time`` in ablate.bench: the k-th timed step lasts ``durations[k]`` seconds."""

    def __init__(self, durations: list[float]):
        self.durations, self.calls, self.now = durations, 0, 0.0

    def perf_counter(self) -> float:
        if self.calls % 2:  # the end of a step
            self.now += self.durations[self.calls // 2]
        self.calls += 1
        return self.now


@pytest.fixture(scope="module")
def small_run():
    calls = []
    res = bench_loss(**SMALL, repeats=2, on_time=lambda c, rep, ms: calls.append((c, rep)))
    return res, calls


def test_a_row_per_preset_with_the_reference_column(small_run):
    res, _ = small_run
    assert [r.preset for r in res.rows] == list(PRESETS)
    for r in res.rows:
        crit = build_criterion(preset(r.preset), 3, 128)
        assert (r.anchors, r.channels) == (crit.priors.num, crit.channels)
        assert r.loss_ms > 0 and r.floor_ms > 0 and r.vs_floor > 0 and r.num_pos > 0
        if preset(r.preset).has_objectness:  # YOLO-style: timed against the reference
            assert r.vs_reference > 0
            assert r.goal_reference == (1.3 if preset(r.preset).ignore_thresh is not None else 1.0)
        else:
            assert r.vs_reference is None and r.goal_reference is None and r.goal_floor == 1.0
    assert res.reference_ms > 0 and res.reference_rows > 0
    # one floor per distinct tensor; yolov3, yolov4, scaled_yolov4 and the reference share one
    assert set(res.floors) == {floor_label(r.anchors, r.channels) for r in res.rows}
    assert len({(r.anchors, r.channels) for r in res.rows if r.preset in ("yolov3", "yolov4", "scaled_yolov4")}) == 1


def test_candidates_are_timed_interleaved_in_each_repeat(small_run):
    res, calls = small_run
    shape = {r.preset: floor_label(r.anchors, r.channels) for r in res.rows}
    # each floor just before the first preset reading its tensor, the reference with its own tensor's floor
    assert res.order == [shape["yolov1"], "yolov1", shape["yolov2"], "yolov2", shape["yolov3"], "reference", "yolov3",
                         "yolov4", "scaled_yolov4", shape["ssd"], "ssd", shape["retinanet"], "retinanet"]
    assert len(set(shape.values())) == 5
    assert calls == [(c, rep) for rep in range(2) for c in res.order]  # floors, reference, presets, then again
    assert all(len(v) == 2 for v in res.times.values())


def test_the_reference_and_its_floor_come_first_without_a_preset_of_its_tensor():
    res = bench_loss(["ssd"], **SMALL, repeats=1)
    crit = build_criterion(preset("scaled_yolov4"), 3, 128)
    assert res.order == [floor_label(crit.priors.num, crit.channels), "reference", res.order[2], "ssd"]
    assert res.order[2].startswith("floor ") and res.rows[0].vs_reference is None


def test_ratios_are_medians_of_per_repeat_ratios(monkeypatch):
    """Scripted times where the two summaries differ: yolov3 takes 5, 20, 20 ms while the reference
    takes 10, 10, 40 ms (a load spike in the last repeat); per repeat 0.5, 2, 0.5 -> 0.5x, where
    the ratio of the medians would say 2x."""
    crit = build_criterion(preset("yolov3"), 3, 128)
    order = [floor_label(crit.priors.num, crit.channels), "reference", "yolov3"]  # the reference reads yolov3's tensor
    script = {"reference": [10, 10, 40], "yolov3": [5, 20, 20], order[0]: [50, 50, 50]}
    durations = [script[c][rep] / 1e3 for rep in range(3) for c in order]

    class FakeTime:
        perf_counter = ScriptedClock(durations).perf_counter

    monkeypatch.setattr(bench, "time", FakeTime)
    res = bench_loss(["yolov3"], **SMALL, repeats=3)
    assert res.order == order
    (row,) = res.rows
    assert row.loss_ms == pytest.approx(20) and row.vs_reference == pytest.approx(0.5)
    assert row.vs_floor == pytest.approx(statistics.median([0.1, 0.4, 0.4]))


def test_cli_table_json_and_profile(tmp_path):
    out = tmp_path / "loss.json"
    result = CliRunner().invoke(app, ["bench", "loss", *SMALL_ARGS, "--repeats", "1", "--presets", "yolov3,ssd",
                                      "--profile", "--json", str(out)])
    assert result.exit_code == 0, result.output
    for text in ("vs reference", "vs floor", "yolov3", "ssd", "reference (YOLOv5-style)", "profile reference:"):
        assert text in result.output, text
    doc = json.loads(out.read_text())
    assert [r["preset"] for r in doc["rows"]] == ["yolov3", "ssd"]
    assert doc["rows"][0]["vs_reference"] > 0 and doc["rows"][1]["vs_reference"] is None
    assert doc["reference"]["ms"] > 0 and doc["settings"]["repeats"] == 1 and "median" in doc["ratios"]
    assert set(doc["profiles"]) == set(doc["order"]) == {"reference", "yolov3", "ssd"} | set(doc["floors"])
    for ops in doc["profiles"].values():
        assert 0 < len(ops) <= bench.PROFILE_TOP
        assert all(o["op"] and o["self_cpu_ms"] >= 0 and o["calls"] >= 1 for o in ops)
        assert [o["self_cpu_ms"] for o in ops] == sorted((o["self_cpu_ms"] for o in ops), reverse=True)


@pytest.mark.parametrize(("args", "message"), [
    (["--repeats", "0"], "--repeats: must be >= 1, got 0"),
    (["--presets", "yolov3,yolov9"], "--presets: unknown preset 'yolov9'"),
    (["--gts", "-1"], "--gts: must be >= 0, got -1"),
    (["--device", "tpu"], "--device: unknown device 'tpu'"),
    (["--amp"], "--amp: mixed precision needs --device cuda"),
])
def test_cli_bad_options_are_one_line_errors(args, message):
    result = CliRunner().invoke(app, ["bench", "loss", *SMALL_ARGS, *args])
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where torch sees no CUDA device")
def test_cli_cuda_without_a_device_is_refused():
    result = CliRunner().invoke(app, ["bench", "loss", *SMALL_ARGS, "--device", "cuda"])
    assert result.exit_code == 2 and "--device: cuda, but torch sees no CUDA device" in result.output


# --------------------------------------------------------------------------- the reference loss
S, C = 256, 3


def _box(cx, cy, w, h):
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


#: GTs far apart, no centre on a cell border: every (anchor, cell) the reference lists is listed once
SPARSE = Targets(torch.tensor([[_box(50.3, 60.7, 40, 30), _box(190.2, 180.6, 100, 120)],
                               [_box(120.4, 70.2, 20, 60), [0.0, 0.0, 0.0, 0.0]]]),
                 torch.tensor([[0, 2], [1, 0]]), torch.tensor([[True, True], [True, False]]))


def _yolov5_weights():
    """scaled_yolov4 with what YOLOv5's run differs in: `loss * bs`, and its train.py's hyp scaling
    for C classes at S px (cls * C / 80, obj * (S / 640)^2; three levels leave box as it is)."""
    return preset("scaled_yolov4").override(scale_by_batch=True, lambda_cls=0.5 * C / 80, lambda_obj=(S / 640) ** 2)


def test_reference_equals_scaled_yolov4_where_no_row_repeats():
    crit = build_criterion(_yolov5_weights(), C, S)
    ref = Yolov5Loss(crit.priors, C)
    t6 = yolov5_targets(SPARSE, S)
    assert t6.shape == (3, 6) and t6[:, :2].tolist() == [[0, 0], [0, 2], [1, 1]]
    pred = (torch.randn(2, crit.priors.num, crit.channels, generator=torch.Generator().manual_seed(0)) * 1.5)
    pred.requires_grad_(True)
    out = crit(pred, SPARSE)
    out.total.backward()
    grad = pred.grad.clone()
    pred.grad = None
    loss, (lbox, lobj, lcls) = ref(pred, t6)
    loss.backward()
    # the precondition: the reference's rows are ablate's positives, none twice
    assert sum(lv[0].numel() for lv in ref.build_targets(t6)) == int(out.stats["num_pos"]) > 0
    assert loss.item() == pytest.approx(out.total.item(), rel=1e-5)
    w = out.weighted  # include the batch size; the reference's parts do not
    for mine, theirs in ((w["box"], lbox), (w["obj"] + w["noobj"], lobj), (w["cls"], lcls)):
        assert mine.item() == pytest.approx(theirs.item() * 2, rel=1e-5)
    assert torch.allclose(pred.grad, grad, rtol=1e-4, atol=1e-6 * float(grad.abs().max()))


def test_reference_keeps_repeated_rows_and_is_small_on_an_oracle():
    crit = build_criterion(_yolov5_weights(), C, S)
    ref = Yolov5Loss(crit.priors, C)
    # two GTs of one size in neighbouring cells: the reference lists shared (anchor, cell)s twice
    close = Targets(torch.tensor([[_box(100.3, 100.2, 50, 50), _box(110.6, 100.9, 52, 48)]]),
                    torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.bool))
    rows = sum(lv[0].numel() for lv in ref.build_targets(yolov5_targets(close, S)))
    assert rows > int(crit(torch.zeros(1, crit.priors.num, crit.channels), close).stats["num_pos"])
    one = SPARSE[0:1]
    oracle = oracle_prediction(one.boxes[0], one.labels[0], crit.priors, crit.recipe, C)
    assert oracle.unplaced == oracle.unreachable == 0
    good, _ = ref(oracle.pred, yolov5_targets(one, S))
    noise, _ = ref(torch.randn(oracle.pred.shape, generator=torch.Generator().manual_seed(1)), yolov5_targets(one, S))
    assert good.item() < 1e-4 < 0.5 < noise.item()


def test_reference_refuses_levels_with_different_anchor_counts():
    layout = AnchorLayout("mixed", (LevelSpec(8, ((10.0, 10.0),)), LevelSpec(16, ((20.0, 20.0), (30.0, 30.0)))))
    with pytest.raises(ValueError, match="same number of anchors on every level"):
        Yolov5Loss(build_priors(layout, S), C)


# --------------------------------------------------------------------------- the ignore mask
def _random_case(B: int, N: int, G: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(B, N, 2, generator=gen) * 200
    decoded = torch.cat((xy, xy + torch.randn(B, N, 2, generator=gen) * 40), -1)  # some boxes inverted
    decoded[0, :3] = decoded[0, :3, :2].repeat(1, 2)  # zero-size boxes
    gxy = torch.rand(B, G, 2, generator=gen) * 200
    boxes = torch.cat((gxy, gxy + torch.rand(B, G, 2, generator=gen) * 80), -1)
    valid = torch.rand(B, G, generator=gen) > 0.3
    if G:
        valid[-1] = False  # an image whose GTs are all padding
        boxes[0, 0] = decoded[0, 5]  # an exact overlap: IoU 1
    labels = torch.randint(-1, 2, (B, N), generator=gen).to(torch.int8)  # ignored, negative, positive
    return decoded, Targets(boxes, torch.zeros(B, G, dtype=torch.long), valid), labels


@pytest.mark.parametrize(("B", "N", "G", "seed"), [(3, 400, 7, 0), (2, 50, 1, 1), (4, 300, 12, 2), (2, 30, 0, 3)])
@pytest.mark.parametrize("thresh", [0.0, 0.5, 0.7])
def test_ignore_mask_equals_the_pairwise_box_iou_form(B, N, G, seed, thresh):
    decoded, tg, labels = _random_case(B, N, G, seed)
    a = Assignment(labels, torch.full((B, N), -1), torch.zeros(B, N, 4), torch.full((B, N), -1),
                   torch.zeros(B, G, 1, dtype=torch.long))
    got = apply_ignore_mask(a, decoded, tg, thresh).labels
    want = labels.clone()
    for i in range(B):  # the straightforward form: [N, G_i] IoUs of the image's valid GTs
        gts = tg.boxes[i][tg.valid[i]]
        if gts.shape[0]:
            over = box_iou(decoded[i], gts).amax(1) > thresh
            want[i][(labels[i] == NEGATIVE) & over] = IGNORED
    assert torch.equal(got, want)
    assert torch.equal(got == POSITIVE, labels == POSITIVE)
    if G:  # the same values as the batched pairwise IoU, not only the same mask
        pairwise = box_iou_batched(decoded, tg.boxes).masked_fill(~tg.valid[:, None, :], -1.0).amax(-1)
        assert torch.equal(_best_iou(decoded, tg), pairwise.clamp(min=0))
