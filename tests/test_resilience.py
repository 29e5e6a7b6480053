"""The driver survives tracking and database outages without losing work.

- MLflow down: every recorder write reaches the store first; MLflow is best effort, one warning
  line per outage, and is caught up from the store (by the recorder on a later event or at the
  job's end, or by `ablate sync`), reading what MLflow already holds from MLflow itself, so no step
  is sent twice even when a request that failed had been applied. Fast cases drive the Recorder
  with a client that fails on demand; slow ones kill a real `mlflow server` under a real job.
- PostgreSQL restarted mid-job: the store's calls retry through the lost connection; the job
  finishes with every metric row exactly once.
- The retry helper retries connection-level errors only; metric writes are idempotent.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

import ablate.record as record
from ablate.cli import app
from ablate.record import Recorder, mlflow_key
from ablate.spec import load_job_spec
from ablate.store import StoreError, open_store
from test_store import PG_ADMIN_URL, pg_database, url  # noqa: F401  (fixtures: a SQLite file and a PostgreSQL schema)

pytestmark = pytest.mark.timeout(600)

BIN = Path(sys.executable).parent
STEPS_PER_EPOCH = 3  # 24 training images, batch 8


# --------------------------------------------------------------------------------- the store's retry

def _pg_lost() -> sa.exc.OperationalError:
    import psycopg

    return sa.exc.OperationalError("INSERT INTO metrics ...", {}, psycopg.OperationalError(
        "consuming input failed: server closed the connection unexpectedly"))


def test_retry_helper_retries_lost_connections_only():
    from ablate.store.store import is_connection_error, retry_on_disconnect

    slept: list[float] = []
    now = [0.0]

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    lines: list[str] = []
    calls = []

    def flaky_write():
        calls.append(1)
        if len(calls) <= 2:
            raise _pg_lost()
        return "written"

    assert retry_on_disconnect(flaky_write, budget_s=60, notify=lines.append, sleep=sleep,
                               clock=lambda: now[0]) == "written"
    assert len(calls) == 3 and slept == [0.5, 1.0]  # exponential backoff
    assert len(lines) == 2 and "connection lost" in lines[0] and "connected again" in lines[1]

    import psycopg

    def refuse(exc):
        def write():
            calls.append(1)
            raise exc
        return write

    not_retried = [
        sa.exc.IntegrityError("INSERT", {}, psycopg.errors.UniqueViolation("duplicate key")),
        sa.exc.ProgrammingError("SELECT", {}, psycopg.errors.UndefinedTable("no such table")),
        sa.exc.OperationalError("SELECT", {}, psycopg.errors.QueryCanceled("statement timeout")),
        sa.exc.OperationalError("INSERT", {}, Exception("database is locked")),  # SQLite: busy_timeout already waited
    ]
    for exc in not_retried:
        calls.clear()
        with pytest.raises(type(exc)):
            retry_on_disconnect(refuse(exc), budget_s=60, sleep=sleep, clock=lambda: now[0])
        assert len(calls) == 1, exc
    invalidated = sa.exc.DBAPIError("SELECT 1", {}, Exception("gone"), connection_invalidated=True)
    shutdown = sa.exc.OperationalError("SELECT 1", {}, psycopg.errors.AdminShutdown("terminating connection"))
    starting = sa.exc.OperationalError("SELECT 1", {}, psycopg.errors.CannotConnectNow("the database is starting up"))
    assert all(is_connection_error(e) for e in (invalidated, shutdown, starting, _pg_lost()))

    calls.clear()  # a database that stays down: bounded by the budget, then the error itself
    slept.clear()
    with pytest.raises(sa.exc.OperationalError):
        retry_on_disconnect(refuse(_pg_lost()), budget_s=60, sleep=sleep, clock=lambda: now[0])
    assert sum(slept) <= 60 and max(slept) == 8.0 and len(calls) == len(slept) + 1


def test_a_store_call_is_retried_through_a_lost_connection_and_metric_writes_are_idempotent(url, monkeypatch):  # noqa: F811
    store = open_store(url)
    store.create_or_get_job("j", spec_yaml="name: j\n", spec_json={"name": "j"})
    (trial,) = store.ensure_trials("j", [dict(variant="v", overrides={}, seed=0, hash="h", config={})])
    rows = [("loss/box", s, 1, 1.0 / s) for s in range(1, 4)] + [("eval/AP", 3, 1, float("nan"))]
    assert store.add_metrics(trial.id, rows) == 4
    assert store.add_metrics(trial.id, rows) == 0  # a write run again (its answer was lost) adds nothing
    # a connection lost on the first try: the store's method runs again, once
    session = store.session
    failures = [_pg_lost()]

    def losing_session():
        if failures:
            raise failures.pop()
        return session()

    monkeypatch.setattr(store, "session", losing_session)
    store.update_trial(trial.id, epoch=1)
    assert not failures and store.get_trial(trial.id).epoch == 1
    keys = [(n, s) for n, s, _, _ in store.metrics_of(trial.id)]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 4
    store.close()


# --------------------------------------------------------------------------------- MLflow: a Recorder, no Ray

def _job_file(tmp: Path, tracking: str, store: str, name: str = "tiny", epochs: int = 3, seeds=(0,)) -> Path:
    """test_jobs' tiny job: one variant, one trial at a time, one retry, on ``tracking`` and ``store``."""
    from test_jobs import job_yaml

    return job_yaml(tmp, name=name, seeds=seeds, epochs=epochs, variants={"mse": {"recipe.box_loss": "mse"}},
                    max_concurrent=1, max_failures=1, tracking={"uri": tracking}, store=store)


