"""Cluster mode end to end, with real processes: ``infra/local/cluster.sh`` (a head and two worker
raylets), ``infra/local/mlflow.sh`` (an MLflow server on PostgreSQL with proxied artifacts) and a
PostgreSQL results store; jobs go in through ``ray job submit`` exactly as the README says.

The cluster and the MLflow server are shared by the tests of this module (starting them costs
about half a minute on 2 cores); the fault test kills a worker node, so it runs last.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from test_infra_local import _bindable, _cluster_ports
from test_jobs import job_yaml
from test_store import pg_database  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _admin(sql: str) -> None:
    import psycopg

    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(sql)


def _env(state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["ABLATE_INFRA_DIR"] = str(state)
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    return env


def _exports(stdout: str) -> dict[str, str]:
    """``export K=V`` lines -> {K: V}; anything else on stdout fails the test (it must be eval-able)."""
    out = {}
    for line in stdout.splitlines():
        assert line.startswith("export ") and "=" in line, f"not an export line on stdout: {line!r}"
        k, v = line.removeprefix("export ").split("=", 1)
        out[k] = v.strip("'\"")
    return out


def _nodes(state: Path) -> list[dict[str, str]]:
    lines = (state / "ray" / "nodes.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, ln.split("\t"))) for ln in lines[1:] if ln.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()


def _session_pids(sids: set[int]) -> list[int]:
    """Every live process whose session is one of ``sids`` (read from /proc, no pattern matching)."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) in sids:
            found.append(int(p.name))
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pg_database):  # pg_database: PostgreSQL answers (CI fails, elsewhere skips, if not)
    state = tmp_path_factory.mktemp("infra")
    env = _env(state)
    port, dash = _cluster_ports(workers=2)  # a free block below the ephemeral range (infra/local's layout)
    mlflow_port = next(p for p in range(dash + 2, dash + 50) if _bindable(p))
    mlflow_db = f"ablate_e2e_mlflow_{uuid.uuid4().hex[:8]}"
    timings = {}
    t = time.perf_counter()
    up = subprocess.run([str(REPO / "infra/local/cluster.sh"), "up", "--workers", "2", "--cpus-per-node", "1",
                         "--port", str(port), "--dashboard-port", str(dash)],
                        env=env, capture_output=True, text=True, timeout=300)
    timings["cluster up"] = time.perf_counter() - t
    sids: set[int] = set()
    try:
        assert up.returncode == 0, up.stderr
        ray_env = _exports(up.stdout)
        sids = {int(n["pid"]) for n in _nodes(state)}
        t = time.perf_counter()
        ml = subprocess.run([str(REPO / "infra/local/mlflow.sh"), "up", "--port", str(mlflow_port), "--db", mlflow_db],
                            env=env, capture_output=True, text=True, timeout=300)
        timings["mlflow up"] = time.perf_counter() - t
        assert ml.returncode == 0, ml.stderr
        ml_env = _exports(ml.stdout)
        sids |= {int(x) for x in (state / "mlflow").glob("*.pid") for x in [x.read_text().strip()] if x}
        yield {"state": state, "env": {**env, **ray_env, **ml_env}, "ray": ray_env["RAY_ADDRESS"],
               "tracking": ml_env["MLFLOW_TRACKING_URI"], "timings": timings, "mlflow_db": mlflow_db}
    finally:
        downs = [subprocess.run([str(REPO / "infra/local/mlflow.sh"), "down", "--drop-db"], env=env,
                                capture_output=True, text=True, timeout=120),
                 subprocess.run([str(REPO / "infra/local/cluster.sh"), "down"], env=env, capture_output=True,
                                text=True, timeout=120)]
        left = _session_pids(sids)
        for pid in left:  # never leave a process behind, even when the scripts failed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _admin(f'DROP DATABASE IF EXISTS "{mlflow_db}" WITH (FORCE)')
        for d in downs:
            assert d.returncode == 0, d.stderr
        assert not left, f"processes left after down: {left}"


