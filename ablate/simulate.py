"""The bounding-box regression simulation of DIoU / CIoU (Zheng et al., AAAI 2020, Algorithm 1).

Set-up, as in the authors' MATLAB reference (``simulation experiment/test_1715k.m`` of
Zzh-tju/DIoU):

* 5,000 anchor centres drawn uniformly in the disc of radius 3 around (10, 10)
  (``r = 3 sqrt(U)``, ``theta = 2 pi U``);
* 7 targets centred at (10, 10), of area 1 and aspect ratio w:h = 1:4 ... 4:1;
* per centre and target, anchors of 7 scales (area 0.5 ... 2 times the target's) by the
  same 7 aspect ratios: ``5000 * 7 * 7 * 7 = 1,715,000`` regression cases;
* each box ``B = (x, y, w, h)`` takes ``T = 200`` gradient steps
  ``B <- B - eta (2 - IoU(B, B_gt)) dL/dB`` with ``eta = 0.1`` up to ``0.8 T``, ``0.01``
  up to ``0.9 T`` and ``0.001`` after (IoU detached); ``dL/dB`` is torch autograd's,
  all cases of a chunk at once;
* the error after step ``t`` is ``E(t) = sum over cases |x - x_g| + |y - y_g| + |w - w_g| + |h - h_g|``.

Departures from the reference, all deliberate:

* the gradients are autograd's exact ones. The MATLAB code maps the IoU part of the
  gradient from (t, b, l, r) to (w, h) as ``dr - dl`` where the chain rule gives
  ``(dr - dl) / 2``, and for CIoU it drops the ``1 / (w^2 + h^2)`` factor of ``dv/dw``,
  ``dv/dh`` (every anchor has ``w^2 + h^2 >= 2 w h >= 1`` and every target ``>= 2``, so the
  exact gradient cannot explode);
* after every step ``w`` and ``h`` are clamped to ``>= MIN_SIZE`` so that a box never
  turns inside out (the reference has no guard);
* ``E(0)``, the error of the anchors, is recorded as well;
* ``mse`` is added as a reference: the squared error of the SSD / Faster R-CNN encoding
  ``t = ((x - x_a) / w_a, (y - y_a) / h_a, log(w / w_a), log(h / h_a))`` against the
  target's, ``(x_a, y_a, w_a, h_a)`` being the case's anchor. It descends on ``t`` itself,
  which is what a detector's head outputs and regresses, with the same ``(2 - IoU)``
  multiplier and step schedule. (Descending on ``B`` instead scales ``x - x_g`` by
  ``1 - 2 eta (2 - IoU) / w_a^2`` per step, which diverges for the ~15% of cases with an
  anchor side of 0.43 or less: a property of that parameterisation, not of the loss.)
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
import typer
from rich.table import Table
from torch import Tensor

from .console import console
from .detect.boxes import cxcywh_to_xyxy, elementwise_iou
from .detect.losses import IOU_LOSSES

#: Centre of the targets and of the disc of anchor centres.
CENTRE = 10.0
#: Radius of the disc of anchor centres.
RADIUS = 3.0
#: The seven aspect ratios ``w:h = 1:4, 1:3, 1:2, 1:1, 2:1, 3:1, 4:1`` as ``(w, h)`` of area 1.
ASPECT_SHAPES: tuple[tuple[float, float], ...] = (
    (0.5, 2.0),
    (math.sqrt(3) / 3, math.sqrt(3)),
    (math.sqrt(2) / 2, math.sqrt(2)),
    (1.0, 1.0),
    (math.sqrt(2), math.sqrt(2) / 2),
    (math.sqrt(3), math.sqrt(3) / 3),
    (2.0, 0.5),
)
#: Anchor area over target area.
SCALES: tuple[float, ...] = (0.5, 0.67, 0.75, 1.0, 1.33, 1.5, 2.0)
#: Cases per target and anchor centre.
CASES_PER_POINT = len(ASPECT_SHAPES) * len(SCALES) * len(ASPECT_SHAPES)
#: Smallest width / height a box is clamped to after each step.
MIN_SIZE = 1e-6
#: The losses the simulation knows, in table order.
LOSSES: tuple[str, ...] = ("iou", "giou", "diou", "ciou", "mse")
#: The dtypes the boxes may be regressed in.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class SimulationConfig:
    """What to simulate.

    ``report_at`` lists the iterations shown in the table and the JSON (those beyond
    ``iterations`` are left out, ``iterations`` itself is always shown). ``chunk_size``
    cases are regressed at a time; it changes speed and memory, not the result.
    """

    points: int = 5000
    iterations: int = 200
    seed: int = 0
    losses: tuple[str, ...] = LOSSES
    dtype: str = "float32"
    report_at: tuple[int, ...] = (0, 10, 20, 40, 80, 120, 160, 200)
    chunk_size: int = 2**18

    def __post_init__(self) -> None:
        if self.points < 1:
            raise ValueError(f"points must be >= 1, got {self.points}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if not self.losses or any(name not in LOSSES for name in self.losses):
            raise ValueError(f"losses must be a non-empty selection of {', '.join(LOSSES)}, got {self.losses}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if any(t < 0 for t in self.report_at):
            raise ValueError(f"report_at must be iterations >= 0, got {self.report_at}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")

    @property
    def report_iterations(self) -> list[int]:
        """The iterations the table shows: ``report_at`` up to ``iterations``, and ``iterations``."""
        return sorted({t for t in self.report_at if t <= self.iterations} | {self.iterations})


class Regression(NamedTuple):
    """Outcome of regressing ``N`` boxes for ``T`` iterations."""

    boxes: Tensor  # [N, 4] final (x, y, w, h)
    errors: Tensor  # [T + 1] float64: total error after each iteration, E(0) first
    iou: Tensor  # [N] final IoU with the targets


def learning_rate(iteration: int, iterations: int) -> float:
    """Step size of 1-based ``iteration`` of ``iterations`` (``T``).

    0.1 up to ``0.8 T``, 0.01 up to ``0.9 T``, then 0.001 (for ``T = 200``: 1..160,
    161..180, 181..200).
    """
    if 5 * iteration <= 4 * iterations:
        return 0.1
    if 10 * iteration <= 9 * iterations:
        return 0.01
    return 0.001


def make_cases(points: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Anchors and targets of all ``points * 343`` cases, as ``(x, y, w, h)``.

    Centres are drawn in float64 by a generator seeded with ``seed`` (all radii, then all
    angles, as the reference does), so ``dtype`` does not change them. Cases are ordered
    point, target shape, anchor scale, anchor shape (the reference's loop order).

    Returns:
        ``(anchors, targets)``, each ``Tensor[points * 343, 4]`` of ``dtype``.
    """
    generator = torch.Generator().manual_seed(seed)
    radius = RADIUS * torch.rand(points, generator=generator, dtype=torch.float64).sqrt()
    theta = 2 * math.pi * torch.rand(points, generator=generator, dtype=torch.float64)
    px = (CENTRE + radius * theta.cos())[:, None, None, None]  # [P, 1, 1, 1]
    py = (CENTRE + radius * theta.sin())[:, None, None, None]
    shapes = torch.tensor(ASPECT_SHAPES, dtype=torch.float64)  # [7, 2], area 1
    gw = shapes[:, 0][None, :, None, None]  # [1, 7, 1, 1] target shape
    gh = shapes[:, 1][None, :, None, None]
    scale = torch.tensor(SCALES, dtype=torch.float64)[None, None, :, None]  # [1, 1, 7, 1]
    side = (scale * gw * gh).sqrt()  # [1, 7, 7, 1]: sqrt(anchor area)
    aw = shapes[:, 0] * side  # [1, 7, 7, 7]
    ah = shapes[:, 1] * side
    size = (points, len(ASPECT_SHAPES), len(SCALES), len(ASPECT_SHAPES))
    anchors = torch.stack([v.expand(size) for v in (px, py, aw, ah)], dim=-1).reshape(-1, 4)
    centre = torch.full(size, CENTRE, dtype=torch.float64)
    targets = torch.stack([centre, centre, gw.expand(size), gh.expand(size)], dim=-1).reshape(-1, 4)
    return anchors.to(dtype), targets.to(dtype)


