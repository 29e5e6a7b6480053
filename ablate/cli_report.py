"""The ``ablate report`` command: one job's results as a self-contained HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import typer

from .cli import app, fail
from .cli_jobs import ADJUST_HELP, METHOD_HELP, READER_URL_HELP, STORE_HELP, TIMEOUT_HELP, _open_reader
from .console import err
from .report import DEFAULT_MLFLOW_UI


@app.command("report")
def report_cmd(
    job: str = typer.Argument(..., help="The job's name."),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="The HTML file to write (folders are created)."),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    timeout: float = typer.Option(30.0, "--timeout", help=TIMEOUT_HELP),
    reader_url: Optional[str] = typer.Option(None, "--reader-url", help=READER_URL_HELP),
    metric: str = typer.Option("AP", "--metric", help="Headline COCO metric (table and bars)."),
    method: Optional[str] = typer.Option(None, "--method", help=METHOD_HELP),
    bootstrap: bool = typer.Option(False, "--bootstrap", help="The same as --method bootstrap."),
    adjust: str = typer.Option("holm", "--adjust", help=ADJUST_HELP),
    mlflow_ui: str = typer.Option(DEFAULT_MLFLOW_UI, "--mlflow-ui",
                                  help="Address of the MLflow UI the run links point to ('' for no links)."),
) -> None:
    """A self-contained HTML report of a job, read from the results store only: the results table (the
    numbers of `ablate results`: 95% intervals, seed-to-seed sd, Δ with its interval, dz, raw and adjusted
    p and * from one named method, and a line when the seeds are too few for a star), convergence curves
    with bands across seeds, final AP and AP by object size with intervals, per-class AP, assignment statistics, the spec and each variant's
    differences from the baseline, and links to the MLflow runs."""
    from .evaluate import COCO_METRICS
    from .report import ReportError, write_report
    from .stats import cli_method
    from .store import StoreError

    try:
        method = cli_method(method, bootstrap, adjust)
    except ValueError as e:
        fail(str(e))
    if metric not in COCO_METRICS:
        fail(f"--metric: unknown metric {metric!r}; choose one of {', '.join(COCO_METRICS)}")
    if mlflow_ui:
        url = urlparse(mlflow_ui)
        if url.scheme not in ("http", "https") or not url.netloc:
            fail(f"--mlflow-ui: {mlflow_ui!r} is not an http(s) address such as {DEFAULT_MLFLOW_UI}")
    if out.is_dir():
        fail(f"--out: {out} is a folder; give the HTML file's path, e.g. {out / (job + '.html')}")
    st = _open_reader(store, timeout, reader_url)
    try:
        path = write_report(st, job, out, metric=metric, method=method, adjust=adjust,
                            mlflow_ui=mlflow_ui or None)
    except (ReportError, StoreError) as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot write {out}: {e.strerror or e}")
    finally:
        st.close()
    err.print(f"wrote {path}", highlight=False, soft_wrap=True)