def _epoch_events(epoch: int) -> list[dict]:
    """What a worker reports for one epoch: train steps, the evaluation and the epoch summary."""
    events = [{"kind": "train", "step": s, "epoch": epoch, "loss/box": 1.0 / s, "loss/total": 2.0 / s, "lr": 0.01}
              for s in range((epoch - 1) * STEPS_PER_EPOCH + 1, epoch * STEPS_PER_EPOCH + 1)]
    last = epoch * STEPS_PER_EPOCH
    events.append({"kind": "eval", "step": last, "epoch": epoch, "AP": 0.1 * epoch, "AP50": 0.2 * epoch,
                   "per_class_AP": {"circle": 0.3 * epoch, "square": None}})
    events.append({"kind": "epoch", "step": last, "epoch": epoch, "train_seconds": 1.5})
    return events


class FlakyClient:
    """An MlflowClient that fails on demand: every call while ``down``; with ``applied_then_failed``,
    ``log_batch`` reaches MLflow and then raises (a request that timed out after the server applied it)."""

    def __init__(self, real):
        self.real, self.down, self.applied_then_failed, self.calls = real, False, False, 0

    def __getattr__(self, name):
        attr = getattr(self.real, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            from mlflow.exceptions import MlflowException

            self.calls += 1
            if self.down:
                raise MlflowException(f"API request to {name} failed: Max retries exceeded (Connection refused)")
            out = attr(*args, **kwargs)
            if self.applied_then_failed and name == "log_batch":
                raise MlflowException("API request to log-batch failed: Read timed out")
            return out

        return call


def assert_mlflow_matches_store(store, job_name: str, tracking_uri: str, tmp: Path) -> None:
    """Per trial exactly one child run under the job's parent, every curve's history equal to the
    store's rows with each step once, ``epoch`` by step, final.json as stored, status FINISHED."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    job = store.get_job(job_name)
    exp = client.get_experiment_by_name(job_name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    (parent,) = [r for r in runs if r.info.run_id == job.mlflow_parent_run_id]
    assert parent.info.status == "FINISHED" and parent.data.tags.get("ablate.state") == "finished"
    trials = store.trials_of(job_name)
    assert len(children) == len(trials), [c.info.run_name for c in children]
    for t in trials:
        (run,) = [c for c in children if c.data.tags["ablate.trial_hash"] == t.hash]
        run_id = run.info.run_id
        assert run_id == t.mlflow_run_id and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED" and run.data.tags["ablate.state"] == "finished", run.info.status
        assert run.data.params["recipe.box_loss"] == "mse" and run.data.params["variant"] == "mse"
        points: dict[str, dict[int, float]] = defaultdict(dict)
        epochs: dict[int, int] = {}
        for name, step, epoch, value in store.metrics_of(t.id):
            points[mlflow_key(name)][step] = value
            epochs[step] = epoch
        assert {"eval/AP", "loss/box"} <= set(points)
        for key, by_step in points.items():
            history = client.get_metric_history(run_id, key)
            assert sorted(m.step for m in history) == sorted(by_step), key  # every step, each once
            for m in history:
                want = by_step[m.step]
                assert (math.isnan(m.value) and math.isnan(want)) or m.value == pytest.approx(want), (key, m.step)
        history = client.get_metric_history(run_id, "epoch")
        assert sorted((m.step, int(m.value)) for m in history) == sorted(epochs.items())
        final = Path(client.download_artifacts(run_id, "final.json", str(tmp)))
        assert json.loads(final.read_text()) == json.loads(t.result_json)
        final.unlink()


def _snapshot(tracking_uri: str, job_name: str, backend: Path) -> list:
    """Everything a sync could change in the job's experiment: runs (status, end, tags, params,
    artifacts) through MLflow, and every metric point's count per (run, key, step) from the
    tracking server's SQLite backend ``backend`` (one query instead of a request per key)."""
    import sqlite3

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(job_name)
    out: list = []
    for r in sorted(client.search_runs([exp.experiment_id], max_results=1000), key=lambda r: r.info.run_id):
        out.append((r.info.run_id, r.info.status, r.info.end_time, sorted(r.data.tags.items()),
                    sorted(r.data.params.items()), sorted(f.path for f in client.list_artifacts(r.info.run_id))))
    with sqlite3.connect(backend) as db:
        out.append(db.execute("SELECT run_uuid, key, step, count(*) FROM metrics GROUP BY run_uuid, key, step "
                              "ORDER BY 1, 2, 3").fetchall())
    assert out[-1], "no metric points"
    return out


