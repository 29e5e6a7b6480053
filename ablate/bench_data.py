"""``ablate bench data`` and ``ablate bench cache``: is the data pipeline fast enough, and what it costs.

``bench data`` times, for a trial config, the loader (decode or cache read, augment, letterbox,
collate: a whole ``DataLoader`` epoch over ``batches x batch_size`` images) at each worker count
and cache mode, beside the model's own training rate (forward + loss + backward + optimizer step
on a batch of the same size and preset, with the trial's torch threads), in the same run and
interleaved: every repeat times the model, then every loader candidate once. The figure of merit
is each candidate's images/s over the model's (median over repeats of the per-repeat ratio): at
least 2 means the loader could feed two such models, so it does not starve one.

At the config's own image size the config's dataset is used; at any other ``--size`` a synthetic
JPEG set of that size (generated once into ``data/bench/``), so the decoder is a real one.

``bench cache`` starts N processes at once (N concurrent trials on a node), each opening the
config's training set with one cache mode and reading every image once, and reports their resident
memory: RSS (which counts a shared file's pages in every process that touched them) and PSS
(shared pages divided among the processes that map them: what the node really spends).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import TrialConfig

#: Where ``bench data`` generates its synthetic JPEG sets for sizes other than the config's.
BENCH_DATA_ROOT = Path("data/bench")


@dataclass
class DataBenchRow:
    size: int
    cache: str  # the mode asked for
    cache_used: str  # what it resolved to (auto -> disk / none)
    workers: int
    images_per_second: float  # loader, median over repeats
    per_worker: float  # images/s per process that loads (workers, or the training process with 0)
    model_images_per_second: float  # the model's training rate in the same repeats (median)
    ratio: float  # median over repeats of loader / model
    prepare_seconds: float  # dataset construction: cache build or open


def bench_config(base: TrialConfig, size: int, images: int) -> TrialConfig:
    """``base`` at input size ``size``: its own dataset at its own size, else a synthetic JPEG set of
    ``size`` px with ``images`` training images under :data:`BENCH_DATA_ROOT`."""
    data = base.data.model_dump()
    if size != base.data.image_size:
        data = {**data, "synthetic": {"root": BENCH_DATA_ROOT / f"synth{size}-jpeg-{images}", "train": images, "val": 8,
                                      "size": size, "seed": 0, "format": "jpeg"}, "coco": None, "image_size": size}
    return TrialConfig.model_validate({**base.model_dump(), "data": data})


def _model_step_fn(config: TrialConfig, num_classes: int, images: torch.Tensor, targets: list[dict[str, Any]],
                   device: torch.device) -> Callable[[], None]:
    """One training step of ``config``'s detector and loss on a fixed batch, as ``train`` runs it on
    ``device`` (AMP on CUDA; the step waits for the device before it returns)."""
    from .data.transforms import batch_input
    from .detect import build_criterion, get_layout
    from .detect.model import ModelConfig, build_model
    from .train import _targets, param_groups

    recipe = config.loss_recipe()
    layout = get_layout(recipe.anchors)
    size = config.data.image_size
    criterion = build_criterion(recipe, num_classes, size, device, layout)
    torch.manual_seed(0)
    model = build_model(recipe, layout, num_classes, ModelConfig(**config.model.model_dump()))
    model = model.to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, fused=True)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    pinned = images.pin_memory() if cuda else images

    def step() -> None:
        x = batch_input(pinned, targets, device)  # the training process's share: copy, float, colour jitter
        tg = _targets(targets, device)
        with torch.autocast(device.type, enabled=cuda):
            pred = model(x)
        out = criterion(pred.float(), tg)
        opt.zero_grad(set_to_none=True)
        scaler.scale(out.total).backward()
        scaler.step(opt)
        scaler.update()
        if cuda:
            torch.cuda.synchronize(device)

    return step


def bench_data(base: TrialConfig, sizes: list[int], workers: list[int], caches: list[str], batches: int = 8,
               repeats: int = 3, images: int = 128, progress: Callable[[str], None] | None = None,
               device: str = "cpu") -> list[DataBenchRow]:
    """Loader images/s per (size, cache, workers) beside the model's training images/s on ``device``
    (module docstring)."""
    from .data.coco import make_loader
    from .train import build_data, cpu_share, resolve_device

    dev = resolve_device(device)

    say = progress or (lambda _: None)
    threads = cpu_share(base)
    torch.set_num_threads(threads)
    rows: list[DataBenchRow] = []
    for size in sizes:
        config = bench_config(base, size, images)
        bs = config.train.batch_size
        n = batches * bs
        candidates = []  # (cache, cache_used, workers, loader, prepare_s)
        for cache in caches:
            c = TrialConfig.model_validate({**config.model_dump(), "data": {**config.data.model_dump(), "cache": cache}})
            t0 = time.perf_counter()
            train_set, _ = build_data(c, say)
            prepare = time.perf_counter() - t0
            if len(train_set) < n:
                raise ValueError(f"{train_set.ann_file}: {len(train_set)} training images, fewer than the "
                                 f"{batches} batches x {bs} images a timing reads (lower --batches)")
            for w in workers:
                loader, sampler = make_loader(train_set, bs, shuffle=False, workers=w, prefetch=config.data.prefetch,
                                              pin_memory=dev.type == "cuda")
                sampler.num_samples = n  # every timing is one epoch over the first n images
                candidates.append((cache, train_set.cache, w, loader, prepare))
        first_images, first_targets = next(iter(candidates[0][3]))
        step = _model_step_fn(config, train_set.num_classes, first_images, first_targets, dev)
        say(f"bench data: {size} px, batch {bs}, {n} images per timing, model on "
            + (str(dev) if dev.type == "cuda" else f"{threads} thread{'s' * (threads != 1)}") + "; warming up")
        step()
        for _, _, _, loader, _ in candidates:  # warm: worker start-up, memory caches filled
            for _ in loader:
                pass
        model_ips: list[float] = []
        loader_ips: dict[int, list[float]] = {i: [] for i in range(len(candidates))}
        for r in range(repeats):
            t0 = time.perf_counter()
            for _ in range(min(batches, 3)):
                step()
            model_ips.append(min(batches, 3) * bs / (time.perf_counter() - t0))
            for i, (_, _, _, loader, _) in enumerate(candidates):
                t0 = time.perf_counter()
                seen = sum(x.shape[0] for x, _ in loader)
                loader_ips[i].append(seen / (time.perf_counter() - t0))
            say(f"  repeat {r + 1}/{repeats}: model {model_ips[-1]:.1f} img/s; loader "
                + ", ".join(f"{c[0]}/{c[2]}w {loader_ips[i][-1]:.0f}" for i, c in enumerate(candidates)))
        for i, (cache, used, w, loader, prepare) in enumerate(candidates):
            ips = statistics.median(loader_ips[i])
            ratio = statistics.median(a / b for a, b in zip(loader_ips[i], model_ips))
            rows.append(DataBenchRow(size, cache, used, w, ips, ips / max(w, 1), statistics.median(model_ips),
                                     ratio, prepare))
            del loader
        candidates.clear()
    return rows


# --------------------------------------------------------------------------- bench cache
def _memory_kib() -> dict[str, int]:
    """This process's ``Rss`` and ``Pss`` (KiB) from ``/proc/self/smaps_rollup``."""
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                out[key.lower()] = int(rest.split()[0])
    return out