def _encode(boxes: Tensor, anchors: Tensor) -> Tensor:
    """SSD / Faster R-CNN box encoding ``((x - x_a) / w_a, (y - y_a) / h_a, log(w / w_a), log(h / h_a))``.

    ``Tensor[N, 4], Tensor[N, 4] -> Tensor[N, 4]``, all ``(x, y, w, h)``.
    """
    return torch.cat((((boxes[:, :2] - anchors[:, :2]) / anchors[:, 2:]), (boxes[:, 2:] / anchors[:, 2:]).log()), dim=-1)


def _decode(codes: Tensor, anchors: Tensor) -> Tensor:
    """Inverse of :func:`_encode`: ``Tensor[N, 4]`` codes -> ``Tensor[N, 4]`` boxes ``(x, y, w, h)``."""
    return torch.cat((anchors[:, :2] + codes[:, :2] * anchors[:, 2:], anchors[:, 2:] * codes[:, 2:].exp()), dim=-1)


class _Problem(NamedTuple):
    """What gradient descent runs on: the parameters, their box, and the per-case loss."""

    start: Tensor  # [N, 4] initial parameters
    to_box: Callable[[Tensor], Tensor]  # parameters -> (x, y, w, h)
    objective: Callable[[Tensor], Tensor]  # parameters -> [N] loss