@pytest.fixture
def recorder(tmp_path, monkeypatch):
    """A Recorder on a SQLite store and MLflow store, its client swapped for a FlakyClient, the
    catch-up throttle off (each event tries), and the lines it prints."""
    monkeypatch.chdir(tmp_path)  # MLflow's sqlite backend puts artifacts under ./mlruns
    monkeypatch.setattr(record, "CATCH_UP_EVERY_S", 0.0)
    path = _job_file(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'ablate.db'}")
    spec = load_job_spec(path)
    store = open_store(spec.store)
    lines: list[str] = []
    rec = Recorder(spec, store, path.read_text(), say=lines.append)
    rec.register(spec.trials())
    rec.client = FlakyClient(rec.client)
    yield spec, store, rec, lines
    store.close()


def test_mlflow_outage_keeps_training_warns_once_and_catches_up_without_a_duplicate_step(recorder, tmp_path):
    spec, store, rec, lines = recorder
    flaky = rec.client
    rec.start()
    rec.trial_started("mse/0", 1)
    rec.trial_events("mse/0", _epoch_events(1))
    assert not rec.behind and not lines

    flaky.down = True  # the tracking server goes away
    rec.trial_events("mse/0", _epoch_events(2))
    rec.trial_events("mse/0", _epoch_events(3))
    assert rec.behind
    assert len(lines) == 1 and lines[0].startswith("warning: MLflow at") and "training goes on" in lines[0], lines
    (trial,) = store.trials_of(spec.name)
    assert trial.epoch == 3 and len(store.metrics_of(trial.id, "loss/box")) == 3 * STEPS_PER_EPOCH

    flaky.down, flaky.applied_then_failed = False, True  # back, but the catch-up's batch "times out" once applied
    rec.trial_events("mse/0", _epoch_events(4))
    assert rec.behind and len(lines) == 1  # still behind; no second warning for the same outage

    flaky.applied_then_failed = False
    rec.trial_result("mse/0", {"status": "finished", "AP": 0.4, "epoch": 4, "wall_seconds": 9.0})
    assert not rec.behind
    assert len(lines) == 2 and "caught up" in lines[1], lines
    rec.finish("finished")
    assert len(lines) == 2, lines
    assert_mlflow_matches_store(store, spec.name, spec.tracking.uri, tmp_path)