def _cache_trial(config_json: str, barrier, results) -> None:
    """One 'trial': open the training set with its cache mode, read every image once, report memory."""
    from .train import build_data

    torch.set_num_threads(1)
    config = TrialConfig.model_validate_json(config_json)
    train_set, _ = build_data(config)
    before = _memory_kib()
    for i in range(len(train_set)):
        train_set[i]
    barrier.wait()  # every process has read everything: measure together
    after = _memory_kib()
    results.put({"before": before, "after": after, "cache": train_set.cache})
    barrier.wait()  # keep the maps alive until all have measured


@dataclass
class CacheBenchRow:
    trials: int
    cache: str
    rss_mib: float  # summed over the processes, after reading every image
    pss_mib: float
    rss_growth_mib: float  # summed growth while reading (what the images cost)
    pss_growth_mib: float
    seconds: float


def bench_cache(base: TrialConfig, trials: list[int], caches: list[str],
                progress: Callable[[str], None] | None = None) -> list[CacheBenchRow]:
    """Resident memory of N concurrent processes reading the training set once with each cache mode."""
    from .train import build_data

    say = progress or (lambda _: None)
    for cache in caches:  # build (or open) every cache once before the timed processes start
        build_data(TrialConfig.model_validate({**base.model_dump(), "data": {**base.data.model_dump(), "cache": cache}}),
                   say)
    ctx = mp.get_context("spawn")
    rows = []
    for n in trials:
        for cache in caches:
            c = TrialConfig.model_validate({**base.model_dump(), "data": {**base.data.model_dump(), "cache": cache}})
            barrier, results = ctx.Barrier(n), ctx.Queue()
            t0 = time.perf_counter()
            procs = [ctx.Process(target=_cache_trial, args=(c.model_dump_json(), barrier, results)) for _ in range(n)]
            for p in procs:
                p.start()
            got = [results.get(timeout=900) for _ in range(n)]
            for p in procs:
                p.join(timeout=60)
            seconds = time.perf_counter() - t0
            if any(p.exitcode != 0 for p in procs):
                raise RuntimeError(f"bench cache: a process for cache {cache} exited with {[p.exitcode for p in procs]}")

            def mib(key: str, when: str = "after") -> float:
                return sum(g[when][key] for g in got) / 1024

            row = CacheBenchRow(n, cache, mib("rss"), mib("pss"), mib("rss") - mib("rss", "before"),
                                mib("pss") - mib("pss", "before"), seconds)
            rows.append(row)
            say(f"bench cache: {n} trials, cache {cache}: RSS {row.rss_mib:.0f} MiB (+{row.rss_growth_mib:.0f} reading), "
                f"PSS {row.pss_mib:.0f} MiB (+{row.pss_growth_mib:.0f})")
    return rows


def cores_to_feed(gpu_images_per_second: float, per_core: float) -> int:
    """Loader cores a trial needs to feed ``gpu_images_per_second`` at ``per_core`` images/s each."""
    return math.ceil(gpu_images_per_second / per_core) if per_core > 0 else 0
