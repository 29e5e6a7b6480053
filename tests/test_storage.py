"""Tune's checkpoint storage (``--workdir``): folders, URIs, and the refusal of a local folder
that the nodes of a cluster do not share."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from ablate.cli import app
from ablate.runner import JobError, Storage, check_storage_reach, open_checkpoint_dir, run_job
from ablate.spec import load_job_spec
from ablate.store import open_store
from ablate.train import CHECKPOINT

from test_jobs import job_yaml


def test_a_folder_is_resolved_and_not_shared_unless_declared(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Storage.parse("runs")
    assert s.root == str(tmp_path / "runs") and not s.shared and not s.is_uri
    assert Storage.parse("runs", shared=True).shared
    assert s.job_path("j") == str(tmp_path / "runs" / "j") and (tmp_path / "runs" / "j").is_dir()


@pytest.mark.parametrize("uri", ["s3://bucket/ablate", "gs://bucket/prefix/", "file:///mnt/shared/ablate"])
def test_uris_are_shared_and_kept_as_uris(uri):
    s = Storage.parse(uri)
    assert s.shared and s.is_uri and s.root == uri.rstrip("/")
    assert s.job_path("box") == uri.rstrip("/") + "/box"


def test_an_unknown_scheme_is_refused_in_one_line():
    with pytest.raises(JobError) as e:
        Storage.parse("ftp://host/x")
    assert "--workdir ftp://host/x" in str(e.value) and "s3://" in str(e.value) and "\n" not in str(e.value)


def test_an_unreachable_bucket_is_refused_in_one_line_and_a_file_uri_is_created(tmp_path):
    with pytest.raises(JobError) as e:  # no network here: resolving the bucket fails, as a missing one would
        Storage.parse("s3://ablate-no-such-bucket/x").check()
    assert str(e.value).startswith("--workdir s3://ablate-no-such-bucket/x: cannot open it:") and "\n" not in str(e.value)
    Storage.parse((tmp_path / "a" / "b").as_uri()).check()
    assert (tmp_path / "a" / "b").is_dir()


def test_checkpoint_location_keeps_the_uri_scheme():
    ck = SimpleNamespace(path="bucket/ablate/box/exp/trial_1/checkpoint_000002")
    assert Storage.parse("s3://bucket/ablate").checkpoint_uri(ck) == "s3://bucket/ablate/box/exp/trial_1/checkpoint_000002"
    local = SimpleNamespace(path="/mnt/x/box/checkpoint_000001")
    assert Storage.parse("file:///mnt/x").checkpoint_uri(local) == "/mnt/x/box/checkpoint_000001"
    assert Storage.parse("/mnt/x", shared=True).checkpoint_uri(local) == "/mnt/x/box/checkpoint_000001"


def test_a_local_folder_on_several_nodes_is_refused_unless_declared_shared(tmp_path):
    check_storage_reach(Storage.parse(tmp_path), nodes=1)
    check_storage_reach(Storage.parse(tmp_path, shared=True), nodes=3)
    check_storage_reach(Storage.parse("s3://b/p"), nodes=3)
    with pytest.raises(JobError) as e:
        check_storage_reach(Storage.parse(tmp_path), nodes=2)
    msg = str(e.value)
    assert "2-node" in msg and "--shared-workdir" in msg and "s3://" in msg and "\n" not in msg


def test_open_checkpoint_dir_reads_a_uri_and_a_folder(tmp_path):
    ck = tmp_path / "exp" / "checkpoint_000001"
    ck.mkdir(parents=True)
    (ck / CHECKPOINT).write_bytes(b"weights")
    for where in (str(ck), ck.as_uri()):
        with open_checkpoint_dir(where) as d:
            assert d is not None and Path(d, CHECKPOINT).read_bytes() == b"weights"
    for missing in (str(tmp_path / "gone"), (tmp_path / "gone").as_uri()):
        with open_checkpoint_dir(missing) as d:
            assert d is None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_job_with_a_file_uri_keeps_its_checkpoints_there(tmp_path, monkeypatch):
    import ray

    monkeypatch.chdir(tmp_path)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        path = job_yaml(tmp_path, name="uri", epochs=2, variants={"mse": {"recipe.box_loss": "mse"}})
        spec = load_job_spec(path)
        shared = tmp_path / "shared"
        out = run_job(spec, path.read_text(), workdir=shared.as_uri(), live=False, mlflow=False)
        assert out.state == "finished", out
        (trial,) = open_store(spec.store).trials_of(spec.name)
        # the last checkpoint the store keeps lies under the URI's folder and holds the weights
        assert trial.checkpoint and Path(trial.checkpoint).is_relative_to(shared / "uri"), trial.checkpoint
        with open_checkpoint_dir(trial.checkpoint) as d:
            assert Path(d, CHECKPOINT).is_file()
        assert not (tmp_path / "runs").exists()
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_nodes_refuse_an_undeclared_folder_and_run_on_a_declared_shared_one(tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.chdir(tmp_path)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        path = job_yaml(tmp_path, name="mount", epochs=1, variants={"mse": {"recipe.box_loss": "mse"}})
        spec = load_job_spec(path)
        refused = CliRunner().invoke(app, ["submit", str(path), "--workdir", str(tmp_path / "runs")])
        assert refused.exit_code == 2, refused.output
        assert "2-node Ray cluster" in refused.output and "--shared-workdir" in refused.output
        assert "Traceback" not in refused.output
        store = open_store(spec.store)
        assert [t.state for t in store.trials_of(spec.name)] == ["pending"]  # nothing trained, nothing lost
        ok = CliRunner().invoke(app, ["submit", str(path), "--workdir", str(tmp_path / "runs"), "--shared-workdir"])
        assert ok.exit_code == 0, ok.output
        (trial,) = store.trials_of(spec.name)
        assert trial.state == "finished" and Path(trial.checkpoint).is_relative_to(tmp_path / "runs" / "mount")
    finally:
        ray.shutdown()
        cluster.shutdown()
