"""Jobs end to end on a real local Ray: scheduling, recording, faults, resume, reuse, the CLI.

Every test trains tiny trials (64 px, 24 images, 2 epochs); they are marked slow but run in CI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ablate.cli import app
from ablate.runner import run_job
from ablate.spec import load_job_spec
from ablate.store import StoreError, open_store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ABLATE = str(Path(sys.executable).with_name("ablate"))


def job_yaml(tmp: Path, name: str = "tiny", seeds=(0,), epochs: int = 2, variants=None, **extra) -> Path:
    doc = {
        "name": name,
        "dataset": {"synthetic": {"root": str(tmp / "synth"), "train": 24, "val": 8, "size": 64, "seed": 3},
                    "image_size": 64, "hue": 0.0},
        "base": {"preset": "yolov3", "model": {"width": 0.125, "depth": 0.33},
                 "train": {"epochs": epochs, "batch_size": 8, "eval_every": 1, "log_every": 1, "warmup_epochs": 0.5}},
        "variants": variants or {"mse": {"recipe.box_loss": "mse"}, "ciou": {"recipe.box_loss": "ciou"}},
        "seeds": list(seeds),
        "baseline": "mse",
        "resources": {"cpus": 1},
        "max_concurrent": 2,
        "max_failures": 2,
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        "store": f"sqlite:///{tmp / 'ablate.db'}",
        **extra,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _trials_now(spec) -> list:
    """The job's trials as the store has them now ([] before the driver registered the job)."""
    if not Path(spec.store.removeprefix("sqlite:///")).exists():
        return []
    try:  # never create the schema here: that would race the driver's own migration of a new file
        store = open_store(spec.store, create=False)
    except StoreError:  # the driver is still creating the schema
        return []
    try:
        return store.trials_of(spec.name) if store.get_job(spec.name) is not None else []
    finally:
        store.close()


def _run(path: Path, tmp: Path, **kw):
    spec = load_job_spec(path)
    return spec, run_job(spec, path.read_text(), workdir=tmp / "runs", live=False, **kw)


