"""Benchmarks that print figures: ``ablate bench loss`` and ``ablate bench train``.

The loss benchmark times, for each preset, assignment + loss forward + backward on a
batch of random head outputs with the preset's own head layout, and in the same run

* a *floor* per output tensor: ``binary_cross_entropy_with_logits`` forward + backward
  over the same raw output tensor, which reads every prediction once;
* a *reference*: a YOLOv5-style loss written from its published formulas
  (:mod:`ablate.bench_loss_ref`) on the values of the ``[B, N, 5 + C]`` tensor of a
  three-level, three-anchor head, the one yolov3, yolov4 and scaled_yolov4 read, copied
  once into the per-level ``[B, A, H, W, 5 + C]`` tensors YOLOv5's head hands its loss
  (read as views of the one tensor, its backward would also pay for assembling that
  tensor's gradient level by level: ~3x the time).

Each repeat times every candidate once, interleaved: in preset order, each floor just
before the first preset that reads its tensor (the reference right after the floor of the
tensor it shares), then again in the next repeat, after one untimed warm-up round. A
preset's ratio is the median over repeats of its time divided by the floor's (or the
reference's) in the same repeat, seconds apart, so that load which drifts over a run hits
both sides of a ratio alike (the ratio of the medians would pair a preset's quiet repeats
with the floor's busy ones). Machines are shared and noisy: a ratio measured in one run is
comparable, absolute ms are not.
"""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .detect import PRESETS, Targets, build_criterion, build_priors, get_layout, preset

#: Goals of the loss benchmark: a YOLO-style preset (one with objectness) within the
#: reference's time, one with an ignore mask within 1.3x of it; every preset within the floor
#: (SSD, RetinaNet: 1x; the YOLO-style presets, whose goal is the reference: 2x).
GOAL_REFERENCE, GOAL_REFERENCE_IGNORE, GOAL_FLOOR, GOAL_FLOOR_YOLO = 1.0, 1.3, 1.0, 2.0
#: The head layout of the reference's tensor (three levels x three anchors).
REFERENCE_LAYOUT = "scaled_yolov4"
#: Operators per candidate in ``--profile``.
PROFILE_TOP = 8


@dataclass
class LossBenchRow:
    preset: str
    anchors: int
    channels: int
    num_pos: float
    loss_ms: float  # median over repeats
    floor_ms: float  # median over repeats, the floor on this preset's tensor
    vs_floor: float  # median over repeats of loss / floor in the same repeat
    vs_reference: float | None  # the same against the reference; None for presets without objectness
    goal_reference: float | None
    goal_floor: float

    @property
    def met(self) -> bool:
        ok = self.vs_floor <= self.goal_floor
        return ok and (self.goal_reference is None or (self.vs_reference or 0.0) <= self.goal_reference)


@dataclass
class LossBench:
    """One run of the loss benchmark."""

    rows: list[LossBenchRow]
    reference_ms: float  # median over repeats
    reference_rows: int  # the reference's target rows (its positives, duplicates included)
    floors: dict[str, float]  # "floor NxK" -> median ms
    order: list[str]  # the candidates in the order each repeat times them
    times: dict[str, list[float]]  # candidate -> ms per repeat
    profiles: dict[str, list[dict[str, object]]] = field(default_factory=dict)  # candidate -> top operators


def random_targets(batch: int, gts: int, size: int, classes: int, generator: torch.Generator) -> Targets:
    """``gts`` random boxes per image (4-60% of the side, inside the image)."""
    wh = (torch.rand(batch, gts, 2, generator=generator) * 0.56 + 0.04) * size
    xy = torch.rand(batch, gts, 2, generator=generator) * (size - wh)
    boxes = torch.cat((xy, xy + wh), -1)  # [B, G, 4]
    labels = torch.randint(0, classes, (batch, gts), generator=generator)
    return Targets(boxes, labels, torch.ones(batch, gts, dtype=torch.bool))


def floor_label(n: int, k: int) -> str:
    return f"floor {n}x{k}"


def loss_goals(name: str) -> tuple[float | None, float]:
    """``(goal against the reference or None, goal against the floor)`` of a preset."""
    r = preset(name)
    if not r.has_objectness:
        return None, GOAL_FLOOR
    return (GOAL_REFERENCE_IGNORE if r.ignore_thresh is not None else GOAL_REFERENCE), GOAL_FLOOR_YOLO


