"""Tests of the DIoU / CIoU bounding-box regression simulation (``ablate.simulate``)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import typer
from typer.testing import CliRunner

from ablate.detect.boxes import cxcywh_to_xyxy, elementwise_iou
from ablate.simulate import (
    CASES_PER_POINT,
    LOSSES,
    SimulationConfig,
    learning_rate,
    make_cases,
    regress,
    run_simulation,
    simulate_command,
)


@pytest.fixture(scope="module")
def small_run():
    """All five losses on 40 centres (13,720 cases), the default 200 iterations."""
    return run_simulation(SimulationConfig(points=40))


def test_case_count_and_curve_shapes(small_run):
    assert CASES_PER_POINT == 343
    assert small_run.cases == 40 * 343
    assert list(small_run.curves) == list(LOSSES)
    initial = small_run.curves["iou"][0]
    for name, curve in small_run.curves.items():
        assert len(curve) == 201
        assert curve[0] == initial, name  # the same anchors for every loss


def test_cases_follow_the_paper_setup():
    anchors, targets = make_cases(points=3, seed=0, dtype=torch.float64)  # [1029, 4] each
    assert anchors.shape == targets.shape == (3 * 343, 4)
    assert torch.all(targets[:, :2] == 10.0)
    torch.testing.assert_close(targets[:, 2] * targets[:, 3], torch.ones(3 * 343, dtype=torch.float64))
    assert torch.all((anchors[:, :2] - 10.0).norm(dim=-1) <= 3.0)
    ratio = (anchors[:, 2] * anchors[:, 3]) / (targets[:, 2] * targets[:, 3])
    assert sorted({round(r, 6) for r in ratio.tolist()}) == [0.5, 0.67, 0.75, 1.0, 1.33, 1.5, 2.0]
    aspect = {round(a, 6) for a in (anchors[:, 2] / anchors[:, 3]).tolist()}
    assert aspect == {round(a, 6) for a in (1 / 4, 1 / 3, 1 / 2, 1.0, 2.0, 3.0, 4.0)}
    # 343 consecutive cases share a centre; the seed fixes the centres.
    assert torch.all(anchors[:343, :2] == anchors[0, :2])
    again, _ = make_cases(points=3, seed=0, dtype=torch.float64)
    other, _ = make_cases(points=3, seed=1, dtype=torch.float64)
    assert torch.equal(anchors, again) and not torch.equal(anchors, other)


def test_iou_loss_stalls_while_giou_diou_ciou_converge(small_run):
    curves = small_run.curves
    # Most cases start without overlap, where the IoU loss has no gradient.
    assert curves["iou"][-1] > 0.7 * curves["iou"][0]
    assert small_run.final_mean_iou["iou"] < 0.4
    for name in ("giou", "diou", "ciou"):
        assert curves[name][0] / curves[name][-1] > 50, name
        assert small_run.final_mean_iou[name] > 0.95, name


def test_non_overlapping_cases_do_not_move_under_iou_loss():
    anchors, targets = make_cases(points=10)
    apart = elementwise_iou(cxcywh_to_xyxy(anchors), cxcywh_to_xyxy(targets)) == 0  # [N]
    assert apart.sum() > 1000
    result = regress(anchors[apart], targets[apart], "iou", iterations=50)
    assert torch.equal(result.boxes, anchors[apart])
    assert result.errors[-1] == result.errors[0]
    for name in ("giou", "diou", "ciou"):
        moved = regress(anchors[apart], targets[apart], name, iterations=200)
        assert moved.errors[0] / moved.errors[-1] > 10, name


@pytest.mark.parametrize("loss", LOSSES)
def test_anchor_equal_to_target_stays_put(loss):
    target = torch.tensor([[10.0, 10.0, 0.5, 2.0], [10.0, 10.0, 1.0, 1.0], [10.0, 10.0, 3**0.5, 3**-0.5]])
    result = regress(target.clone(), target, loss, iterations=200)
    assert result.errors.abs().max() < 1e-5
    torch.testing.assert_close(result.iou, torch.ones(3))


@pytest.mark.parametrize(
    ("loss", "grad"),
    [
        # anchor (10.5, 10, 1, 1), target (10, 10, 1, 2): I = 0.5, U = 2.5, IoU = 0.2.
        ("iou", (0.48, 0.0, -0.16, -0.16)),  # -dIoU/dB = -(dI U - I dU) / U^2
        ("giou", (0.48 + 2 / 9, 0.0, -0.16 + 1 / 9, -0.16 - 1 / 6)),  # + d(1 - U / C), C = 3
        ("diou", (0.48 + 5.5 / 39.0625, 0.0, -0.16 - 0.375 / 39.0625, -0.16)),  # + d(rho^2 / c^2), c^2 = 6.25
    ],
)
def test_one_step_by_hand(loss, grad):
    anchor = torch.tensor([[10.5, 10.0, 1.0, 1.0]], dtype=torch.float64)
    target = torch.tensor([[10.0, 10.0, 1.0, 2.0]], dtype=torch.float64)
    result = regress(anchor, target, loss, iterations=1)  # T = 1: eta = 0.001
    expected = anchor - 0.001 * (2 - 0.2) * torch.tensor([grad], dtype=torch.float64)
    torch.testing.assert_close(result.boxes, expected, rtol=0, atol=1e-9)
    assert result.errors[0].item() == pytest.approx(1.5)
    assert result.errors[1].item() == pytest.approx((expected - target).abs().sum().item(), abs=1e-9)


def test_mse_descends_on_the_encoding():
    anchor = torch.tensor([[10.5, 10.0, 1.0, 1.0]], dtype=torch.float64)
    target = torch.tensor([[10.0, 10.0, 1.0, 2.0]], dtype=torch.float64)
    result = regress(anchor, target, "mse", iterations=1)  # T = 1: eta = 0.001, IoU 0.2
    # t starts at 0; t_g = (-0.5, 0, 0, log 2); one step t = -eta (2 - IoU) 2 (t - t_g)
    step = 0.001 * 1.8 * 2
    t = torch.tensor([-0.5, 0.0, 0.0, math.log(2)], dtype=torch.float64) * step
    expected = torch.tensor([[10.5 + t[0], 10.0, 1.0, math.exp(t[3])]], dtype=torch.float64)
    torch.testing.assert_close(result.boxes, expected, rtol=0, atol=1e-9)  # IoU carries eps = 1e-7
    # and it converges on small anchors too (a side of 0.35: no blow-up)
    small = torch.tensor([[11.0, 9.0, 0.35, 0.35]], dtype=torch.float64)
    assert regress(small, target, "mse", iterations=200).errors[-1] < 1e-3


def test_learning_rate_schedule():
    assert [learning_rate(t, 200) for t in (1, 160, 161, 180, 181, 200)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    assert [learning_rate(t, 10) for t in (8, 9, 10)] == [0.1, 0.01, 0.001]


def test_chunking_does_not_change_the_result():
    whole = run_simulation(SimulationConfig(points=3, iterations=30, losses=("giou", "ciou", "mse")))
    chunked = run_simulation(SimulationConfig(points=3, iterations=30, losses=("giou", "ciou", "mse"), chunk_size=100))
    for name in whole.curves:
        assert chunked.curves[name] == pytest.approx(whole.curves[name], rel=1e-12)
        assert chunked.final_mean_iou[name] == pytest.approx(whole.final_mean_iou[name], rel=1e-12)


def test_float64_matches_float32():
    config = SimulationConfig(points=2, iterations=40, losses=("diou",))
    single = run_simulation(config)
    double = run_simulation(SimulationConfig(points=2, iterations=40, losses=("diou",), dtype="float64"))
    assert double.curves["diou"][0] == pytest.approx(single.curves["diou"][0], rel=1e-6)
    assert double.curves["diou"][-1] == pytest.approx(single.curves["diou"][-1], rel=1e-3)


def test_writers(tmp_path):
    result = run_simulation(SimulationConfig(points=1, iterations=12, losses=("iou", "ciou")))
    result.write_csv(tmp_path / "curves.csv")
    with (tmp_path / "curves.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["iteration", "iou", "ciou"]
    assert [int(r[0]) for r in rows[1:]] == list(range(13))
    assert float(rows[-1][2]) == result.curves["ciou"][-1]

    result.write_json(tmp_path / "table.json")
    data = json.loads((tmp_path / "table.json").read_text())
    assert data["cases"] == 343
    assert data["config"]["iterations"] == 12 and data["config"]["losses"] == ["iou", "ciou"]
    assert set(data["losses"]) == {"iou", "ciou"}
    ciou = data["losses"]["ciou"]
    assert set(ciou) == {"total_error", "initial_over_final", "final_mean_iou", "seconds"}
    assert list(ciou["total_error"]) == ["0", "10", "12"]  # report_at up to T, and T
    assert ciou["initial_over_final"] == pytest.approx(result.curves["ciou"][0] / result.curves["ciou"][-1])
    assert ciou["final_mean_iou"] == pytest.approx(result.final_mean_iou["ciou"])

    assert [list(row) for row in result.table_rows()] == [
        ["loss", "E(0)", "E(10)", "E(12)", "E(0)/E(T)", "mean IoU", "time [s]"]
    ] * 2


@pytest.mark.parametrize(
    "field",
    [{"points": 0}, {"iterations": 0}, {"losses": ("iou", "l1")}, {"losses": ()}, {"dtype": "float16"}, {"chunk_size": 0}],
)
def test_config_rejects_bad_values(field):
    with pytest.raises(ValueError):
        SimulationConfig(**field)


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("simulate")(simulate_command)

    @app.callback()
    def main() -> None:
        """Throwaway app holding the command under test."""

    return app


def test_command_prints_table_and_writes_files(tmp_path):
    args = ["simulate", "--points", "1", "--iterations", "5", "--losses", "iou, diou", "--dtype", "float64"]
    args += ["--csv", str(tmp_path / "c.csv"), "--json", str(tmp_path / "t.json")]
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, result.output
    assert "diou" in result.stdout and "E(0)/E(T)" in result.stdout
    assert (tmp_path / "c.csv").read_text().splitlines()[0] == "iteration,iou,diou"
    assert json.loads((tmp_path / "t.json").read_text())["config"]["dtype"] == "float64"


@pytest.mark.parametrize(
    ("args", "option", "hint"),
    [
        (["--losses", "iou,l1"], "--losses", "iou, giou, diou, ciou, mse"),
        (["--points", "0"], "--points", ">= 1"),
        (["--iterations", "0"], "--iterations", ">= 1"),
        (["--dtype", "float16"], "--dtype", "float32, float64"),
    ],
)
def test_command_rejects_bad_options(args, option, hint):
    result = CliRunner().invoke(_app(), ["simulate", *args])
    assert result.exit_code == 2
    assert option in result.output and hint in result.output


def test_help_states_the_choices():
    result = CliRunner().invoke(_app(), ["simulate", "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for phrase in ("Algorithm 1", "(2 - IoU)", "1/(w^2 + h^2)", "1e-6", "SSD"):
        assert phrase in text, phrase
