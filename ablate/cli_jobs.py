"""The job commands of the ``ablate`` CLI: submit, status, resume, cancel, sync, results, query, ui, db."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .cli import app, fail
from .console import console, err

DEFAULT_STORE = "sqlite:///ablate.db"
STORE_HELP = "SQLAlchemy URL of the results store (default: $ABLATE_STORE or sqlite:///ablate.db)."

db_app = typer.Typer(help="The results store: schema migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")


def _store_url(store: Optional[str]) -> str:
    return store or os.environ.get("ABLATE_STORE") or DEFAULT_STORE


def _open(store: Optional[str], create: bool = True):
    from .store import StoreError, open_store

    try:
        return open_store(_store_url(store), create=create)
    except StoreError as e:
        fail(str(e))


METHOD_HELP = ("How Δ's interval, p and * are computed: t (paired t test, default), signflip "
               "(exact sign-flip permutation test) or bootstrap (BCa, 10,000 resamples, fixed seed).")
ADJUST_HELP = "Multiplicity adjustment of p over the variants: holm, bh (Benjamini-Hochberg) or none; * uses the adjusted p."
TIMEOUT_HELP = "Seconds a statement may run before the database cancels it (the server too, on PostgreSQL)."
READER_URL_HELP = ("PostgreSQL: a URL that logs in as a read-only role (default: $ABLATE_READER_URL; else the "
                   "store's login with SET ROLE ablate_reader).")


def _open_reader(store: Optional[str], timeout: float, reader_url: Optional[str], user_sql: bool = False):
    """The store for a read command: it can only read, each statement cut off after ``timeout`` s."""
    from .store import StoreError
    from .store.readonly import open_reader

    try:
        return open_reader(_store_url(store), timeout=timeout, reader_url=reader_url, user_sql=user_sql)
    except StoreError as e:
        fail(str(e))


def _job_or_fail(st, job: str):
    from .store import display_url

    row = st.get_job(job)
    if row is None:
        names = [j["name"] for j in st.list_jobs()]
        fail(f"no job named {job!r} in {display_url(st.url)}" + (f"; jobs: {', '.join(names)}" if names else " (it holds no jobs)"))
    return row


def _load_spec(path: Path, tracking: Optional[str], store: Optional[str]):
    from .spec import SpecError, load_job_spec

    try:
        return load_job_spec(path, tracking_uri=tracking, store=store)
    except SpecError as e:
        fail(str(e))


def _run(spec, text: str, *, address, force, resume, workdir, shared_workdir=False):
    from .data.coco import DatasetError
    from .runner import JobError, run_job
    from .store import StoreError

    try:
        outcome = run_job(spec, text, address=address, force=force, resume=resume, workdir=workdir,
                          shared_workdir=shared_workdir,
                          live=True, console=err)
    except (JobError, StoreError, DatasetError, FileExistsError) as e:
        fail(str(e))
    counts: dict[str, int] = {}
    for s in outcome.states.values():
        counts[s] = counts.get(s, 0) + 1
    err.print(f"job {spec.name}: {outcome.state} in {outcome.wall_seconds:.0f} s "
              f"({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))})", highlight=False)
    if outcome.state in ("finished", "failed"):
        _print_results(_open(spec.store), spec.name, "AP", "table")
    if outcome.state == "interrupted":
        from .store import display_url

        err.print(f"continue with: ablate resume {spec.name} --store '{display_url(spec.store)}'", highlight=False)
    if outcome.state not in ("finished",):
        raise typer.Exit(1)


WORKDIR_HELP = ("Tune's checkpoints and experiment state: a folder, or a URI every node reads (s3://bucket/prefix, "
                "gs://..., file:///mnt/shared/ablate). Also $ABLATE_WORKDIR.")
SHARED_HELP = ("The --workdir folder is a mount every node of the cluster shares at the same path (required for a "
               "folder on a cluster of several nodes). Also $ABLATE_SHARED_WORKDIR=1.")


@app.command("submit")
def submit_cmd(
    job_file: Path = typer.Argument(..., metavar="JOB.yaml", help="The job spec (see jobs/)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the expanded trials and exit."),
    tracking: Optional[str] = typer.Option(None, "--tracking", envvar="MLFLOW_TRACKING_URI",
                                           help="MLflow tracking URI (overrides the file; also $MLFLOW_TRACKING_URI)."),
    store: Optional[str] = typer.Option(None, "--store", envvar="ABLATE_STORE",
                                        help="Results store URL (overrides the file; also $ABLATE_STORE)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to join (default: $RAY_ADDRESS or local)."),
    force: bool = typer.Option(False, "--force", help="Retrain trials that already finished (here or in another job)."),
    workdir: str = typer.Option("runs", "--workdir", envvar="ABLATE_WORKDIR", help=WORKDIR_HELP),
    shared_workdir: bool = typer.Option(False, "--shared-workdir", envvar="ABLATE_SHARED_WORKDIR", help=SHARED_HELP),
) -> None:
    """Validate a job, register it, train its trials on Ray, record to MLflow and the store."""
    spec = _load_spec(job_file, tracking, store)
    trials = spec.trials()
    if dry_run:
        table = Table(title=f"job {spec.name}: {len(trials)} trials ({len(spec.variant_names())} variants x "
                            f"{len(spec.seeds)} seeds), baseline {spec.baseline_variant}")
        for col in ("variant", "seed", "hash", "preset", "overrides"):
            table.add_column(col)
        for t in trials:
            table.add_row(t.variant, str(t.seed), t.hash, t.config.preset,
                          ", ".join(f"{k}={v}" for k, v in t.overrides.items()) or "-")
        console.print(table)
        from .store import display_url

        err.print(f"resources per trial: {spec.resources.cpus:g} CPU, {spec.resources.gpus:g} GPU; "
                  f"tracking {display_url(spec.tracking.uri)}; store {display_url(spec.store)}", highlight=False)
        return
    _run(spec, job_file.read_text(), address=address, force=force, resume=False, workdir=workdir,
         shared_workdir=shared_workdir)


@app.command("resume")
def resume_cmd(
    job: str = typer.Argument(..., help="The job's name."),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to join."),
    workdir: str = typer.Option("runs", "--workdir", envvar="ABLATE_WORKDIR", help=WORKDIR_HELP + " As given to submit."),
    shared_workdir: bool = typer.Option(False, "--shared-workdir", envvar="ABLATE_SHARED_WORKDIR", help=SHARED_HELP),
    force: bool = typer.Option(False, "--force",
                               help="Retrain the trials that other code (another ablate, torch or torchvision) trained."),
) -> None:
    """Continue an interrupted job: finished trials are kept, interrupted ones continue from their checkpoint."""
    import tempfile

    st = _open(store, create=False)
    row = _job_or_fail(st, job)
    if row.state == "cancelled":
        fail(f"job {job!r} was cancelled; submit it again to run it")
    from .spec import SpecError, load_job_spec

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"{job}.yaml"
        path.write_text(row.spec_yaml)
        try:
            spec = load_job_spec(path, tracking_uri=row.tracking_uri, store=st.url)
        except SpecError as e:
            fail(f"job {job}'s stored spec no longer validates with this ablate ({str(e).removeprefix(str(path) + ': ')}); "
                 f"submit a corrected file under a new name")
    _run(spec, row.spec_yaml, address=address, force=force, resume=True, workdir=workdir, shared_workdir=shared_workdir)


@app.command("cancel")
def cancel_cmd(
    job: str = typer.Argument(..., help="The job's name."),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
) -> None:
    """Cancel a job: a running driver stops its trials; pending trials are marked cancelled."""
    from .runner import driver_alive

    st = _open(store, create=False)
    row = _job_or_fail(st, job)
    if row.state in ("finished", "cancelled"):
        err.print(f"job {job} is already {row.state}")
        return
    live = driver_alive(row)
    st.set_job(job, state="cancelled")
    n = 0
    for t in st.trials_of(job):
        if t.state == "pending" or (t.state == "running" and not live):  # no driver: nobody else will
            st.update_trial(t.id, state="cancelled")
            n += 1
    err.print(f"job {job} cancelled ({n} pending trial(s) will not run; a running driver stops within seconds)")


@app.command("sync")
def sync_cmd(
    job: str = typer.Argument(..., help="The job's name."),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    tracking: Optional[str] = typer.Option(None, "--tracking",
                                           help="MLflow tracking URI (default: the one the job recorded to)."),
) -> None:
    """Bring the job's MLflow runs up to date from the store after a tracking outage: the parent
    run, a child run per trial, metric history beyond what MLflow holds, final.json, tags and
    terminal statuses. Running it twice sends nothing the second time."""
    from .record import SyncError, sync_job
    from .runner import driver_alive
    from .store import StoreError

    st = _open(store, create=False)
    row = _job_or_fail(st, job)
    if driver_alive(row):
        fail(f"job {job!r} has a live driver, which brings MLflow up to date itself; sync once it has ended")
    try:
        sync_job(st, job, tracking_uri=tracking, say=lambda line: err.print(line, markup=False, highlight=False,
                                                                            soft_wrap=True))
    except (SyncError, StoreError) as e:
        fail(str(e))


@app.command("status")
def status_cmd(
    job: Optional[str] = typer.Argument(None, help="A job's name (default: list all jobs)."),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    timeout: float = typer.Option(30.0, "--timeout", help=TIMEOUT_HELP),
    reader_url: Optional[str] = typer.Option(None, "--reader-url", help=READER_URL_HELP),
) -> None:
    """The jobs in the store, or one job's trials (state, epoch, attempts, node, wall time, and the
    code that trained each: trials that other code than this ablate's trained are marked)."""
    from .fingerprint import code_fingerprint
    from .store import StoreError

    current = code_fingerprint()
    st = _open_reader(store, timeout, reader_url)
    try:
        _print_status(st, job, current)
    except StoreError as e:  # a statement timeout or a lost connection: one line
        fail(str(e))