def _top_ops(prof, device: torch.device) -> list[dict[str, object]]:
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:PROFILE_TOP]
    out = []
    for e in events:
        row: dict[str, object] = {"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3), "calls": e.count}
        if device.type == "cuda":
            row["self_cuda_ms"] = round(getattr(e, "self_device_time_total", 0.0) / 1e3, 3)
        out.append(row)
    return out


def bench_loss(
    presets: list[str] | None = None,
    batch: int = 16,
    size: int = 640,
    classes: int = 80,
    gts: int = 10,
    repeats: int = 7,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    device: str = "cpu",
    amp: bool = False,
    profile: bool = False,
    on_time: Callable[[str, int, float], None] | None = None,
) -> LossBench:
    """Time each preset's criterion (forward + backward), the floor and the reference, interleaved.

    Every candidate reads the tensor of its head's shape, made once (``[batch, N, K]``, one per
    shape: the presets of one layout share it) with the same targets. ``device="cuda"`` times on
    the GPU (synchronising after each step); ``amp`` makes the head outputs fp16, which the
    presets and the floor read through ``.float()`` (as ablate's trainer does) and the
    reference under ``autocast`` (as YOLOv5's does). ``profile`` runs one step of each
    candidate under ``torch.profiler`` after the timing and keeps its top operators by self
    CPU time. ``on_time(candidate, repeat, ms)`` is called after each timed step.
    """
    from .bench_loss_ref import Yolov5Loss, yolov5_targets

    names = list(dict.fromkeys(presets or PRESETS))  # each once
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    dtype = torch.float16 if amp else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    targets = random_targets(batch, gts, size, classes, torch.Generator().manual_seed(seed))
    targets = Targets(targets.boxes.to(dev), targets.labels.to(dev), targets.valid.to(dev))

    preds: dict[tuple[int, int], torch.Tensor] = {}

    def tensor(n: int, k: int) -> torch.Tensor:
        if (n, k) not in preds:
            g = torch.Generator().manual_seed(seed + 1)
            preds[(n, k)] = (torch.randn(batch, n, k, generator=g) * 2).to(dev, dtype).requires_grad_(True)
        return preds[(n, k)]

    ref_priors = build_priors(get_layout(REFERENCE_LAYOUT), size, device=dev)
    ref_loss = Yolov5Loss(ref_priors, classes)
    # YOLOv5's per-level outputs [B, A, H, W, 5 + C], the values of the shared tensor
    ref_levels = [v.detach().contiguous().requires_grad_(True)
                  for v in ref_loss.levels(tensor(ref_priors.num, 5 + classes))]
    t6 = yolov5_targets(targets, size)
    reference_rows = sum(int(lv[0].numel()) for lv in ref_loss.build_targets(t6))

    def reference_step() -> None:
        for v in ref_levels:
            v.grad = None
        with torch.autocast("cuda", enabled=amp) if cuda else contextlib.nullcontext():
            loss, _ = ref_loss(ref_levels, t6)
        loss.backward()
        sync()

    num_pos: dict[str, float] = {}
    shape: dict[str, tuple[int, int]] = {}
    preset_steps: dict[str, Callable[[], None]] = {}
    for name in names:
        crit = build_criterion(preset(name), classes, size, device=dev)
        shape[name] = (crit.priors.num, crit.channels)
        pred = tensor(*shape[name])

        def step(crit=crit, pred=pred, name=name) -> None:
            pred.grad = None
            out = crit(pred.float() if amp else pred, targets)
            out.total.backward()
            sync()
            num_pos[name] = float(out.stats["num_pos"])

        preset_steps[name] = step

    floor_steps: dict[str, Callable[[], None]] = {}
    for (n, k), pred in preds.items():
        zeros = torch.zeros(pred.shape, device=dev)

        def floor_step(pred=pred, zeros=zeros) -> None:
            pred.grad = None
            F.binary_cross_entropy_with_logits(pred.float() if amp else pred, zeros).backward()
            sync()

        floor_steps[floor_label(n, k)] = floor_step

    # each floor just before the first preset that reads its tensor, the reference with the floor of its own
    ref_shape = (ref_priors.num, 5 + classes)
    order: list[str] = []
    for name in names:
        if floor_label(*shape[name]) not in order:
            order.append(floor_label(*shape[name]))
            order += ["reference"] if shape[name] == ref_shape else []
        order.append(name)
    if "reference" not in order:
        order[:0] = [floor_label(*ref_shape), "reference"]
    steps = {**floor_steps, "reference": reference_step, **preset_steps}
    for c in order:  # warm-up round, untimed
        steps[c]()
    times: dict[str, list[float]] = {c: [] for c in order}
    for rep in range(repeats):
        for c in order:
            t0 = time.perf_counter()
            steps[c]()
            ms = (time.perf_counter() - t0) * 1e3
            times[c].append(ms)
            if on_time:
                on_time(c, rep, ms)
        if progress:
            progress(f"repeat {rep + 1}/{repeats}: reference {times['reference'][-1]:.0f} ms, "
                     + ", ".join(f"{n} {times[n][-1]:.0f}" for n in names))

    profiles: dict[str, list[dict[str, object]]] = {}
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        for c in order:
            with torch_profile(activities=activities) as prof:
                steps[c]()
            profiles[c] = _top_ops(prof, dev)

    def per_repeat_ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    rows = []
    for name in names:
        fl = floor_label(*shape[name])
        goal_ref, goal_floor = loss_goals(name)
        rows.append(LossBenchRow(
            name, shape[name][0], shape[name][1], num_pos[name], statistics.median(times[name]),
            statistics.median(times[fl]), per_repeat_ratio(name, fl),
            per_repeat_ratio(name, "reference") if goal_ref is not None else None, goal_ref, goal_floor))
    return LossBench(rows, statistics.median(times["reference"]), reference_rows,
                     {c: statistics.median(times[c]) for c in floor_steps}, order, times, profiles)


def environment() -> dict[str, object]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
    }


def write_loss_json(path: Path, result: LossBench, settings: dict[str, object]) -> None:
    doc = {"settings": settings, "environment": environment(),
           "ratios": "median over repeats of the per-repeat ratio (candidates timed interleaved in each repeat)",
           "reference": {"ms": result.reference_ms, "rows": result.reference_rows, "layout": REFERENCE_LAYOUT},
           "floors": result.floors, "order": result.order, "times_ms": result.times,
           "rows": [asdict(r) for r in result.rows]}
    if result.profiles:
        doc["profiles"] = result.profiles
    path.write_text(json.dumps(doc, indent=2))


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
