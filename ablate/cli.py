"""The ``ablate`` command line (Typer)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from . import __version__
from .console import console, err

app = typer.Typer(
    name="ablate",
    help="Loss ablations of one-stage object detectors (YOLOv1-v4, Scaled-YOLOv4, SSD, RetinaNet).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
bench_app = typer.Typer(help="Benchmarks that print figures (and ratios to a floor measured in the same run).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")

def fail(message: str) -> None:
    """Print a one-line error and exit 2 (no traceback for user errors)."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _version(value: bool) -> None:
    if value:
        console.print(f"ablate {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """ablate: one YAML job enumerates loss variants; each trains the same detector; COCO mAP is compared."""


@app.command()
def presets(
    name: Optional[str] = typer.Argument(None, help="Show one preset's full recipe."),
    override: list[str] = typer.Option([], "--set", "-s", help="Override a field, e.g. --set box_loss=ciou."),
) -> None:
    """List the seed systems' loss recipes, or show one (with overrides applied)."""
    from .detect.recipe import PRESETS, preset

    if name is None:
        table = Table(title="presets")
        for col in ("preset", "anchors", "coding", "assigner", "box", "obj", "cls", "negatives", "normalize"):
            table.add_column(col)
        for key, r in PRESETS.items():
            table.add_row(key, r.anchors, r.coding, r.assigner, r.box_loss, str(r.obj_loss), r.cls_loss,
                          r.neg_mining if r.neg_mining != "none" else
                          (f"ignore>{r.ignore_thresh}" if r.ignore_thresh is not None else "-"), r.normalize)
        console.print(table)
        return
    try:
        recipe = preset(name).override_from(override)
    except ValueError as e:
        fail(str(e))
    base = preset(name)
    table = Table(title=f"{name}" + (" (with overrides)" if override else ""))
    table.add_column("field")
    table.add_column("value")
    for key, value in recipe.to_dict().items():
        mark = " [yellow](changed)[/]" if getattr(base, key) != value else ""
        table.add_row(key, f"{value!r}{mark}")
    console.print(table)


def _register_simulate() -> None:
    from .simulate import simulate_command

    app.command("simulate")(simulate_command)


_register_simulate()


@bench_app.command("loss")
def bench_loss_cmd(
    batch: int = typer.Option(16, help="Images per batch."),
    size: int = typer.Option(640, help="Input size in pixels (square)."),
    classes: int = typer.Option(80, help="Number of classes."),
    gts: int = typer.Option(10, help="Ground truths per image."),
    repeats: int = typer.Option(7, help="Timed rounds; each times every candidate once (medians reported)."),
    preset_names: Optional[str] = typer.Option(None, "--presets", help="Comma-separated presets (default: all)."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    amp: bool = typer.Option(False, "--amp", help="fp16 head outputs, as under mixed precision (needs --device cuda)."),
    profile: bool = typer.Option(False, "--profile", help="Profile one step per candidate; print its top operators."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the figures (and profiles) as JSON."),
) -> None:
    """Assignment + loss forward + backward per preset against, in the same run and interleaved, a
    YOLOv5-style reference loss and a BCE-with-logits floor over the same raw output tensor [B, N, K].
    Goals: YOLO-style presets <= 1x the reference (<= 1.3x with an ignore mask); SSD, RetinaNet <= 1x the floor."""
    import torch

    from .bench import bench_loss, environment, write_loss_json
    from .detect.recipe import PRESETS

    names = [n.strip() for n in preset_names.split(",")] if preset_names else list(PRESETS)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        fail(f"--presets: unknown preset {unknown[0]!r}; choose from {', '.join(PRESETS)}")
    for opt, v in (("--batch", batch), ("--size", size), ("--classes", classes), ("--repeats", repeats)):
        if v < 1:
            fail(f"{opt}: must be >= 1, got {v}")
    if gts < 0:
        fail(f"--gts: must be >= 0, got {gts}")
    if device not in ("cpu", "cuda"):
        fail(f"--device: unknown device {device!r}; choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        fail("--device: cuda, but torch sees no CUDA device here")
    if amp and device != "cuda":
        fail("--amp: mixed precision needs --device cuda")
    if threads:
        torch.set_num_threads(threads)
    env = environment()
    err.print(f"bench loss: B={batch}, {size}px, {classes} classes, {gts} GTs/image, {repeats} repeats, "
              f"{device}{' AMP' if amp else ''}, torch {env['torch']} on {env['threads']} threads", highlight=False)
    res = bench_loss(names, batch, size, classes, gts, repeats, device=device, amp=amp, profile=profile,
                     progress=lambda m: err.print(m, highlight=False))

    def ratio(value: float | None, goal: float | None) -> str:
        if value is None:
            return "-"
        return f"[{'green' if goal is None or value <= goal else 'red'}]{value:.2f}x[/]"

    table = Table(title=f"loss: assignment + forward + backward, B={batch}, {size}px, {classes} classes, {gts} GTs",
                  caption=f"reference (YOLOv5-style) {res.reference_ms:.1f} ms, {res.reference_rows} rows; floors "
                          + ", ".join(f"{k.removeprefix('floor ')} {v:.1f} ms" for k, v in res.floors.items())
                          + f"; ratios: median of per-repeat ratios over {repeats} repeats")
    for col in ("preset", "anchors", "positives", "loss ms", "vs reference", "vs floor"):
        table.add_column(col, justify="right" if col != "preset" else "left")
    for r in res.rows:
        table.add_row(r.preset, f"{r.anchors:,}", f"{r.num_pos:.0f}", f"{r.loss_ms:.1f}",
                      ratio(r.vs_reference, r.goal_reference), ratio(r.vs_floor, r.goal_floor))
    console.print(table)
    missed = [r.preset for r in res.rows if not r.met]
    console.print("goals (reference <= 1x, <= 1.3x with an ignore mask; floor <= 1x SSD/RetinaNet, <= 2x YOLO-style): "
                  + ("[green]met[/]" if not missed else f"[red]NOT met[/] by {', '.join(missed)}"), highlight=False)
    for cand, ops in res.profiles.items():
        console.print(f"profile {cand}: one step, top operators by self CPU time", highlight=False)
        for o in ops:
            cuda_ms = f" (CUDA {o['self_cuda_ms']:.1f} ms)" if "self_cuda_ms" in o else ""
            console.print(f"  {o['self_cpu_ms']:9.1f} ms {o['calls']:5d}x  {o['op']}{cuda_ms}", highlight=False)
    if json_path:
        write_loss_json(json_path, res, {"batch": batch, "size": size, "classes": classes, "gts": gts,
                                         "repeats": repeats, "device": device, "amp": amp})
        err.print(f"wrote {json_path}")


@bench_app.command("eval")
def bench_eval_cmd(
    images: int = typer.Option(5000, help="Images of the COCO-like ground truth (boxes only, no image files)."),
    dets: int = typer.Option(100, help="Detections per image (perturbed ground truth, then false positives)."),
    repeats: int = typer.Option(3, help="Interleaved repeats (median reported)."),
    postprocess_batch: int = typer.Option(16, "--postprocess-batch", help="Batch of the post-processing timing "
                                          "(yolov3, 640 px, 80 classes); 0 skips it."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the figures as JSON."),
) -> None:
    """COCOeval seconds per evaluation with pycocotools (the reference) and faster-coco-eval on the
    same detections, their ratio and the largest difference of their numbers; and batched
    post-processing vs the per-image loop it replaced."""
    from .bench import environment
    from .bench_eval import bench_eval, write_eval_json

    for opt, v in (("--images", images), ("--dets", dets), ("--repeats", repeats)):
        if v < 1:
            fail(f"{opt}: must be >= 1, got {v}")
    if postprocess_batch < 0:
        fail(f"--postprocess-batch: must be >= 0, got {postprocess_batch}")
    env = environment()
    err.print(f"bench eval: {images} images, {dets} detections/image, {repeats} repeats, "
              f"torch {env['torch']} on {env['threads']} threads", highlight=False)
    try:
        b = bench_eval(images, repeats, dets, postprocess_batch=postprocess_batch,
                       progress=lambda m: err.print(m, highlight=False))
    except ImportError as e:
        fail(str(e))
    table = Table(title=f"COCOeval (bbox): {b.images:,} images, {b.annotations:,} boxes, {b.detections:,} detections")
    for col in ("backend", "s / evaluation", "ratio"):
        table.add_column(col, justify="right" if col != "backend" else "left")
    for name, s in b.median_s.items():
        table.add_row(name, f"{s:.2f}", f"{b.median_s['pycocotools'] / s:.2f}x")
    console.print(table)
    agree = "[green]agree[/]" if b.max_abs_diff <= 1e-4 else "[red]DISAGREE[/]"
    console.print(f"12 numbers and per-class AP: max |difference| {b.max_abs_diff:.2g} ({agree} to 1e-4); "
                  f"AP {b.metrics['AP']:.4f}, AP50 {b.metrics['AP50']:.4f}")
    if b.postprocess:
        p = b.postprocess
        console.print(f"postprocess ({p['preset']}, B={p['batch']}, {p['size']} px, {p['classes']} classes, "
                      f"{p['anchors']:,} anchors, {p['threads']} threads): batched {p['batched_ms']:.0f} ms, "
                      f"per-image loop {p['per_image_ms']:.0f} ms, ratio {p['ratio']:.2f}x")
    if json_path:
        write_eval_json(json_path, b, env)
        err.print(f"wrote {json_path}")


@bench_app.command("train")
def bench_train_cmd(
    config_path: Path = typer.Option(Path("configs/quickstart.yaml"), "--config", help="The base trial (data, model, budget)."),
    preset_names: Optional[str] = typer.Option(None, "--presets", help="Comma-separated presets (default: all)."),
    parallel: int = typer.Option(1, help="Trials at once, each in its own process with the config's thread count."),
    sets: list[str] = typer.Option([], "--set", "-s", help="Override a base config value, e.g. --set train.epochs=5."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the figures as JSON."),
) -> None:
    """Train the quickstart configuration once per preset (same data, detector and budget) and
    print each preset's AP50, AP, training time and images per second. Recipe overrides (the
    config's `recipe:`, `--set recipe.box_loss=ciou`) apply over every preset's recipe."""
    import json

    from .bench import bench_train, environment, goal_line
    from .config import ConfigError, load_trial_config
    from .data.coco import DatasetError
    from .detect.recipe import PRESETS

    names = [n.strip() for n in preset_names.split(",")] if preset_names else list(PRESETS)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        fail(f"--presets: unknown preset {unknown[0]!r}; choose from {', '.join(PRESETS)}")
    if parallel < 1:
        fail(f"--parallel: must be >= 1, got {parallel}")
    try:
        base = load_trial_config(config_path, _parse_sets(sets))
    except ConfigError as e:
        fail(str(e))
    err.print(f"bench train: {', '.join(names)} on {config_path} ({base.train.epochs} epochs, "
              f"{base.threads or 'default'} thread(s) each, {parallel} at once"
              f"{f', recipe overrides {base.recipe} on every preset' if base.recipe else ''})", highlight=False)
    try:
        rows = bench_train(base, names, parallel, progress=lambda m: err.print(m, highlight=False))
    except (DatasetError, FileExistsError, ConfigError) as e:
        fail(str(e))
    table = Table(title=f"train: {config_path}, {base.train.epochs} epochs, threads {base.threads or 'default'}"
                        + (f", recipe overrides {base.recipe}" if base.recipe else ""))
    for col in ("preset", "status", "AP50", "AP", "train s", "img/s"):
        table.add_column(col, justify="left" if col in ("preset", "status") else "right")
    for r in rows:
        table.add_row(r.preset, r.status, f"{r.AP50:.3f}", f"{r.AP:.3f}", f"{r.train_seconds:.0f}", f"{r.images_per_second:.1f}")
    console.print(table)
    goal = goal_line(rows, base.threads, parallel)
    if goal:
        console.print(goal, highlight=False)
    if json_path:
        from dataclasses import asdict

        json_path.write_text(json.dumps({"config": base.resolved(), "recipe_overrides": base.recipe,
                                         "environment": environment(),
                                         "rows": [asdict(r) for r in rows]}, indent=2))
        err.print(f"wrote {json_path}")


def _int_list(text: str, option: str, low: int = 0) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{option}: expected comma-separated integers, got {text!r}")
    if not values or any(v < low for v in values):
        fail(f"{option}: expected comma-separated integers >= {low}, got {text!r}")
    return values


def _cache_list(text: str, option: str = "--cache") -> list[str]:
    from .data.coco import CACHE_MODES

    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in CACHE_MODES]
    if bad or not values:
        fail(f"{option}: unknown cache mode {bad[0] if bad else text!r}; choose from {', '.join(CACHE_MODES)}")
    return values


@bench_app.command("data")
def bench_data_cmd(
    config_path: Path = typer.Option(Path("configs/quickstart.yaml"), "--config", help="The trial whose data and model are timed."),
    workers: Optional[str] = typer.Option(None, help="Comma-separated loader worker counts (default: 0, 1, 2 and the "
                                          "trial's own count)."),
    size: Optional[str] = typer.Option(None, help="Comma-separated input sizes (default: the config's and 640). Other "
                                       "than the config's: a synthetic JPEG set of that size under data/bench/."),
    cache: str = typer.Option("none,memory,disk", help="Comma-separated cache modes (auto, none, memory, disk)."),
    batches: int = typer.Option(8, help="Batches per loader timing (one epoch over batches x batch_size images)."),
    repeats: int = typer.Option(3, help="Interleaved repeats (median reported)."),
    images: int = typer.Option(128, help="Training images of a generated JPEG set."),
    device: str = typer.Option("cpu", help="Where the model trains: cpu, cuda (AMP, as a trial runs) or auto."),
    sets: list[str] = typer.Option([], "--set", "-s", help="Override a config value, e.g. --set train.batch_size=16."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the figures as JSON."),
) -> None:
    """Loader images/s (decode or cache read, augment, letterbox, collate) per worker count and cache
    mode, beside the model's training images/s for the same config, timed interleaved in one run,
    and their ratio. Goal: at least 2x at the trial's own worker count."""
    import json
    from dataclasses import asdict

    from .bench import environment
    from .bench_data import bench_data
    from .config import ConfigError, load_trial_config
    from .data.coco import DatasetError
    from .train import loader_workers

    try:
        base = load_trial_config(config_path, _parse_sets(sets))
    except ConfigError as e:
        fail(str(e))
    own = loader_workers(base)
    worker_list = _int_list(workers, "--workers") if workers else sorted({0, 1, 2, own})
    sizes = _int_list(size, "--size", 32) if size else sorted({base.data.image_size, 640})
    bad = [s for s in sizes if s % 32]
    if bad:
        fail(f"--size: {bad[0]} is not a multiple of 32")
    caches = _cache_list(cache)
    for opt, v in (("--batches", batches), ("--repeats", repeats), ("--images", images)):
        if v < 1:
            fail(f"{opt}: must be >= 1, got {v}")
    if device not in ("cpu", "cuda", "auto"):
        fail(f"--device: expected cpu, cuda or auto, got {device!r}")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        fail("--device: cuda was asked for but torch sees no CUDA device")
    err.print(f"bench data: {config_path} ({base.preset}, batch {base.train.batch_size}, threads "
              f"{base.threads or 'default'}; the trial's own loader workers: {own}), sizes {sizes}, workers "
              f"{worker_list}, caches {caches}", highlight=False)
    try:
        rows = bench_data(base, sizes, worker_list, caches, batches, repeats, images,
                          progress=lambda m: err.print(m, highlight=False), device=device)
    except (DatasetError, FileExistsError, ConfigError, ValueError) as e:
        fail(str(e))
    table = Table(title=f"data loader vs model training, {config_path} ({base.preset}, batch {base.train.batch_size})")
    for col in ("size", "cache", "workers", "loader img/s", "per process", "model img/s", "loader / model"):
        table.add_column(col, justify="right")
    for r in rows:
        mark = " (trial's)" if r.workers == own else ""
        colour = "green" if r.ratio >= 2 else "red"
        table.add_row(str(r.size), r.cache if r.cache == r.cache_used else f"{r.cache}->{r.cache_used}",
                      f"{r.workers}{mark}", f"{r.images_per_second:.0f}", f"{r.per_worker:.0f}",
                      f"{r.model_images_per_second:.1f}", f"[{colour}]{r.ratio:.1f}x[/]")
    console.print(table)
    for s in sizes:
        mine = [r for r in rows if r.size == s and r.workers == own]
        if mine:
            best = max(mine, key=lambda r: r.ratio)
            console.print(f"goal at {s} px, {own} worker(s) (the trial's): loader {best.ratio:.1f}x the model "
                          f"({best.cache}): {'met' if best.ratio >= 2 else 'NOT met'}", highlight=False)
    if json_path:
        json_path.write_text(json.dumps({"config": base.resolved(), "environment": environment(), "trial_workers": own,
                                         "rows": [asdict(r) for r in rows]}, indent=2))
        err.print(f"wrote {json_path}")


@bench_app.command("cache")
def bench_cache_cmd(
    config_path: Path = typer.Option(Path("configs/quickstart.yaml"), "--config", help="The trial whose training set is read."),
    trials: str = typer.Option("2,4", help="Comma-separated numbers of concurrent processes (trials on one node)."),
    cache: str = typer.Option("memory,disk", help="Comma-separated cache modes."),
    sets: list[str] = typer.Option([], "--set", "-s", help="Override a config value."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the figures as JSON."),
) -> None:
    """Resident memory of N concurrent trials that each read the training set once: RSS and PSS
    (shared pages divided among their processes) summed over the processes, per cache mode."""
    import json
    from dataclasses import asdict

    from .bench_data import bench_cache
    from .config import ConfigError, load_trial_config
    from .data.coco import DatasetError

    try:
        base = load_trial_config(config_path, _parse_sets(sets))
    except ConfigError as e:
        fail(str(e))
    counts, caches = _int_list(trials, "--trials", 1), _cache_list(cache)
    try:
        rows = bench_cache(base, counts, caches, progress=lambda m: err.print(m, highlight=False))
    except (DatasetError, FileExistsError, ConfigError) as e:
        fail(str(e))
    table = Table(title=f"resident memory of concurrent trials reading {config_path}'s training set once")
    for col in ("trials", "cache", "RSS MiB", "PSS MiB", "RSS growth", "PSS growth"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r.trials), r.cache, f"{r.rss_mib:.0f}", f"{r.pss_mib:.0f}", f"{r.rss_growth_mib:+.0f}",
                      f"{r.pss_growth_mib:+.0f}")
    console.print(table)
    if json_path:
        json_path.write_text(json.dumps({"config": base.resolved(), "rows": [asdict(r) for r in rows]}, indent=2))
        err.print(f"wrote {json_path}")


# --------------------------------------------------------------------------- data
data_app = typer.Typer(help="Datasets: generate the synthetic COCO-format set.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _register_data() -> None:
    from .data.synth import synth_command

    data_app.command("synth")(synth_command)


_register_data()


# --------------------------------------------------------------------------- train
def _parse_sets(items: list[str]) -> dict:
    """``--set train.epochs=3`` -> nested dict; values are YAML scalars."""
    import yaml

    out: dict = {}
    for item in items:
        if "=" not in item:
            fail(f"--set: {item!r} is not of the form key.path=value")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


@app.command("train")
def train_cmd(
    config_path: Path = typer.Argument(..., metavar="CONFIG.yaml", help="A trial configuration (see configs/quickstart.yaml)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: runs/<name>)."),
    sets: list[str] = typer.Option([], "--set", "-s", help="Override a config value, e.g. --set train.epochs=3."),
    resume: bool = typer.Option(True, "--resume/--no-resume",
                                help="Continue from the folder's checkpoint if there is one (refused when it was written "
                                     "for another config or by other code); --no-resume starts over."),
) -> None:
    """Train one trial without Ray: progress per epoch, an evaluation table each time it evaluates,
    the final metrics, and a metrics.jsonl of every reported event in the output folder."""
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .config import ConfigError, load_trial_config
    from .data.coco import DatasetError
    from .train import resume_state, train

    hint = "`--no-resume` (or another `--out`)"
    try:
        config = load_trial_config(config_path, _parse_sets(sets))
        out = out or Path("runs") / config.name
        _, _, state = resume_state(config, out, resume, hint)  # another config's or code's checkpoint: refused here
    except (ConfigError, DatasetError) as e:
        fail(str(e))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.resolved.json").write_text(json.dumps(config.resolved(), indent=2))
    metrics_file = (out / "metrics.jsonl").open("a" if state is not None else "w")  # starting over: a new file

    progress = Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.description}"), TimeElapsedColumn(), console=err, transient=False)
    task = progress.add_task("", total=config.train.epochs, epoch=0)

    def report(event: dict) -> None:
        metrics_file.write(json.dumps(event) + "\n")
        metrics_file.flush()
        if event["kind"] == "train":
            terms = " ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in event.items() if k.startswith("loss/"))
            progress.update(task, completed=event["epoch"] - 1, epoch=event["epoch"],
                            description=f"step {event['step']}  {terms}  lr {event['lr']:.2e}")
        elif event["kind"] == "epoch":
            progress.update(task, completed=event["epoch"])
        else:
            progress.console.print(_metrics_table(f"evaluation after epoch {event['epoch']}", event))

    err.print(f"training {config.name}: preset {config.preset}, {config.train.epochs} epochs, output {out}",
              highlight=False)
    try:
        with progress:
            result = train(config, report, out_dir=out, resume=resume, progress=lambda m: progress.console.print(m),
                           restart_hint=hint)
    except (DatasetError, ConfigError, FileExistsError) as e:
        fail(str(e))
    finally:
        metrics_file.close()
    (out / "final.json").write_text(json.dumps(result, indent=2))
    if result["status"] == "diverged":
        d = result["diverged_at"]
        fail(f"diverged at step {d['step']} (epoch {d['epoch']}): " +
             ", ".join(f"{k} {v}" for k, v in d["losses"].items()))
    console.print(_metrics_table(f"final ({result['status']}, {result['train_seconds']:.0f} s training, "
                                 f"{result['images_per_second']:.1f} img/s)", result))


def _metrics_table(title: str, m: dict) -> Table:
    from .evaluate import COCO_METRICS

    table = Table(title=title)
    for k in COCO_METRICS:
        table.add_column(k, justify="right")
    table.add_row(*(f"{m.get(k, float('nan')):.3f}" for k in COCO_METRICS))
    return table


# --------------------------------------------------------------------------- jobs
from . import cli_jobs  # noqa: E402,F401  (registers submit, status, resume, cancel, sync, results, query, ui, db)
from . import cli_report  # noqa: E402,F401  (registers report)