@pytest.fixture
def store_url(pg_database):
    """The store: the test session's PostgreSQL database (made and dropped by test_store's fixture);
    each test's job has its own name in it."""
    return pg_database


def _job(tmp: Path, name: str, *, variants: dict, seeds: list[int], epochs: int, **extra) -> Path:
    """test_jobs' tiny job (64 px, 24 images) in ``tmp/jobs/``, the folder ``ray job submit`` uploads;
    its store and tracking are given on the command line."""
    (tmp / "jobs").mkdir(exist_ok=True)
    return job_yaml(tmp / "jobs", name=name, seeds=seeds, epochs=epochs, variants=variants, **extra)


def _submit(cluster, tmp: Path, job: Path, store: str, submission_id: str, wait: bool = True):
    """``ray job submit --working-dir`` of ``ablate submit``, as the README's cluster section says."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster["ray"], "--working-dir", str(tmp),
           "--submission-id", submission_id, *([] if wait else ["--no-wait"]), "--",
           "ablate", "submit", f"jobs/{job.name}", "--tracking", cluster["tracking"], "--store", store,
           "--workdir", (tmp / "checkpoints").as_uri()]
    return subprocess.run(cmd, env=cluster["env"], capture_output=True, text=True, timeout=800)


def _job_status(cluster, submission_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(cluster["ray"]).get_job_status(submission_id)).split(".")[-1]


def _job_logs(cluster, submission_id: str) -> str:
    """The tail of the Ray job's driver log, for a failure message."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(cluster["ray"]).get_job_logs(submission_id)[-4000:]
    except Exception as e:  # the message is a courtesy; the assertion is what matters
        return f"(no logs: {e})"