def test_mlflow_down_until_the_end_then_ablate_sync_twice(recorder, tmp_path):
    spec, store, rec, lines = recorder
    flaky = rec.client
    flaky.down = True  # down from the parent run on: nothing but the experiment is in MLflow
    rec.start()
    rec.trial_started("mse/0", 1)
    for epoch in (1, 2, 3):
        rec.trial_events("mse/0", _epoch_events(epoch))
    rec.trial_result("mse/0", {"status": "finished", "AP": 0.3, "epoch": 3, "wall_seconds": 9.0})
    rec.finish("finished")
    assert len(lines) == 2 and lines[0].startswith("warning: MLflow at"), lines
    assert "still behind" in lines[1] and f"ablate sync {spec.name}" in lines[1]
    job = store.get_job(spec.name)
    (trial,) = store.trials_of(spec.name)
    assert job.state == "finished" and trial.state == "finished"
    assert job.mlflow_parent_run_id is None and trial.mlflow_run_id is None  # MLflow never answered
    assert len(store.metrics_of(trial.id, "eval/AP")) == 3

    runner = CliRunner()
    first = runner.invoke(app, ["sync", spec.name, "--store", spec.store])
    assert first.exit_code == 0, first.output
    assert "mse/0: 1 run" in first.output and "MLflow is up to date" in first.output, first.output
    assert_mlflow_matches_store(store, spec.name, spec.tracking.uri, tmp_path)
    backend = tmp_path / "mlflow.db"
    before = _snapshot(spec.tracking.uri, spec.name, backend)
    second = runner.invoke(app, ["sync", spec.name, "--store", spec.store])
    assert second.exit_code == 0 and "already up to date (nothing sent)" in second.output, second.output
    assert _snapshot(spec.tracking.uri, spec.name, backend) == before

    bad = runner.invoke(app, ["sync", "nope", "--store", spec.store])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1 and "no job named 'nope'" in bad.output
    down = runner.invoke(app, ["sync", spec.name, "--store", spec.store, "--tracking", f"http://127.0.0.1:{_free_port()}"])
    assert down.exit_code == 2 and "cannot use MLflow at http://127.0.0.1:" in down.output, down.output
    assert len([ln for ln in down.output.splitlines() if ln.startswith("error:")]) == 1


def test_a_driver_that_died_while_mlflow_was_down_is_caught_up_by_the_resumed_one(recorder, tmp_path):
    """What MLflow lacks is derived from the store and MLflow, not remembered: a new driver (a
    resume) finds it, including a trial whose run was never created."""
    spec, store, rec, lines = recorder
    rec.client.down = True
    rec.start()
    rec.trial_started("mse/0", 1)
    rec.trial_events("mse/0", _epoch_events(1))
    rec.trial_events("mse/0", _epoch_events(2))  # then the driver dies: no finish
    (trial,) = store.trials_of(spec.name)
    assert trial.mlflow_run_id is None and trial.epoch == 2

    resumed = Recorder(spec, store, rec.spec_yaml, say=lines.append)
    resumed.register(spec.trials())
    resumed.start(resumed=True)
    resumed.trial_started("mse/0", 2)
    resumed.trial_events("mse/0", _epoch_events(2))  # replayed from the epoch-1 checkpoint
    resumed.trial_events("mse/0", _epoch_events(3))
    resumed.trial_result("mse/0", {"status": "finished", "AP": 0.3, "epoch": 3, "wall_seconds": 9.0})
    resumed.finish("finished")
    assert len(lines) == 1 and not resumed.behind, lines  # the first driver's warning only
    assert_mlflow_matches_store(store, spec.name, spec.tracking.uri, tmp_path)


# --------------------------------------------------------------------------------- real processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite backend and proxied artifacts under ``root``,
    in its own process group (killed as a whole); restartable on the same port and backend."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, _free_port(), None
        root.mkdir(parents=True, exist_ok=True)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def backend(self) -> Path:
        return self.root / "mlflow.db"

    def start(self, timeout: float = 180) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.backend}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"], cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its uvicorn worker, as a crash would
            self.proc.wait()
        self.proc = None


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path / "mlflow-server")
    server.start()
    yield server
    server.kill()


def _driver_env() -> dict:
    return {k: v for k, v in os.environ.items()
            if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "ABLATE_STORE", "ABLATE_WORKDIR")}