def _problem(loss: str, anchors: Tensor, targets: Tensor) -> _Problem:
    """IoU-family losses descend on the box ``(x, y, w, h)`` (the paper's Algorithm 1);
    ``mse`` descends on the encoding ``t`` of the box relative to its anchor."""
    if loss == "mse":
        target_code = _encode(targets, anchors)
        return _Problem(
            torch.zeros_like(anchors),
            lambda codes: _decode(codes, anchors),
            lambda codes: (codes - target_code).pow(2).sum(-1),
        )
    loss_fn = IOU_LOSSES[loss]
    target_xyxy = cxcywh_to_xyxy(targets)
    return _Problem(anchors.clone(), lambda boxes: boxes, lambda boxes: loss_fn(cxcywh_to_xyxy(boxes), target_xyxy))


def _total_error(boxes: Tensor, targets: Tensor) -> Tensor:
    """``sum |x - x_g| + |y - y_g| + |w - w_g| + |h - h_g|`` over ``Tensor[N, 4]`` cases, in float64."""
    return (boxes - targets).abs().sum(dtype=torch.float64)


def regress(anchors: Tensor, targets: Tensor, loss: str, iterations: int) -> Regression:
    """Regress every anchor onto its target by gradient descent on ``loss``.

    Step ``t`` is ``B <- B - learning_rate(t, T) * (2 - IoU(B, B_gt)) * dL/dB`` with the
    IoU detached and ``dL/dB`` from autograd of the loss summed over cases (each case's
    gradient is its own); ``w, h`` are then clamped to ``>= MIN_SIZE``.

    Args:
        anchors: ``Tensor[N, 4]`` initial boxes ``(x, y, w, h)``; also the ``mse`` anchors.
        targets: ``Tensor[N, 4]`` target boxes ``(x, y, w, h)``.
        loss: one of ``LOSSES``.
        iterations: ``T``.
    """
    problem = _problem(loss, anchors, targets)
    target_xyxy = cxcywh_to_xyxy(targets)
    errors = torch.empty(iterations + 1, dtype=torch.float64)
    errors[0] = _total_error(anchors, targets)
    params = problem.start
    for t in range(1, iterations + 1):
        params.requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(problem.objective(params).sum(), params)
        with torch.no_grad():
            iou = elementwise_iou(cxcywh_to_xyxy(problem.to_box(params)), target_xyxy)  # [N]
            params = params - learning_rate(t, iterations) * (2.0 - iou)[:, None] * grad
            if loss != "mse":
                params[:, 2:].clamp_(min=MIN_SIZE)
            errors[t] = _total_error(problem.to_box(params), targets)
    boxes = problem.to_box(params)
    return Regression(boxes, errors, elementwise_iou(cxcywh_to_xyxy(boxes), target_xyxy))


