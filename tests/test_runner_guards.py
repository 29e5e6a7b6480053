"""The runner's refusals and the job CLI's bookkeeping, without training anything.

Each case is one line for the user and leaves what is recorded intact.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ablate.cli import app
from ablate.record import Recorder, event_metrics, json_ready, mlflow_key
import ablate.fingerprint
from ablate.runner import JobError, driver_alive, run_job
from ablate.spec import load_job_spec
from ablate.store import open_store


def write_job(tmp: Path, lr: float = 0.003, **extra) -> Path:
    doc = {
        "name": "guarded",
        "dataset": {"synthetic": {"root": str(tmp / "synth"), "train": 8, "val": 4, "size": 64, "seed": 0},
                    "image_size": 64},
        "base": {"preset": "yolov3", "train": {"epochs": 1, "lr": lr}},
        "variants": {"mse": {}, "ciou": {"recipe.box_loss": "ciou"}},
        "seeds": [0],
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        "store": f"sqlite:///{tmp / 'ablate.db'}",
        **extra,
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def finished_job(tmp: Path):
    """Register the job (store only) and mark its trials finished, as a run would leave them."""
    path = write_job(tmp)
    spec = load_job_spec(path)
    store = open_store(spec.store)
    rec = Recorder(spec, store, path.read_text(), mlflow=False)
    rec.register(spec.trials())
    store.set_code_fingerprint([st.store_id for st in rec.trials.values()],  # as run_job does
                              ablate.fingerprint.code_fingerprint())
    for st in rec.trials.values():
        store.update_trial(st.store_id, state="finished", attempts=1)
        store.add_metrics(st.store_id, [("eval/AP", 10, 1, 0.25)])
    store.set_job(spec.name, state="finished")
    return spec, store


def test_reusing_a_job_name_with_another_spec_is_refused_and_keeps_the_results(tmp_path):
    spec, store = finished_job(tmp_path)
    changed = load_job_spec(write_job(tmp_path, lr=0.01))
    with pytest.raises(JobError, match="exists in .* with a different spec: 2 recorded trial"):
        run_job(changed, "", workdir=tmp_path / "runs", live=False)
    assert [t.state for t in store.trials_of(spec.name)] == ["finished", "finished"]
    assert all(store.metrics_of(t.id) for t in store.trials_of(spec.name))


def test_ray_client_address_is_refused(tmp_path):
    spec = load_job_spec(write_job(tmp_path))
    with pytest.raises(JobError, match="Ray Client"):
        run_job(spec, "", address="ray://head:10001", workdir=tmp_path / "runs", live=False)
    assert not (tmp_path / "ablate.db").exists()


def test_unusable_tracking_uri_fails_before_the_store_is_written(tmp_path):
    spec = load_job_spec(write_job(tmp_path, tracking={"uri": "sqllite:///typo.db"}))
    with pytest.raises(JobError, match="^tracking: cannot use MLflow at sqllite:///typo.db"):
        run_job(spec, "", workdir=tmp_path / "runs", live=False)
    assert open_store(spec.store).get_job(spec.name) is None


def test_live_driver_blocks_submit_and_resume_stale_one_asks_for_resume(tmp_path, monkeypatch):
    spec, store = finished_job(tmp_path)
    assert store.claim_driver(spec.name, "other-driver", stale_s=30)  # another driver holds the job now
    assert store.get_job(spec.name).state == "running"
    with pytest.raises(JobError, match="has a live driver"):
        run_job(spec, "", resume=True, workdir=tmp_path / "runs", live=False)
    monkeypatch.setenv("ABLATE_HEARTBEAT_STALE_S", "0.2")  # its heartbeat goes stale
    time.sleep(0.3)
    with pytest.raises(JobError, match="was interrupted .* `ablate resume guarded`"):
        run_job(spec, "", workdir=tmp_path / "runs", live=False)


def test_status_and_cancel_of_a_job_whose_driver_is_gone(tmp_path):
    spec, store = finished_job(tmp_path)
    trials = store.trials_of(spec.name)
    store.update_trial(trials[1].id, state="running")
    store.set_job(spec.name, state="running", updated_at=datetime.now(timezone.utc) - timedelta(minutes=5))
    assert not driver_alive(store.get_job(spec.name))  # no lease: the driver is gone
    runner = CliRunner()
    listing = runner.invoke(app, ["status", "--store", spec.store])
    assert listing.exit_code == 0 and "1 finished" in listing.output and "1 running" in listing.output
    detail = runner.invoke(app, ["status", spec.name, "--store", spec.store])
    assert "mse" in detail.output and "ciou" in detail.output
    cancel = runner.invoke(app, ["cancel", spec.name, "--store", spec.store])
    assert cancel.exit_code == 0, cancel.output
    assert [t.state for t in store.trials_of(spec.name)] == ["finished", "cancelled"]
    assert store.get_job(spec.name).state == "cancelled"
    missing = runner.invoke(app, ["status", "nope", "--store", spec.store])
    assert missing.exit_code == 2 and "no job named 'nope'" in missing.output and "guarded" in missing.output


def test_typo_store_is_not_created_by_read_commands(tmp_path):
    url = f"sqlite:///{tmp_path / 'typo.db'}"
    result = CliRunner().invoke(app, ["status", "--store", url])
    assert result.exit_code == 2 and "no ablate schema" in result.output
    if (tmp_path / "typo.db").exists():  # SQLite may leave an empty file behind, never a schema
        import sqlite3

        with sqlite3.connect(tmp_path / "typo.db") as conn:
            assert conn.execute("select count(*) from sqlite_master").fetchone()[0] == 0


def test_recorded_values_are_strict_json_and_mlflow_safe():
    assert json_ready({"a": float("nan"), "b": [float("inf"), 1.5], "NaN": "NaN"}) == \
        {"a": None, "b": [None, 1.5], "NaN": "NaN"}
    assert mlflow_key("eval/AP/person (occluded)&x") == "eval/AP/person _occluded__x"
    rows = event_metrics({"kind": "eval", "step": 7, "epoch": 2, "AP": 0.5, "per_class_AP": {"ring": None}})
    assert ("eval/AP", 7, 2, 0.5) in rows and rows[-1][0] == "eval/AP/ring" and rows[-1][3] != rows[-1][3]