def _mlflow_runs(tracking: str, job: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    exp = client.get_experiment_by_name(job)
    assert exp is not None, f"no MLflow experiment {job!r} on the server"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_ray_job_submit_spreads_trials_and_records_to_the_mlflow_server_and_postgres(cluster, store_url, tmp_path):
    from ablate.store import open_store

    job = _job(tmp_path, "e2e", variants={"mse": {"recipe.box_loss": "mse"}, "ciou": {"recipe.box_loss": "ciou"}},
               seeds=[0, 1], epochs=2)
    t = time.perf_counter()
    sub = _submit(cluster, tmp_path, job, store_url, "e2e-submit")
    cluster["timings"]["ray job submit (4 trials)"] = time.perf_counter() - t
    assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
    assert _job_status(cluster, "e2e-submit") == "SUCCEEDED", _job_logs(cluster, "e2e-submit")

    store = open_store(store_url, create=False)
    trials = store.trials_of("e2e")
    assert len(trials) == 4 and {t.state for t in trials} == {"finished"}
    assert len({t.node for t in trials}) >= 2, [t.node for t in trials]  # spread over the worker nodes
    head_ids = {n["node_id"][:12] for n in _nodes(cluster["state"]) if n["name"] == "head"}
    assert not {t.node for t in trials} & head_ids  # the head has no CPU for trials

    client, parents, children = _mlflow_runs(cluster["tracking"], "e2e")
    assert len(parents) == 1 and len(children) == 4
    by_run = {t.mlflow_run_id: t for t in trials}
    assert set(by_run) == {c.info.run_id for c in children}  # one child per trial, the one the store names
    for c in children:
        assert c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id and c.info.status == "FINISHED"
        trial = by_run[c.info.run_id]
        ap = [(m.step, m.value) for m in client.get_metric_history(c.info.run_id, "eval/AP")]
        stored = [(s, v) for _, s, _, v in store.metrics_of(trial.id, "eval/AP")]
        assert len(ap) == 2 and [s for s, _ in sorted(ap)] == [s for s, _ in sorted(stored)]  # once each
        assert [v for _, v in sorted(ap)] == pytest.approx([v for _, v in sorted(stored)])  # the same numbers
        local = Path(client.download_artifacts(c.info.run_id, "final.json", str(tmp_path)))  # through the server
        assert json.loads(local.read_text())["AP"] == pytest.approx(json.loads(trial.result_json)["AP"])
        local.unlink()

    # `ablate results` from "a laptop" (this process) against the same PostgreSQL store matches MLflow
    res = subprocess.run([str(BIN / "ablate"), "results", "e2e", "--store", store_url, "--format", "json"],
                         env=cluster["env"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    for row in doc["variants"]:
        finals = [max(client.get_metric_history(c.info.run_id, "eval/AP"), key=lambda m: m.step).value
                  for c in children if c.data.tags["ablate.variant"] == row["variant"]]
        assert len(finals) == 2 and row["AP"] == pytest.approx(sum(finals) / 2)
    print("\ntimings:", {k: f"{v:.1f} s" for k, v in cluster["timings"].items()})


def test_a_killed_worker_raylet_retries_the_trial_from_its_checkpoint_on_the_other_node(cluster, store_url, tmp_path):
    from ablate.store import open_store

    # retries to spare: until the cluster has marked the killed node dead (health checks, seconds
    # on a loaded machine) an attempt may still be placed on it and fail at once
    job = _job(tmp_path, "e2e-fault", variants={"mse": {"recipe.box_loss": "mse"}}, seeds=[0], epochs=6,
               max_failures=5)
    sub = subprocess.Popen([str(BIN / "ray"), "job", "submit", "--address", cluster["ray"], "--working-dir",
                            str(tmp_path), "--submission-id", "e2e-fault", "--no-wait", "--", "ablate", "submit",
                            f"jobs/{job.name}", "--tracking", cluster["tracking"], "--store", store_url,
                            "--workdir", (tmp_path / "checkpoints").as_uri()],
                           env=cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert sub.wait(timeout=120) == 0, sub.stdout.read()
    deadline = time.time() + 400
    victim = None
    while time.time() < deadline and victim is None:
        time.sleep(0.5)
        try:
            trials = open_store(store_url, create=False).trials_of("e2e-fault")
        except Exception:  # the driver has not created the schema yet
            continue
        # mid-trial: one epoch's checkpoint is on the shared storage, more epochs to go
        if trials and trials[0].state == "running" and trials[0].checkpoint and 1 <= (trials[0].epoch or 0) < 5:
            victim = next(n for n in _nodes(cluster["state"]) if n["node_id"].startswith(trials[0].node))
    assert victim is not None and victim["name"] != "head", \
        "the trial never got to a checkpoint mid-run:\n" + _job_logs(cluster, "e2e-fault")
    os.kill(int(victim["raylet_pid"]), signal.SIGKILL)  # the raylet of the trial's node, by its PID

    while time.time() < deadline and _job_status(cluster, "e2e-fault") not in ("SUCCEEDED", "FAILED", "STOPPED"):
        time.sleep(1)
    assert _job_status(cluster, "e2e-fault") == "SUCCEEDED", _job_logs(cluster, "e2e-fault")
    store = open_store(store_url, create=False)
    (trial,) = store.trials_of("e2e-fault")
    # at least one retry (a loaded machine may place one more attempt on the dying node before the
    # cluster has marked it dead); it ended on the surviving node
    assert trial.state == "finished" and trial.epoch == 6 and trial.attempts >= 2, _job_logs(cluster, "e2e-fault")
    assert not victim["node_id"].startswith(trial.node), "the retry ran on the killed node"
    assert json.loads(trial.result_json)["resumed_from_epoch"] >= 1  # from the checkpoint, not from scratch
    rows = store.metrics_of(trial.id)
    keys = [(n, s) for n, s, _, _ in rows]
    assert len(keys) == len(set(keys))  # no duplicate metric rows after the replayed epoch
    assert len([k for k in keys if k[0] == "eval/AP"]) == 6
    client, parents, children = _mlflow_runs(cluster["tracking"], "e2e-fault")
    assert len(children) == 1 and children[0].info.run_id == trial.mlflow_run_id
    for name in ("eval/AP", "loss/box"):
        steps = [m.step for m in client.get_metric_history(trial.mlflow_run_id, name)]
        assert len(steps) == len(set(steps)), name
