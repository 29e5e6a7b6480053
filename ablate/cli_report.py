"""The ``ablate report`` command: one job's results as a self-contained HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import typer

from .cli import app, fail
from .cli_jobs import STORE_HELP, _open
from .console import err
from .report import DEFAULT_MLFLOW_UI


@app.command("report")
def report_cmd(
    job: str = typer.Argument(..., help="The job's name."),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="The HTML file to write (folders are created)."),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    metric: str = typer.Option("AP", "--metric", help="Headline COCO metric (table and bars)."),
    bootstrap: bool = typer.Option(False, "--bootstrap",
                                   help="Percentile bootstrap intervals (10,000 resamples, fixed seed) instead of t."),
    mlflow_ui: str = typer.Option(DEFAULT_MLFLOW_UI, "--mlflow-ui",
                                  help="Address of the MLflow UI the run links point to ('' for no links)."),
) -> None:
    """A self-contained HTML report of a job, read from the results store only: the results table (the
    numbers of `ablate results`, 95% intervals), convergence curves with bands across seeds, final AP and
    AP by object size with intervals, per-class AP, assignment statistics, the spec and each variant's
    differences from the baseline, and links to the MLflow runs."""
    from .evaluate import COCO_METRICS
    from .report import ReportError, write_report
    from .store import StoreError

    if metric not in COCO_METRICS:
        fail(f"--metric: unknown metric {metric!r}; choose one of {', '.join(COCO_METRICS)}")
    if mlflow_ui:
        url = urlparse(mlflow_ui)
        if url.scheme not in ("http", "https") or not url.netloc:
            fail(f"--mlflow-ui: {mlflow_ui!r} is not an http(s) address such as {DEFAULT_MLFLOW_UI}")
    if out.is_dir():
        fail(f"--out: {out} is a folder; give the HTML file's path, e.g. {out / (job + '.html')}")
    st = _open(store, create=False)
    try:
        path = write_report(st, job, out, metric=metric, method="bootstrap" if bootstrap else "t",
                            mlflow_ui=mlflow_ui or None)
    except (ReportError, StoreError) as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot write {out}: {e.strerror or e}")
    finally:
        st.close()
    err.print(f"wrote {path}", highlight=False, soft_wrap=True)