def _print_status(st, job: Optional[str], current: str) -> None:
    """The body of ``ablate status`` (``current``: this ablate's code fingerprint)."""
    if job is None:
        table = Table(title=f"jobs in {st.url}")
        for col in ("job", "state", "created", "trials", "code"):
            table.add_column(col)
        codes = st.code_fingerprints()
        for j in st.list_jobs():
            counts = j.get("trials") or {}
            other = sum(n for fp, n in codes.get(j["name"], {}).items() if fp != current)
            table.add_row(j["name"], j["state"], str(j["created_at"])[:19],
                          ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
                          f"[yellow]{other} trial(s) by other code[/]" if other else "current")
        console.print(table)
        return
    row = _job_or_fail(st, job)
    table = Table(title=f"job {job}: {row.state}")
    for col in ("variant", "seed", "state", "epoch", "attempts", "node", "wall s", "hash", "code", "error"):
        table.add_column(col)
    trials = st.trials_of(job)
    other = [t for t in trials if t.state != "pending" and t.code_fingerprint != current]
    for t in trials:
        code = (t.code_fingerprint or "unrecorded")[:12]
        if t in other:
            code = f"[yellow]{code} (other)[/]"
        table.add_row(t.variant_name, str(t.seed), t.state, str(t.epoch),
                      str(t.attempts), t.node or "", "" if t.wall_seconds is None else f"{t.wall_seconds:.0f}",
                      t.hash, code, (t.error or "")[:60])
    console.print(table)
    if other:
        console.print(f"{len(other)} trial(s) of job {job} came from other code than this ablate's (code "
                      f"{current[:12]}: its detector, data, training and evaluation sources and the torch, "
                      f"torchvision, numpy and pycocotools versions); they are not reused, and "
                      f"`ablate resume {job} --force` (or submitting the job file with --force) retrains them",
                      highlight=False, soft_wrap=True)