def _submit(path: Path, tmp: Path):
    err = open(tmp / "driver.err", "wb")
    proc = subprocess.Popen([str(BIN / "ablate"), "submit", str(path)], cwd=tmp, env=_driver_env(),
                            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    err.close()
    return proc


def _trials(url: str, job: str) -> list:
    """The job's trials as the store has them now ([] before the driver made it, or while the
    database is down). Never creates the schema: that would race the driver's migration."""
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return []
    try:
        store = open_store(url, create=False)
    except StoreError:
        return []
    store.retry_s = 0
    try:
        return store.trials_of(job) if store.get_job(job) is not None else []
    except (StoreError, sa.exc.SQLAlchemyError):
        return []
    finally:
        store.close()


def _wait(proc, tmp: Path, what: str, until, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if until():
            return
        assert proc.poll() is None, f"the driver ended before {what}: {_stderr(tmp)[-3000:]}"
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _stderr(tmp: Path) -> str:
    return (tmp / "driver.err").read_text(errors="replace")


def _finish(proc, tmp: Path, timeout: float = 400) -> str:
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = _stderr(tmp)
    assert rc == 0, err[-3000:]
    return err


def _assert_store_complete(store, job: str, epochs: int) -> None:
    (trial,) = store.trials_of(job)
    assert trial.state == "finished" and trial.epoch == epochs
    assert store.get_job(job).state == "finished"
    rows = store.metrics_of(trial.id)
    keys = [(n, s) for n, s, _, _ in rows]
    assert len(keys) == len(set(keys))
    assert [s for n, s, _, _ in rows if n == "loss/box"] == list(range(1, epochs * STEPS_PER_EPOCH + 1))
    assert [s for n, s, _, _ in rows if n == "eval/AP"] == [e * STEPS_PER_EPOCH for e in range(1, epochs + 1)]


def _job_losing_mlflow_after_epoch_one(tmp_path: Path, server, epochs: int):
    """Submit a one-trial job recording to ``server`` and kill the server once the first epoch is
    in the store; returns ``(spec, driver process)`` (the driver killed if this fails)."""
    path = _job_file(tmp_path, server.uri, f"sqlite:///{tmp_path / 'ablate.db'}", epochs=epochs)
    spec = load_job_spec(path)
    proc = _submit(path, tmp_path)
    try:
        _wait(proc, tmp_path, "the first epoch in the store",
              lambda: any(t.epoch >= 1 for t in _trials(spec.store, spec.name)))
        server.kill()
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return spec, proc


@pytest.mark.slow
def test_mlflow_server_killed_mid_job_then_back_the_driver_catches_up_by_itself(tmp_path, mlflow_server):
    epochs = 8
    spec, proc = _job_losing_mlflow_after_epoch_one(tmp_path, mlflow_server, epochs)
    try:
        _wait(proc, tmp_path, "the driver's outage warning", lambda: "warning: MLflow at" in _stderr(tmp_path))
        # the driver is paused while the server restarts (~10 s; an epoch may take under 1 s), so
        # that the trial still has epochs to report once it answers (its worker waits meanwhile)
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            mlflow_server.start()  # the same port and backend
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        # caught up at the first event after the server answers, while the trial still trains
        _wait(proc, tmp_path, "the catch-up", lambda: "caught up with the store" in _stderr(tmp_path))
        assert [t.state for t in _trials(spec.store, spec.name)] == ["running"]
        err = _finish(proc, tmp_path)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert err.count("warning: MLflow at") == 1, err[-3000:]
    assert "caught up with the store" in err and "still behind" not in err, err[-3000:]
    store = open_store(spec.store)
    _assert_store_complete(store, spec.name, epochs)
    assert_mlflow_matches_store(store, spec.name, mlflow_server.uri, tmp_path)
    before = _snapshot(mlflow_server.uri, spec.name, mlflow_server.backend)
    again = subprocess.run([str(BIN / "ablate"), "sync", spec.name, "--store", spec.store], cwd=tmp_path,
                           env=_driver_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already up to date (nothing sent)" in again.stderr, again.stderr
    assert _snapshot(mlflow_server.uri, spec.name, mlflow_server.backend) == before


@pytest.mark.slow
def test_mlflow_server_down_until_the_job_ends_then_ablate_sync_brings_it_up_to_date(tmp_path, mlflow_server):
    from mlflow import MlflowClient

    epochs = 3
    spec, proc = _job_losing_mlflow_after_epoch_one(tmp_path, mlflow_server, epochs)
    try:
        err = _finish(proc, tmp_path)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert err.count("warning: MLflow at") == 2 and "still behind" in err and f"ablate sync {spec.name}" in err, \
        err[-3000:]
    store = open_store(spec.store)
    _assert_store_complete(store, spec.name, epochs)

    mlflow_server.start()
    (trial,) = store.trials_of(spec.name)
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    assert len(client.get_metric_history(trial.mlflow_run_id, "eval/AP")) < epochs  # MLflow is behind
    sync = [str(BIN / "ablate"), "sync", spec.name, "--store", spec.store]
    first = subprocess.run(sync, cwd=tmp_path, env=_driver_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and "MLflow is up to date" in first.stderr, first.stderr
    assert "metric point" in first.stderr and "mse/0:" in first.stderr, first.stderr
    assert_mlflow_matches_store(store, spec.name, mlflow_server.uri, tmp_path)
    before = _snapshot(mlflow_server.uri, spec.name, mlflow_server.backend)
    second = subprocess.run(sync, cwd=tmp_path, env=_driver_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "already up to date (nothing sent)" in second.stderr, second.stderr
    assert _snapshot(mlflow_server.uri, spec.name, mlflow_server.backend) == before


# --------------------------------------------------------------------------------- PostgreSQL restart

def _pg_ctl(action: str) -> subprocess.CompletedProcess:
    version = sorted(os.listdir("/etc/postgresql"))[-1]  # the cluster's version folder, e.g. 15
    return subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action],
                          capture_output=True, text=True, timeout=120)


def _psql(sql: str, timeout: float = 3) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL.replace("+psycopg", ""), connect_timeout=timeout, autocommit=True) as conn:
        conn.execute(sql)


def _pg_ensure_up() -> None:
    """Start the shared PostgreSQL if it is not running (never leave it stopped), then drop the
    pooled connections the restart killed in this process (other fixtures' engines reconnect)."""
    deadline = time.time() + 90
    while True:
        try:
            _psql("SELECT 1")
            break
        except Exception:
            assert time.time() < deadline, "PostgreSQL did not come back"
            _pg_ctl("start")  # "already running" is fine: it may still be starting
            time.sleep(1)
    import gc

    for obj in gc.get_objects():
        if issubclass(type(obj), sa.engine.Engine) and obj.dialect.name == "postgresql":  # type(): no lazy attributes
            obj.dispose()


@pytest.fixture
def pg_job_database():
    """A PostgreSQL database with a unique name for one job's store, dropped at the end."""
    try:
        _psql("SELECT 1")
    except Exception as e:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL unreachable: {e}")
        pytest.skip(f"PostgreSQL unreachable: {e}")
    name = f"ablate_resilience_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    _psql(f'CREATE DATABASE "{name}"')
    try:
        yield sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        _pg_ensure_up()
        _psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', timeout=10)


@pytest.mark.slow
def test_postgresql_restart_mid_job_the_job_finishes_with_every_metric_row_once(tmp_path, pg_job_database):
    if not os.path.isdir("/etc/postgresql") or os.geteuid() != 0:
        pytest.skip("restarting PostgreSQL needs the local cluster (pg_ctlcluster) as root")
    epochs = 10
    store_url = pg_job_database
    path = _job_file(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", store_url, epochs=epochs)
    spec = load_job_spec(path)
    proc = _submit(path, tmp_path)
    try:
        _wait(proc, tmp_path, "the first epoch in the store",
              lambda: any(t.epoch >= 1 for t in _trials(store_url, spec.name)))
        try:
            # stopped for 6 s (a plain restart may fall between two writes; epochs take 1-2 s, so
            # the recorder's writes of a few epochs meet it), longer until the driver has met the
            # outage (at most 20 s); then started again
            stop = _pg_ctl("stop")
            assert stop.returncode == 0, stop.stderr
            down = time.time()
            while time.time() < down + 20 and proc.poll() is None and (
                    time.time() < down + 6 or "connection lost" not in _stderr(tmp_path)):
                time.sleep(0.2)
        finally:
            _pg_ensure_up()
        assert "connection lost" in _stderr(tmp_path), _stderr(tmp_path)[-3000:]
        err = _finish(proc, tmp_path)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "connected again" in err, err[-3000:]
    store = open_store(store_url)
    _assert_store_complete(store, spec.name, epochs)
    (trial,) = store.trials_of(spec.name)
    with store.engine.connect() as conn:
        counts = conn.execute(sa.text("SELECT count(*) FROM metrics GROUP BY trial_id, name, step")).scalars().all()
    assert counts and set(counts) == {1}
    # every name on every step it is reported: train names each step, eval and epoch names each epoch
    per_name = defaultdict(list)
    for n, s, _, _ in store.metrics_of(trial.id):
        per_name[n].append(s)
    for n, steps in per_name.items():
        assert len(steps) in (epochs * STEPS_PER_EPOCH, epochs), (n, len(steps))
        assert steps == sorted(set(steps))
    assert len(counts) == sum(len(s) for s in per_name.values())
    store.close()