def _finite_or_none(value: float) -> float | None:
    """``value``, or ``None`` where it is inf / nan (JSON has neither)."""
    return value if math.isfinite(value) else None


@dataclass
class SimulationResult:
    """Totals of a simulation run, per loss."""

    config: SimulationConfig
    cases: int
    curves: dict[str, list[float]]  # total error E(t) for t = 0..T
    final_mean_iou: dict[str, float]
    seconds: dict[str, float]

    def ratio(self, loss: str) -> float:
        """Initial over final total error ``E(0) / E(T)`` (inf where ``E(T) = 0``)."""
        first, last = self.curves[loss][0], self.curves[loss][-1]
        return first / last if last else math.inf

    def to_json_dict(self) -> dict:
        """The table as JSON-ready data: per loss the total error at each report iteration,
        the initial/final ratio, the final mean IoU and the seconds taken, plus the config.
        Non-finite numbers become ``null``."""
        return {
            "config": asdict(self.config),
            "cases": self.cases,
            "losses": {
                name: {
                    "total_error": {str(t): _finite_or_none(curve[t]) for t in self.config.report_iterations},
                    "initial_over_final": _finite_or_none(self.ratio(name)),
                    "final_mean_iou": _finite_or_none(self.final_mean_iou[name]),
                    "seconds": self.seconds[name],
                }
                for name, curve in self.curves.items()
            },
        }

    def write_json(self, path: Path) -> None:
        """Write :meth:`to_json_dict` to ``path``."""
        Path(path).write_text(json.dumps(self.to_json_dict(), indent=2) + "\n")

    def write_csv(self, path: Path) -> None:
        """Write the error curves: column ``iteration`` (0..T), then one column per loss."""
        with Path(path).open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["iteration", *self.curves])
            for t, row in enumerate(zip(*self.curves.values())):
                writer.writerow([t, *(repr(v) for v in row)])

    def table_rows(self) -> list[dict[str, str]]:
        """One row per loss, column title -> formatted cell (all rows share the titles)."""
        return [
            {
                "loss": name,
                **{f"E({t})": f"{curve[t]:.4g}" for t in self.config.report_iterations},
                "E(0)/E(T)": f"{self.ratio(name):.3g}",
                "mean IoU": f"{self.final_mean_iou[name]:.4f}",
                "time [s]": f"{self.seconds[name]:.1f}",
            }
            for name, curve in self.curves.items()
        ]


def run_simulation(config: SimulationConfig, progress: Callable[[str], None] | None = None) -> SimulationResult:
    """Run the simulation for every loss of ``config``; ``progress`` gets a line per loss."""
    anchors, targets = make_cases(config.points, config.seed, DTYPES[config.dtype])
    cases = anchors.shape[0]
    curves: dict[str, list[float]] = {}
    final_mean_iou: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for name in config.losses:
        start = time.perf_counter()
        errors = torch.zeros(config.iterations + 1, dtype=torch.float64)
        iou_sum = 0.0
        for lo in range(0, cases, config.chunk_size):
            chunk = regress(anchors[lo : lo + config.chunk_size], targets[lo : lo + config.chunk_size], name, config.iterations)
            errors += chunk.errors
            iou_sum += chunk.iou.sum(dtype=torch.float64).item()
        seconds[name] = time.perf_counter() - start
        curves[name] = errors.tolist()
        final_mean_iou[name] = iou_sum / cases
        if progress is not None:
            progress(
                f"{name}: {seconds[name]:.1f} s, E(0) = {curves[name][0]:.4g}, "
                f"E({config.iterations}) = {curves[name][-1]:.4g}, mean IoU {final_mean_iou[name]:.4f}"
            )
    return SimulationResult(config, cases, curves, final_mean_iou, seconds)


