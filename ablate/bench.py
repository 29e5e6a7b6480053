"""Benchmarks that print figures: ``ablate bench loss`` and ``ablate bench train``.

The loss benchmark times, for each preset, assignment + loss forward + backward on a
batch of random head outputs with the preset's own head layout, and in the same run a
*floor*: ``binary_cross_entropy_with_logits`` forward + backward over the same raw output
tensor, which reads every prediction once. The ratio to the floor is the figure of merit
(machines are shared and noisy; a ratio measured in one run is comparable, absolute ms
are not).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .detect import PRESETS, Targets, build_criterion, preset


@dataclass
class LossBenchRow:
    preset: str
    anchors: int
    channels: int
    loss_ms: float
    floor_ms: float
    ratio: float
    num_pos: float


def random_targets(batch: int, gts: int, size: int, classes: int, generator: torch.Generator) -> Targets:
    """``gts`` random boxes per image (4-60% of the side, inside the image)."""
    wh = (torch.rand(batch, gts, 2, generator=generator) * 0.56 + 0.04) * size
    xy = torch.rand(batch, gts, 2, generator=generator) * (size - wh)
    boxes = torch.cat((xy, xy + wh), -1)  # [B, G, 4]
    labels = torch.randint(0, classes, (batch, gts), generator=generator)
    return Targets(boxes, labels, torch.ones(batch, gts, dtype=torch.bool))


def _time(fn: Callable[[], None], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench_loss(
    presets: list[str] | None = None,
    batch: int = 16,
    size: int = 640,
    classes: int = 80,
    gts: int = 10,
    repeats: int = 5,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[LossBenchRow]:
    """Time each preset's criterion (forward + backward) against the BCE floor on the same tensor."""
    rows = []
    for name in presets or list(PRESETS):
        g = torch.Generator().manual_seed(seed)
        crit = build_criterion(preset(name), classes, size)
        pred = (torch.randn(batch, crit.priors.num, crit.channels, generator=g) * 2).requires_grad_(True)
        targets = random_targets(batch, gts, size, classes, g)
        zeros = torch.zeros_like(pred)
        num_pos = []

        def loss_step() -> None:
            pred.grad = None
            out = crit(pred, targets)
            out.total.backward()
            num_pos.append(float(out.stats["num_pos"]))

        def floor_step() -> None:
            pred.grad = None
            F.binary_cross_entropy_with_logits(pred, zeros).backward()

        # interleave so that drifting machine load hits both alike
        loss_ms, floor_ms = [], []
        for _ in range(repeats):
            loss_ms.append(_time(loss_step, 1, warmup=0 if loss_ms else 1))
            floor_ms.append(_time(floor_step, 1, warmup=0 if floor_ms else 1))
        lm, fm = statistics.median(loss_ms), statistics.median(floor_ms)
        row = LossBenchRow(name, crit.priors.num, crit.channels, lm, fm, lm / fm, statistics.mean(num_pos))
        rows.append(row)
        if progress:
            progress(f"{name}: {lm:.1f} ms vs floor {fm:.1f} ms ({lm / fm:.2f}x)")
    return rows


def environment() -> dict[str, object]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
    }


def write_loss_json(path: Path, rows: list[LossBenchRow], settings: dict[str, object]) -> None:
    path.write_text(json.dumps({"settings": settings, "environment": environment(),
                                "rows": [asdict(r) for r in rows]}, indent=2))


# --------------------------------------------------------------------------- bench train
@dataclass
class TrainBenchRow:
    preset: str
    status: str
    AP50: float
    AP: float
    train_seconds: float
    images_per_second: float
    epochs: int


#: The quickstart's goal: YOLOv3's recipe on the tiny detector, one CPU core.
TRAIN_GOAL = {"preset": "yolov3", "AP50": 0.5, "AP": 0.25, "train_seconds": 300.0}


def goal_line(rows: list[TrainBenchRow], threads: int | None, parallel: int) -> str | None:
    """One line saying whether the quickstart goal holds for the goal's preset, or None without it."""
    row = next((r for r in rows if r.preset == TRAIN_GOAL["preset"]), None)
    if row is None:
        return None
    checks = [(f"AP50 {row.AP50:.3f} >= {TRAIN_GOAL['AP50']}", row.AP50 >= TRAIN_GOAL["AP50"]),
              (f"AP {row.AP:.3f} >= {TRAIN_GOAL['AP']}", row.AP >= TRAIN_GOAL["AP"]),
              (f"{row.train_seconds:.0f} s <= {TRAIN_GOAL['train_seconds']:.0f} s of training",
               row.train_seconds <= TRAIN_GOAL["train_seconds"])]
    met = row.status == "finished" and all(ok for _, ok in checks)
    line = f"goal for {row.preset}: " + ", ".join(f"{text} {'yes' if ok else 'NO'}" for text, ok in checks)
    line += f": {'met' if met else 'NOT met'}"
    if threads != 1:
        line += f" (measured with {threads or 'default'} threads, the goal is for one core)"
    elif parallel > 1:
        line += f" ({parallel} trials shared the machine: the time is pessimistic)"
    return line


def _train_one(config_json: str) -> dict:
    """Worker: one preset's trial (a separate process, so each gets its own thread count)."""
    from .config import TrialConfig
    from .train import train

    config = TrialConfig.model_validate_json(config_json)
    res = train(config)
    return {"preset": config.preset, **{k: v for k, v in res.items() if not isinstance(v, dict)}}


def bench_configs(base, presets: list[str]) -> list:
    """``base`` (a TrialConfig) once per preset: the preset's recipe with ``base.recipe`` (the
    config's ``recipe:`` and ``--set recipe.*``) applied over it, validated per preset. A recipe
    override that a preset cannot take is a :class:`~ablate.config.ConfigError` naming both."""
    from pydantic import ValidationError

    from .config import ConfigError, TrialConfig

    configs = []
    for p in presets:
        try:
            configs.append(TrialConfig.model_validate({**base.model_dump(), "preset": p, "name": f"bench-{p}"}))
        except ValidationError as e:
            msg = e.errors()[0]["msg"].removeprefix("Value error, ")
            raise ConfigError(f"recipe overrides {base.recipe} do not fit preset {p}: {msg}") from None
    return configs


def bench_train(base, presets: list[str], parallel: int = 1,
                progress: Callable[[str], None] | None = None) -> list[TrainBenchRow]:
    """Train ``base`` (a TrialConfig) once per preset with the same data, model, budget and recipe
    overrides (:func:`bench_configs`)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    from .train import build_data

    configs = bench_configs(base, presets)  # refused before any data is generated
    build_data(base, progress)  # generate the synthetic set once, before the workers start
    rows: dict[str, TrainBenchRow] = {}
    with cf.ProcessPoolExecutor(max_workers=parallel, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_train_one, c.model_dump_json()): c.preset for c in configs}
        for fut in cf.as_completed(futures):
            r = fut.result()
            row = TrainBenchRow(r["preset"], r["status"], r.get("AP50", float("nan")), r.get("AP", float("nan")),
                                r["train_seconds"], r["images_per_second"], r["epoch"])
            rows[row.preset] = row
            if progress:
                progress(f"{row.preset}: {row.status}, AP50 {row.AP50:.3f}, AP {row.AP:.3f}, "
                         f"{row.train_seconds:.0f} s, {row.images_per_second:.1f} img/s")
    return [rows[p] for p in presets]