def _child_runs(tracking_uri: str, job: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(job)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return client, parents, children


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """MLflow puts artifacts under ./mlruns: keep every test's side effects in its own folder."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_two_trials_at_once_recorded_in_mlflow_and_store(tmp_path, ray_local):
    path = job_yaml(tmp_path)
    spec, out = _run(path, tmp_path)
    assert out.state == "finished", out
    assert sorted(out.trained) == ["ciou/0", "mse/0"]

    store = open_store(spec.store)
    res = store.results(spec.name)
    assert len(res) == 2 and set(res["state"]) == {"finished"}
    assert res["AP50"].notna().all()

    client, parents, children = _child_runs(spec.tracking.uri, spec.name)
    assert len(parents) == 1 and len(children) == 2
    assert {c.info.run_name for c in children} == {"mse/0", "ciou/0"}
    for c in children:
        assert c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert c.info.status == "FINISHED"
        assert c.data.params["recipe.box_loss"] in ("mse", "ciou")
        assert c.data.tags["ablate.trial_hash"] in set(res["hash"])
        # the curves: loss terms by step, AP by evaluation
        assert len(client.get_metric_history(c.info.run_id, "loss/box")) >= 4
        ap = client.get_metric_history(c.info.run_id, "eval/AP")
        assert [m.step for m in ap] == sorted(m.step for m in ap) and len(ap) == 2
        # the store holds the same numbers as MLflow
        trial_id = int(res.loc[res["mlflow_run_id"] == c.info.run_id, "trial_id"].iloc[0])
        stored = {(n, s): v for n, s, _, v in store.metrics_of(trial_id, "eval/AP")}
        assert stored == {("eval/AP", m.step): pytest.approx(m.value) for m in ap}
    # two trials ran at the same time (max_concurrent 2, 1 CPU each on 2 CPUs)
    a, b = sorted(children, key=lambda r: r.info.start_time)
    assert b.info.start_time < a.info.end_time


def test_two_node_cluster_runs_trials_on_both(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        path = job_yaml(tmp_path, name="two-nodes", epochs=1)
        spec, out = _run(path, tmp_path, mlflow=False, shared_workdir=True)  # one machine: the folder is shared
        assert out.state == "finished"
        nodes = {t.node for t in open_store(spec.store).trials_of(spec.name)}
        assert len(nodes) == 2, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_killed_worker_retries_from_checkpoint_without_duplicates(tmp_path, ray_local):
    path = job_yaml(tmp_path, name="faulty", epochs=2, variants={"mse": {"recipe.box_loss": "mse"}})
    marker = tmp_path / "killed-once"
    spec, out = _run(path, tmp_path, fault={"trial": "mse/0", "epoch": 1, "marker": str(marker)})
    assert marker.exists(), "the fault was not injected"
    assert out.state == "finished"
    store = open_store(spec.store)
    (trial,) = store.trials_of(spec.name)
    assert trial.state == "finished" and trial.attempts == 2 and trial.epoch == 2
    rows = store.metrics_of(trial.id)
    keys = [(n, s) for n, s, _, _ in rows]
    assert len(keys) == len(set(keys))
    client, parents, children = _child_runs(spec.tracking.uri, spec.name)
    assert len(children) == 1
    for name in ("loss/box", "eval/AP"):
        steps = [m.step for m in client.get_metric_history(children[0].info.run_id, name)]
        assert len(steps) == len(set(steps)), name
    assert len([s for n, s, _, _ in rows if n == "eval/AP"]) == 2  # epochs 1 and 2: epoch 2 replayed once


def test_resubmitting_a_finished_job_trains_nothing_and_hashes_are_reused(tmp_path, ray_local):
    path = job_yaml(tmp_path, name="once", epochs=1, variants={"mse": {"recipe.box_loss": "mse"}})
    spec, first = _run(path, tmp_path)
    assert first.trained == ["mse/0"]
    _, again = _run(path, tmp_path)
    assert again.trained == [] and again.skipped == ["mse/0"] and again.state == "finished"
    # another job with the same trial content reuses it instead of training
    other = job_yaml(tmp_path, name="other", epochs=1, variants={"mse": {"recipe.box_loss": "mse"}})
    spec2, third = _run(other, tmp_path)
    assert third.trained == [] and third.reused == ["mse/0"]
    res = open_store(spec2.store).results("other")
    first_res = open_store(spec.store).results("once")
    assert res["AP"].iloc[0] == pytest.approx(first_res["AP"].iloc[0])
    _, _, children = _child_runs(spec.tracking.uri, "once")
    assert len(children) == 1


def test_killed_driver_then_resume_finishes_without_rerunning(tmp_path, monkeypatch):
    path = job_yaml(tmp_path, name="interrupted", epochs=8, seeds=(0,),
                    variants={"mse": {"recipe.box_loss": "mse"}, "ciou": {"recipe.box_loss": "ciou"}},
                    max_concurrent=1)
    spec = load_job_spec(path)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([ABLATE, "submit", str(path), "--workdir", str(tmp_path / "runs")], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    first = None
    try:
        while time.time() < deadline:  # wait until the first trial finished and the second has a checkpoint
            time.sleep(0.3)
            trials = {t.id: t for t in _trials_now(spec)}
            states = [t.state for t in trials.values()]
            if states.count("finished") == 1 and any(t.state == "running" and t.checkpoint for t in trials.values()):
                first = next(t for t in trials.values() if t.state == "finished")
                break
        assert first is not None, "the job did not get far enough"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and anything it started
        proc.wait()
    store = open_store(spec.store)
    assert store.get_job(spec.name).state == "running"  # nobody could record the interruption
    # a fresh heartbeat means a live driver: resume refuses until it is stale
    early = CliRunner().invoke(app, ["resume", spec.name, "--store", spec.store, "--workdir", str(tmp_path / "runs")])
    assert early.exit_code == 2 and "live driver" in early.output, early.output
    monkeypatch.setenv("ABLATE_HEARTBEAT_STALE_S", "1")
    time.sleep(1.5)
    result = CliRunner().invoke(app, ["resume", spec.name, "--store", spec.store, "--workdir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    trials = store.trials_of(spec.name)
    assert all(t.state == "finished" for t in trials)
    again = next(t for t in trials if t.id == first.id)
    assert again.attempts == first.attempts == 1  # the finished trial was not run again
    second = next(t for t in trials if t.id != first.id)
    rows = store.metrics_of(second.id, "eval/AP")
    assert [s for _, s, _, _ in rows] == sorted({s for _, s, _, _ in rows}) and len(rows) == 8
    _, parents, children = _child_runs(spec.tracking.uri, spec.name)
    assert len(children) == 2  # the continued trial kept its run
    assert len(parents) == 2 and any(p.data.tags.get("ablate.state") == "interrupted" for p in parents)
    assert store.get_job(spec.name).state == "finished"


def test_cli_submit_dry_run_and_results_and_read_only_query(tmp_path, ray_local):
    path = job_yaml(tmp_path, name="cli", epochs=1)
    runner = CliRunner()
    dry = runner.invoke(app, ["submit", str(path), "--dry-run"])
    assert dry.exit_code == 0 and "mse" in dry.output and "ciou" in dry.output
    assert not (tmp_path / "ablate.db").exists() and not (tmp_path / "mlflow.db").exists()
    spec, out = _run(path, tmp_path)
    assert out.state == "finished"
    store = ["--store", spec.store]
    res = runner.invoke(app, ["results", "cli", "--format", "csv", *store])
    assert res.exit_code == 0, res.output
    header, *lines = res.output.strip().splitlines()
    assert header.startswith("variant,is_baseline,seeds,pairs") and len(lines) == 2
    md = runner.invoke(app, ["results", "cli", "--format", "markdown", *store])
    assert "| mse (baseline) |" in md.output
    before = runner.invoke(app, ["query", "select count(*) from metrics", "--format", "csv", *store]).output
    for bad in ("delete from trials", "drop table trials", "update trials set state = 'x'",
                "select 1; delete from metrics"):
        r = runner.invoke(app, ["query", bad, *store])
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, (bad, r.output)
    after = runner.invoke(app, ["query", "select count(*) from metrics", "--format", "csv", *store]).output
    assert before == after and int(after.splitlines()[1]) > 0
    status = runner.invoke(app, ["status", "cli", *store])
    assert status.exit_code == 0 and "finished" in status.output


def test_cancel_stops_a_running_job(tmp_path):
    path = job_yaml(tmp_path, name="cancelme", epochs=8, max_concurrent=1)
    spec = load_job_spec(path)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([ABLATE, "submit", str(path), "--workdir", str(tmp_path / "runs")], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            time.sleep(0.3)
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # the driver must not have ended
            if any(t.state == "running" and t.epoch >= 1 for t in _trials_now(spec)):
                break
        cancel = CliRunner().invoke(app, ["cancel", spec.name, "--store", spec.store])
        assert cancel.exit_code == 0, cancel.output
        assert proc.wait(timeout=120) == 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    store = open_store(spec.store)
    assert store.get_job(spec.name).state == "cancelled"
    states = sorted(t.state for t in store.trials_of(spec.name))
    assert "cancelled" in states and not {"running", "pending"} & set(states), states
    _, parents, children = _child_runs(spec.tracking.uri, spec.name)
    assert parents[0].info.status == "KILLED"
