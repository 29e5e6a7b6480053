"""The command line in cluster mode: a PostgreSQL store made by `ablate db upgrade`, read
commands that say what is missing, and `ablate ui` pointing at a tracking server."""

from __future__ import annotations

import uuid

import pytest
from typer.testing import CliRunner

from ablate.cli import app

PG = "postgresql+psycopg://postgres@127.0.0.1:5432"


def _admin(sql: str) -> None:
    import psycopg

    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(sql)


def _exists(name: str) -> bool:
    import psycopg

    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres") as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


@pytest.fixture
def missing_db():
    name = f"ablate_cli_{uuid.uuid4().hex[:8]}"
    yield name
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_read_commands_on_a_missing_database_say_how_to_create_it_and_db_upgrade_does(missing_db):
    url = f"{PG}/{missing_db}"
    runner = CliRunner()
    status = runner.invoke(app, ["status", "--store", url])
    assert status.exit_code == 2 and "does not exist" in status.output
    assert f"ablate db upgrade --store {url}" in status.output and "ablate_reader" not in status.output
    assert not _exists(missing_db)  # a read command never creates anything
    up = runner.invoke(app, ["db", "upgrade", "--store", url])
    assert up.exit_code == 0, up.output
    assert f"created database {missing_db}" in up.output and _exists(missing_db)
    again = runner.invoke(app, ["db", "upgrade", "--store", url])
    assert again.exit_code == 0 and "created database" not in again.output
    assert runner.invoke(app, ["status", "--store", url]).exit_code == 0


def test_ui_with_a_tracking_server_prints_its_url_and_starts_nothing(tmp_path, monkeypatch):
    import subprocess

    def no_server(*a, **k):  # `ablate ui` must not start a local MLflow UI for a server URL
        raise AssertionError(f"started {a}")

    monkeypatch.setattr(subprocess, "call", no_server)
    monkeypatch.setattr(subprocess, "Popen", no_server)
    out = CliRunner().invoke(app, ["ui", "--tracking", "http://127.0.0.1:5050/"])
    assert out.exit_code == 0, out.output
    assert out.stdout.strip().splitlines()[-1] == "http://127.0.0.1:5050"


def test_a_jobs_api_address_is_refused_with_what_to_do(tmp_path, monkeypatch):
    """`eval "$(make -s cluster-up)"` exports RAY_ADDRESS=http://...: a plain `ablate submit` in that
    shell must say how to submit instead of failing inside ray.init."""
    import yaml

    doc = yaml.safe_load(open("jobs/cluster_smoke.yaml"))
    doc["store"] = f"sqlite:///{tmp_path / 'a.db'}"
    doc["dataset"]["synthetic"]["root"] = str(tmp_path / "synth")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8290")
    out = CliRunner().invoke(app, ["submit", str(path)])
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert "is the Jobs API" in out.output and "--address local" in out.output
    assert not (tmp_path / "a.db").exists()  # refused before the store is opened


@pytest.mark.parametrize(("device", "gpus", "says"), [("cuda", 0, "resources.gpus is 0"), ("cpu", 0.5, "reserved and idle")])
def test_a_device_that_contradicts_the_gpu_share_is_refused_before_anything_runs(tmp_path, device, gpus, says):
    import yaml

    doc = yaml.safe_load(open("jobs/cluster_smoke.yaml"))
    doc["store"] = f"sqlite:///{tmp_path / 'a.db'}"
    doc["dataset"]["synthetic"]["root"] = str(tmp_path / "synth")
    doc["base"]["device"] = device
    doc["resources"] = {"cpus": 1, "gpus": gpus}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = CliRunner().invoke(app, ["submit", str(path), "--address", "local"])
    assert out.exit_code == 2 and says in out.output and "Traceback" not in out.output, out.output
    assert not (tmp_path / "a.db").exists() and not (tmp_path / "synth").exists()