def _fmt(x: float, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _print_results(st, job: str, metric: str, fmt: str, method: str = "t", adjust: str = "holm") -> None:
    """Print the job's per-variant comparison (``ablate.stats.compare``) as table, csv, json or markdown.

    ``method``: "t", "signflip" or "bootstrap" (interval, p and star of the differences);
    ``adjust``: "holm", "bh" or "none" over the variants. Under the table, one line when the seeds
    cannot give a significant result (``stats.significance_note``; on stderr for csv). Exits 2
    with one line on an unknown job, metric or an empty job.
    """
    from .evaluate import COCO_METRICS
    from .stats import ADJUST_NAMES, METHOD_NAMES, compare, curve_bands, significance_note

    if metric not in COCO_METRICS:
        fail(f"--metric: unknown metric {metric!r}; choose one of {', '.join(COCO_METRICS)}")
    row = _job_or_fail(st, job)
    df = st.results(job)
    if df.empty:
        fail(f"job {job!r} has no trials in {st.url}")
    baseline = row.baseline if row.baseline in set(df["variant"]) else df["variant"].iloc[0]
    names = ["eval/AP", "stat/pos_per_gt", "stat/gt_without_pos_frac", "stat/ignored_per_image"]
    curves = st.curves(job, names + [f"stat/pos_per_gt_l{k}" for k in range(16)])
    try:
        table = compare(df, curves, baseline, metric=metric, method=method, adjust=adjust)
    except ValueError as e:
        fail(str(e))
    others = table[~table["is_baseline"].astype(bool)]
    note = significance_note(list(others["pairs"]), method, adjust=adjust, metric=metric)
    if fmt == "csv":
        console.file.write(table.to_csv(index=False))
        if note:
            err.print(note, highlight=False, soft_wrap=True)
        return
    if fmt == "json":
        counted = set(df.loc[df["state"].isin(("finished", "reused")), "trial_id"])
        bands = curve_bands(curves[curves["trial_id"].isin(counted)], "eval/AP")
        doc = {"job": job, "baseline": baseline, "metric": metric, "method": method, "adjust": adjust,
               "tests": len(others), "confidence": 0.95, "significance_note": note,
               "variants": json.loads(table.to_json(orient="records")),
               "ap_by_epoch": json.loads(bands.to_json(orient="records"))}
        console.file.write(json.dumps(doc, indent=2) + "\n")
        return

    def num(x: float, sign: str = "") -> str:
        return f"{'-' if x < 0 else '+' if sign else ''}inf" if math.isinf(x) else f"{x:{sign}.3f}"

    def ci(r, col: str, sign: str = "") -> str:
        if math.isnan(r[col]):
            return "-"
        low, high = r[f"{col}_low"], r[f"{col}_high"]
        bounds = "" if math.isnan(low) else f" [{num(low, sign)}, {num(high, sign)}]"
        return f"{num(r[col], sign)}{bounds}"

    def pval(p: float) -> str:
        return "-" if math.isnan(p) else f"{p:.3g}"

    adj = adjust != "none"
    label = {"holm": "Holm", "bh": "BH"}.get(adjust, "")
    header = ["variant", "seeds", "pairs", f"{metric} [95% CI]", "sd", f"Δ{metric} vs {baseline} [95% CI]", "dz",
              "p"] + ([f"p {label}"] if adj else []) + ["AUC", "ep→90%", "diverged", "failed"]
    lines = []
    for _, r in table.iterrows():
        base = bool(r["is_baseline"])
        diff = "" if base else ci(r, f"{metric}_diff", "+") + (" *" if r[f"{metric}_sig"] else "")
        lines.append([str(r["variant"]) + (" (baseline)" if base else ""), str(r["seeds"]),
                      "" if base else str(r["pairs"]), ci(r, metric), _fmt(r[f"{metric}_std"]), diff,
                      "" if base else _fmt(r[f"{metric}_dz"], 2), "" if base else pval(r[f"{metric}_p"])]
                     + (["" if base else pval(r[f"{metric}_p_adj"])] if adj else [])
                     + [_fmt(r["auc"]), _fmt(r["epochs_to_90"], 1), str(r["diverged"]), str(r["failed"])])
    if table["note"].notna().any():
        header.append("note")
        for line, n in zip(lines, table["note"]):
            line.append(n if isinstance(n, str) else "")
    mean_how = "BCa bootstrap" if method == "bootstrap" else "t"
    how = METHOD_NAMES[method] + (", 10,000 resamples, fixed seed" if method == "bootstrap" else "")
    caption = (f"{metric}: mean over seeds [95% CI, {mean_how}], sd: seed-to-seed sd; Δ paired by seed, its CI, p "
               f"and * from one method: {how}; dz: mean/sd of the differences; "
               + (f"p {label}: {ADJUST_NAMES[adjust]} over {len(others)} "
                  f"variant(s); * adjusted p < 0.05; " if adj else "* p < 0.05 (no adjustment); ")
               + "AUC: mean AP over epochs; ep→90%: epochs to 90% of final AP")
    if fmt == "markdown":
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        console.file.write("\n".join(out) + f"\n\n{caption}\n" + (f"\n{note}\n" if note else ""))
        return
    t = Table(title=f"job {job}: {metric} per variant", caption=caption)
    for h in header:
        t.add_column(h, justify="left" if h in ("variant", "note") else "right")
    for line in lines:
        t.add_row(*line)
    console.print(t)
    if note:
        console.print(note, highlight=False, soft_wrap=True)


@app.command("results")
def results_cmd(
    job: str = typer.Argument(..., help="The job's name."),
    metric: str = typer.Option("AP", "--metric", help="Headline COCO metric (AP, AP50, AP75, APs, ..., ARl)."),
    fmt: str = typer.Option("table", "--format", help="table, csv, json or markdown."),
    method: Optional[str] = typer.Option(None, "--method", help=METHOD_HELP),
    bootstrap: bool = typer.Option(False, "--bootstrap", help="The same as --method bootstrap."),
    adjust: str = typer.Option("holm", "--adjust", help=ADJUST_HELP),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    timeout: float = typer.Option(30.0, "--timeout", help=TIMEOUT_HELP),
    reader_url: Optional[str] = typer.Option(None, "--reader-url", help=READER_URL_HELP),
) -> None:
    """Per variant: seeds, mean and 95% CI of the headline metric and its seed-to-seed sd, the
    difference from the baseline paired by seed (CI, standardised effect dz, raw and adjusted p, *
    when the adjusted p < 0.05, all from one named method), and convergence (AUC, epochs to 90%).
    Says when the seeds are too few for a significant result, and how many are needed.
    csv and json carry every COCO metric, convergence and assignment column."""
    from .evaluate import COCO_METRICS
    from .stats import cli_method

    if fmt not in ("table", "csv", "json", "markdown"):
        fail(f"--format: unknown format {fmt!r}; choose one of table, csv, json, markdown")
    if metric not in COCO_METRICS:
        fail(f"--metric: unknown metric {metric!r}; choose one of {', '.join(COCO_METRICS)}")
    try:
        method = cli_method(method, bootstrap, adjust)
    except ValueError as e:
        fail(str(e))
    from .store import StoreError

    try:
        _print_results(_open_reader(store, timeout, reader_url), job, metric, fmt, method, adjust)
    except StoreError as e:  # a statement over --timeout
        fail(str(e))


@app.command("query")
def query_cmd(
    sql: str = typer.Argument(..., help='A read-only SQL query, e.g. "select * from trial_results".'),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    fmt: str = typer.Option("table", "--format", help="table or csv."),
    timeout: float = typer.Option(30.0, "--timeout", help=TIMEOUT_HELP),
    reader_url: Optional[str] = typer.Option(None, "--reader-url", help=READER_URL_HELP),
) -> None:
    """Run one SELECT on the store as a role that may only read its tables and views (PostgreSQL:
    ablate_reader; SQLite: query_only and an authorizer), cancelled after --timeout seconds."""
    from .store import StoreError
    from .store.readonly import run_query

    st = _open_reader(store, timeout, reader_url, user_sql=True)
    try:
        columns, rows = run_query(st, sql)
    except StoreError as e:
        fail(str(e))
    if fmt == "csv":
        import csv
        import sys

        w = csv.writer(sys.stdout)
        w.writerow(columns)
        w.writerows(rows)
        return
    t = Table()
    for c in columns:
        t.add_column(str(c))
    for r in rows:
        t.add_row(*("" if v is None else str(v) for v in r))
    console.print(t)


@app.command("ui")
def ui_cmd(
    job: Optional[str] = typer.Argument(None, help="A job whose tracking store to open (default: --tracking)."),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    tracking: Optional[str] = typer.Option(None, "--tracking", help="MLflow tracking URI (default: sqlite:///mlflow.db)."),
    port: int = typer.Option(5000, "--port"),
) -> None:
    """MLflow's UI for the job's tracking store, bound to 127.0.0.1."""
    import shutil
    import subprocess
    import sys

    uri = tracking
    row = None
    if uri is None and job is not None:
        row = _job_or_fail(_open(store, create=False), job)
        uri = row.tracking_uri
    uri = uri or "sqlite:///mlflow.db"
    if uri.startswith(("http://", "https://")):  # a tracking server (cluster mode) has its own UI: no second one
        url = uri.rstrip("/")
        if row is not None and row.mlflow_experiment_id:
            url += f"/#/experiments/{row.mlflow_experiment_id}"
        err.print(f"{uri} is an MLflow tracking server; its UI:", highlight=False)
        print(url)
        return
    if uri.startswith(("databricks", "uc:")):
        fail(f"--tracking {uri}: open this tracking URI's own UI; ablate ui starts one only for a local database")
    exe = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    err.print(f"MLflow UI for {uri} at http://127.0.0.1:{port} (Ctrl-C to stop)", highlight=False)
    raise typer.Exit(subprocess.call([exe, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]))


@db_app.command("upgrade")
def db_upgrade_cmd(store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP)) -> None:
    """Migrate the results store's schema to this version of ablate (Alembic); on PostgreSQL,
    create the database first when it does not exist."""
    from .store import StoreError, upgrade
    from .store.db import create_database

    url = _store_url(store)
    try:
        if create_database(url):  # PostgreSQL: a new server needs its database before the schema
            err.print(f"created database {url.rsplit('/', 1)[-1].split('?')[0]}", highlight=False)
        rev = upgrade(url)
    except StoreError as e:
        fail(str(e))
    err.print(f"store {url} is at schema {rev}", highlight=False)