def simulate_command(
    points: int = typer.Option(5000, help="Anchor centres drawn in the disc (cases = 343 x points)."),
    iterations: int = typer.Option(200, help="Gradient steps T (step size 0.1 / 0.01 / 0.001 split at 0.8 T and 0.9 T)."),
    seed: int = typer.Option(0, help="Seed of the torch generator drawing the centres."),
    losses: str = typer.Option(",".join(LOSSES), help=f"Comma-separated losses, from {', '.join(LOSSES)}."),
    dtype: str = typer.Option("float32", help=f"Dtype of the regressed boxes: {' or '.join(DTYPES)}."),
    csv: Optional[Path] = typer.Option(None, help="Write the total error after every iteration (columns: iteration, one per loss)."),
    json: Optional[Path] = typer.Option(None, help="Write the table and the config as JSON."),
) -> None:
    """Bounding-box regression simulation of DIoU/CIoU (Zheng et al., AAAI 2020, Algorithm 1).

    Anchor centres are drawn uniformly in a disc of radius 3 around (10, 10); 7 targets
    of area 1 and aspect ratio 1:4 ... 4:1 sit at (10, 10); at every centre and for every
    target, anchors of 7 scales (0.5 ... 2 times the target area) by 7 aspect ratios:
    343 cases per centre, 1,715,000 for 5,000 centres. Each box (x, y, w, h) takes T
    steps B <- B - eta (2 - IoU) dL/dB, eta = 0.1 up to 0.8 T, 0.01 up to 0.9 T, then
    0.001, IoU detached. The table shows the total error
    E(t) = sum |x - xg| + |y - yg| + |w - wg| + |h - hg| over all cases, E(0)/E(T) and
    the final mean IoU.

    Choices: dL/dB is autograd's exact gradient. The authors' code drops the
    1/(w^2 + h^2) factor of CIoU's dv/dw, dv/dh and maps every IoU gradient to w, h as
    dr - dl instead of (dr - dl)/2; here the exact gradient is kept (w^2 + h^2 >= 2wh >= 1
    for every anchor, so no explosion is possible). After each step w and h are clamped to >= 1e-6.

    mse, a reference not in the paper, is the squared error of the SSD / Faster R-CNN
    encoding t = ((x - xa)/wa, (y - ya)/ha, log(w/wa), log(h/ha)) against the target's,
    (xa, ya, wa, ha) being the case's anchor; it descends on t itself (what a detector's
    head regresses) with the same (2 - IoU) multiplier and step schedule.
    """
    names = tuple(name.strip() for name in losses.split(",") if name.strip())
    unknown = [name for name in names if name not in LOSSES]
    if not names:
        raise typer.BadParameter(f"name at least one of {', '.join(LOSSES)}", param_hint="--losses")
    if unknown:
        raise typer.BadParameter(f"{', '.join(map(repr, unknown))} not in {', '.join(LOSSES)}", param_hint="--losses")
    if points < 1:
        raise typer.BadParameter(f"must be >= 1, got {points}", param_hint="--points")
    if iterations < 1:
        raise typer.BadParameter(f"must be >= 1, got {iterations}", param_hint="--iterations")
    if dtype not in DTYPES:
        raise typer.BadParameter(f"{dtype!r} not in {', '.join(DTYPES)}", param_hint="--dtype")
    config = SimulationConfig(points=points, iterations=iterations, seed=seed, losses=names, dtype=dtype)
    start = time.perf_counter()
    result = run_simulation(config, progress=lambda line: typer.echo(line, err=True))
    typer.echo(f"total {time.perf_counter() - start:.1f} s", err=True)
    rows = result.table_rows()
    table = Table(title=f"Regression simulation: {result.cases:,} cases, T = {iterations}, total error E(t)")
    for i, title in enumerate(rows[0]):
        table.add_column(title, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row.values())
    console.print(table)
    if csv is not None:
        result.write_csv(csv)
    if json is not None:
        result.write_json(json)
