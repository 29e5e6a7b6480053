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
    err.print(f"[bold red]error:[/] {message}", highlight=False)
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
    repeats: int = typer.Option(5, help="Timed repetitions (median reported)."),
    preset_names: Optional[str] = typer.Option(None, "--presets", help="Comma-separated presets (default: all)."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the figures as JSON."),
) -> None:
    """Assignment + loss forward + backward per preset vs a BCE-with-logits floor over the same raw
    output tensor [B, N, K] (which reads every prediction once), on the CPU. Goal: each preset within 2x."""
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
    if threads:
        torch.set_num_threads(threads)
    env = environment()
    err.print(f"bench loss: B={batch}, {size}px, {classes} classes, {gts} GTs/image, "
              f"{repeats} repeats, torch {env['torch']} on {env['threads']} threads", highlight=False)
    rows = bench_loss(names, batch, size, classes, gts, repeats, progress=lambda m: err.print(m, highlight=False))
    table = Table(title=f"loss: assignment + forward + backward, B={batch}, {size}px, {classes} classes, {gts} GTs")
    for col in ("preset", "anchors", "channels", "positives", "loss ms", "floor ms", "ratio"):
        table.add_column(col, justify="right" if col != "preset" else "left")
    for r in rows:
        table.add_row(r.preset, f"{r.anchors:,}", str(r.channels), f"{r.num_pos:.0f}", f"{r.loss_ms:.1f}",
                      f"{r.floor_ms:.1f}", f"[{'green' if r.ratio <= 2 else 'red'}]{r.ratio:.2f}x[/]")
    console.print(table)
    if json_path:
        write_loss_json(json_path, rows, {"batch": batch, "size": size, "classes": classes, "gts": gts, "repeats": repeats})
        err.print(f"wrote {json_path}")
