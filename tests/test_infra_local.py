"""infra/local/: a real multi-node Ray cluster (cluster.sh) and an MLflow server on PostgreSQL
(mlflow.sh), started as processes on this machine.

Each test uses its own state dir under tmp_path and random free ports, so it runs beside a
user's Ray/MLflow and beside other tests; everything it starts is stopped in ``finally``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "infra" / "local" / "cluster.sh"
MLFLOW = REPO / "infra" / "local" / "mlflow.sh"
BIN = Path(sys.executable).parent
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
STRIDE = 110  # ports per node in cluster.sh's layout


def _env(state: Path) -> dict[str, str]:
    """The scripts' environment: this venv, no inherited cluster addresses."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["ABLATE_INFRA_DIR"] = str(state)
    if (BIN / "ray").exists():
        env["ABLATE_VENV_BIN"] = str(BIN)
    return env


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cluster_ports(workers: int) -> tuple[int, int]:
    """(GCS port P, dashboard port) such that P, P+1 (client) and P+10 .. P+9+(workers+1)*STRIDE
    are free, below the ephemeral range (so outgoing connections do not take them meanwhile)."""
    span = 10 + (workers + 1) * STRIDE
    for _ in range(200):
        port = random.randrange(20000, 32000 - span - 10)
        dash = port + span + 1 + random.randrange(5)
        wanted = [port, port + 1, dash, *range(port + 10, port + span)]
        if all(_bindable(p) for p in wanted):
            return port, dash
    pytest.fail("no free block of ports for a cluster")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*args, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout)


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (a zombie has exited; only its
    parent's wait() is missing, and that parent is not ours)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _session_pids(sids) -> list[int]:
    """Live processes of the given sessions (ps -s), zombies excluded."""
    if not sids:
        return []
    out = subprocess.run(["ps", "-s", ",".join(map(str, sids)), "-o", "pid="], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if _alive(int(p))]


def _kill_sessions(sids) -> None:
    """Last resort when a script failed: SIGKILL what is left of the sessions we started."""
    for pid in _session_pids(sids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _nodes(state: Path) -> list[dict[str, str]]:
    lines = (state / "ray" / "nodes.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, ln.split("\t"))) for ln in lines[1:]]


def _eval_exports(stdout: str, names: list[str]) -> dict[str, str]:
    """What a shell gets from ``eval "$(... up)"``; bash fails on anything that is not a command."""
    script = 'eval "$1" || exit 9; ' + "; ".join(f'printf "%s\\n" "${n}"' for n in names)
    res = subprocess.run(["bash", "-c", script, "_", stdout], capture_output=True, text=True, env={})
    assert res.returncode == 0 and not res.stderr, res.stderr
    return dict(zip(names, res.stdout.splitlines()))


def _wait_job(client, submission_id: str, timeout: float = 180) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(submission_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status.value
        time.sleep(0.5)
    return "TIMEOUT"


def _pg_exists(db: str) -> bool:
    import psycopg

    with psycopg.connect(PG_ADMIN, connect_timeout=5) as conn:
        return conn.execute("select 1 from pg_database where datname = %s", (db,)).fetchone() is not None


def _pg_or_skip() -> None:
    import psycopg

    try:
        psycopg.connect(PG_ADMIN, connect_timeout=3).close()
    except psycopg.OperationalError as e:
        reason = f"PostgreSQL unreachable at 127.0.0.1:5432: {str(e).strip().splitlines()[0]}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


# --- argument errors (fast) ------------------------------------------------------------------------

@pytest.mark.parametrize("script,args,needle", [
    (CLUSTER, ["up", "--workers", "x"], "--workers"),
    (CLUSTER, ["up", "--port", "80"], "--port"),
    (CLUSTER, ["up", "--dashboard-port"], "--dashboard-port"),
    (CLUSTER, ["up", "--bogus", "1"], "--bogus"),
    (CLUSTER, ["status", "--workers", "2"], "--workers"),
    (MLFLOW, ["up", "--port", "5o5o"], "--port"),
    (MLFLOW, ["up", "--db", "x;drop"], "--db"),
    (MLFLOW, ["status", "--drop-db"], "--drop-db"),
])
def test_bad_options_exit_2_with_one_line_and_start_nothing(tmp_path, script, args, needle):
    state = tmp_path / "state"
    res = _run(script, *args, "--state-dir", state, env=_env(state), timeout=30)
    assert res.returncode == 2, res
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.stderr, res.stderr
    assert not state.exists()  # nothing recorded, so nothing was started


def test_help_and_status_of_nothing(tmp_path):
    state = tmp_path / "state"
    for script in (CLUSTER, MLFLOW):
        res = _run(script, "--help", env=_env(state), timeout=30)
        assert res.returncode == 0 and "usage:" in res.stdout and "down" in res.stdout
        res = _run(script, "status", "--state-dir", state, env=_env(state), timeout=30)
        assert res.returncode == 3 and res.stdout == "" and "down" in res.stderr
        res = _run(script, "down", "--state-dir", state, env=_env(state), timeout=30)
        assert res.returncode == 0


# --- the Ray cluster -------------------------------------------------------------------------------

SPREAD = """
import json, shutil, time, ray
ray.init()
@ray.remote(num_cpus=1)
def where():
    time.sleep(1)
    return ray.get_runtime_context().get_node_id()
ids = ray.get([where.options(scheduling_strategy="SPREAD").remote() for _ in range(4)])
print("RESULT=" + json.dumps({"tasks": sorted(set(ids)), "driver": ray.get_runtime_context().get_node_id(),
                               "ablate": shutil.which("ablate")}))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cluster_up_runs_tasks_on_two_workers_and_jobs_then_down_leaves_nothing(tmp_path, monkeypatch, capsys):
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_nodes

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # for this process's own state/Jobs API calls
    state = tmp_path / "state"
    env = _env(state)
    port, dash = _cluster_ports(workers=2)
    common = ["--state-dir", state]
    sids: set[int] = set()
    timings = {}
    try:
        t = time.perf_counter()
        up = _run(CLUSTER, "up", "--workers", 2, "--cpus-per-node", 1, "--port", port, "--dashboard-port", dash,
                  *common, env=env)
        timings["cluster up (2 workers)"] = time.perf_counter() - t
        nodes = _nodes(state) if (state / "ray" / "nodes.tsv").exists() else []
        sids = {int(n["pid"]) for n in nodes}
        assert up.returncode == 0, up.stderr

        # stdout: only export lines, and a shell can eval them
        assert up.stdout.splitlines() == [f"export RAY_ADDRESS=http://127.0.0.1:{dash}",
                                          "export RAY_AUTH_MODE=disabled"]
        address = _eval_exports(up.stdout, ["RAY_ADDRESS", "RAY_AUTH_MODE"])["RAY_ADDRESS"]
        assert address == f"http://127.0.0.1:{dash}"

        # nodes.tsv: head + 2 workers, each its own session with its own raylet
        assert [n["name"] for n in nodes] == ["head", "worker1", "worker2"]
        for n in nodes:
            pid, raylet = int(n["pid"]), int(n["raylet_pid"])
            assert _alive(pid) and _alive(raylet)
            assert os.getsid(pid) == pid and os.getsid(raylet) == pid
            assert Path(f"/proc/{raylet}/comm").read_text().strip() == "raylet"
        assert len({n["node_id"] for n in nodes}) == 3

        # Ray's own view through the state API: 3 alive nodes with those ids, only the head a head
        seen = {n.node_id: n for n in list_nodes(address=address)}
        assert {k for k, n in seen.items() if n.state == "ALIVE"} == {n["node_id"] for n in nodes}
        assert [seen[n["node_id"]].is_head_node for n in nodes] == [True, False, False]
        assert [seen[n["node_id"]].resources_total.get("CPU", 0) for n in nodes] == [0, 1, 1]

        # second up on the same state dir: refused, nothing new started
        again = _run(CLUSTER, "up", "--workers", 2, "--port", port, "--dashboard-port", dash, *common, env=env)
        assert again.returncode == 1 and again.stdout == "" and "already running" in again.stderr
        assert _nodes(state) == nodes

        # a job through the Jobs API (CLI from the venv), and a driver spreading tasks over both workers
        sub = _run(BIN / "ray", "job", "submit", "--address", address, "--no-wait", "--submission-id", "one",
                   "--", "python", "-c", "print(1)", env={**env, "RAY_AUTH_MODE": "disabled"}, timeout=120)
        assert sub.returncode == 0, sub.stderr
        client = JobSubmissionClient(address)
        assert _wait_job(client, "one") == "SUCCEEDED", client.get_job_logs("one")
        assert client.get_job_logs("one").strip().endswith("1")
        client.submit_job(entrypoint=f"python -c '{SPREAD}'", submission_id="spread")
        assert _wait_job(client, "spread") == "SUCCEEDED", client.get_job_logs("spread")
        logs = client.get_job_logs("spread").splitlines()  # the first line echoes the entrypoint
        result = json.loads(next(ln for ln in logs if ln.startswith("RESULT=")).removeprefix("RESULT="))
        by_name = {n["name"]: n["node_id"] for n in nodes}
        assert result["tasks"] == sorted([by_name["worker1"], by_name["worker2"]])
        assert result["driver"] == by_name["head"]  # the job's driver needs no CPU and runs on the head
        assert result["ablate"] == str(BIN / "ablate")  # the venv's bin is first on the nodes' PATH

        # status: every node alive with its raylet pid and node id
        st = _run(CLUSTER, "status", *common, env=env, timeout=60)
        assert st.returncode == 0, st.stderr
        for n in nodes:
            row = next(r.split() for r in st.stdout.splitlines() if r.split()[0] == n["name"])
            assert row[1:] == [n["pid"], n["raylet_pid"], "alive", "ALIVE", n["node_id"]], st.stdout
        everything = _session_pids(sids)
        assert len(everything) > 3 * 2  # leaders, raylets, agents, GCS, dashboard, workers...

        t = time.perf_counter()
        down = _run(CLUSTER, "down", *common, env=env, timeout=120)
        timings["cluster down"] = time.perf_counter() - t
        assert down.returncode == 0 and down.stdout == "", down.stderr
        assert not [pid for pid in everything if _alive(pid)]
        assert _session_pids(sids) == []
        assert not Path(f"/tmp/ablate-ray-{port}").exists()
        assert not (state / "ray" / "nodes.tsv").exists()
        assert _run(CLUSTER, "status", *common, env=env, timeout=60).returncode == 3
        assert _bindable(port) and _bindable(dash)
    finally:
        _run(CLUSTER, "down", *common, env=env, timeout=120)
        _kill_sessions(sids)
        shutil.rmtree(f"/tmp/ablate-ray-{port}", ignore_errors=True)
        with capsys.disabled():
            print("\n" + ", ".join(f"{k}: {v:.1f} s" for k, v in timings.items()))


# --- the MLflow server -----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mlflow_up_logs_through_the_server_then_down_drops_the_database(tmp_path, capsys):
    from mlflow import MlflowClient

    _pg_or_skip()
    state = tmp_path / "state"
    env = _env(state)
    port = _free_port()
    db = f"ablate_test_mlflow_{uuid.uuid4().hex[:8]}"
    common = ["--state-dir", state]
    sid = None
    timings = {}
    try:
        t = time.perf_counter()
        up = _run(MLFLOW, "up", "--port", port, "--db", db, *common, env=env)
        timings["mlflow up"] = time.perf_counter() - t
        pid_file = state / "mlflow" / "server.pid"
        sid = int(pid_file.read_text()) if pid_file.exists() else None
        assert up.returncode == 0, up.stderr
        assert up.stdout == f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{port}\n"
        uri = _eval_exports(up.stdout, ["MLFLOW_TRACKING_URI"])["MLFLOW_TRACKING_URI"]
        assert _pg_exists(db)
        assert os.getsid(sid) == sid
        with urllib.request.urlopen(f"{uri}/health", timeout=10) as r:
            assert r.status == 200

        # metric history and an artifact, both through the server (artifacts proxied)
        client = MlflowClient(uri)
        run = client.create_run(client.create_experiment(f"infra-{uuid.uuid4().hex[:6]}"))
        rid = run.info.run_id
        for step, loss in enumerate([1.0, 0.5, 0.25]):
            client.log_metric(rid, "loss", loss, step=step)
        src = tmp_path / "note.txt"
        src.write_text("through the server\n")
        client.log_artifact(rid, str(src))
        assert [(m.step, m.value) for m in client.get_metric_history(rid, "loss")] == [(0, 1.0), (1, 0.5), (2, 0.25)]
        assert client.get_run(rid).info.artifact_uri.startswith("mlflow-artifacts:/")
        back = Path(client.download_artifacts(rid, "note.txt", str(tmp_path / "back")))
        assert back.read_text() == "through the server\n"
        stored = list((state / "mlflow" / "artifacts").rglob("note.txt"))
        assert len(stored) == 1  # the server wrote it to its --artifacts-destination

        status = _run(MLFLOW, "status", *common, env=env, timeout=60)
        assert status.returncode == 0 and "health=ok" in status.stdout
        again = _run(MLFLOW, "up", "--port", _free_port(), "--db", db, *common, env=env, timeout=60)
        assert again.returncode == 1 and again.stdout == "" and "already running" in again.stderr

        everything = _session_pids([sid])
        t = time.perf_counter()
        down = _run(MLFLOW, "down", "--drop-db", *common, env=env, timeout=120)
        timings["mlflow down --drop-db"] = time.perf_counter() - t
        assert down.returncode == 0 and down.stdout == "", down.stderr
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        assert everything and not [pid for pid in everything if _alive(pid)]
        assert _session_pids([sid]) == []
        assert not _pg_exists(db)
        assert _run(MLFLOW, "status", *common, env=env, timeout=60).returncode == 3
    finally:
        _run(MLFLOW, "down", "--drop-db", *common, env=env, timeout=120)
        if sid:
            _kill_sessions([sid])
        with capsys.disabled():
            print("\n" + ", ".join(f"{k}: {v:.1f} s" for k, v in timings.items()))
