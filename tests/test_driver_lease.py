"""Issue 11, "resume and reuse must never mix results", without a Ray run.

- One driver per job: the lease is a compare-and-set in the store (SQLite and PostgreSQL), the
  heartbeat runs from the moment the job says running (data preparation included) until the
  driver ends, so `ablate resume` / a second `submit` during data preparation are refused and
  `ablate cancel` sees a live driver.
- Other code: trials trained by other code are not reused, a job holding them is refused with
  `--force` as the way to retrain, and `ablate status` shows them.
- The store from before (schema 0001) is refused until `ablate db upgrade`, which adds the
  columns (migration 0002) and keeps every row.
"""

from __future__ import annotations

import io
import threading
import time

import pytest
import sqlalchemy as sa
from rich.console import Console
from typer.testing import CliRunner

import ablate.fingerprint
import ablate.runner as runner
from ablate.cli import app
from ablate.runner import JobError, driver_alive, run_job
from ablate.spec import load_job_spec
from ablate.store import StoreError, open_store, upgrade
from ablate.store.store import Store
from test_runner_guards import finished_job, write_job
from test_store import pg_database, url  # noqa: F401  (fixtures: a SQLite file and a PostgreSQL schema)

pytestmark = pytest.mark.timeout(300)


def _quiet():
    return Console(file=io.StringIO())


def _heartbeat_threads(job: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"ablate-heartbeat-{job}"]


def _fast_heartbeat(monkeypatch, every: float = 0.05, stale: float = 0.5) -> None:
    monkeypatch.setattr(runner, "HEARTBEAT_EVERY_S", every)
    monkeypatch.setenv("ABLATE_HEARTBEAT_STALE_S", str(stale))


# --- the lease in the store --------------------------------------------------------------------------

def _create(name: str) -> dict:
    return dict(spec_yaml=f"name: {name}\n", spec_json={"name": name}, description="", baseline=None,
                tracking_uri=None)


def test_claim_is_a_compare_and_set_exactly_one_of_racing_drivers_wins(url):  # noqa: F811
    open_store(url).close()
    stores = [open_store(url) for _ in range(6)]
    barrier = threading.Barrier(len(stores))
    won: list[int] = []
    errors: list[BaseException] = []

    def claim(i: int) -> None:
        try:
            barrier.wait()
            if stores[i].claim_driver("raced", f"driver-{i}", stale_s=30, **_create("raced")):
                won.append(i)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(won) == 1  # one insert-or-claim succeeded, the others met a fresh lease
    store = stores[0]
    job = store.get_job("raced")
    assert job.state == "running" and job.driver_token == f"driver-{won[0]}" and driver_alive(job)

    winner, loser = f"driver-{won[0]}", "late"
    assert store.beat_driver("raced", winner) and not store.beat_driver("raced", loser)
    assert store.claim_driver("raced", winner, stale_s=30)  # its own lease: renewed
    time.sleep(0.3)
    assert store.claim_driver("raced", loser, stale_s=0.2)  # stale: taken over
    assert not store.beat_driver("raced", winner)  # the old driver learns it lost the job
    store.release_driver("raced", winner)  # not its lease: a no-op
    assert store.get_job("raced").driver_token == loser
    store.release_driver("raced", loser)
    job = store.get_job("raced")
    assert job.driver_token is None and not driver_alive(job)
    with pytest.raises(StoreError, match="no job named 'nope'"):
        store.claim_driver("nope", "x", stale_s=30)
    for s in stores:
        s.close()


# --- run_job: one driver, a heartbeat from the start --------------------------------------------------

def test_two_concurrent_submits_of_one_job_one_is_refused_in_one_line(tmp_path, monkeypatch):
    """Both drivers read "no such job" before either writes (the worst interleaving); the lease
    lets exactly one through and refuses the other with one line."""
    _fast_heartbeat(monkeypatch)
    path = write_job(tmp_path)  # written once: a file rewritten by one thread reads empty in the other
    spec = load_job_spec(path)
    open_store(spec.store).close()
    first_reads = threading.Barrier(2)
    local = threading.local()
    get_job = Store.get_job

    def racing_get_job(self, name):
        if getattr(local, "racing", False) and not getattr(local, "read", False):
            local.read = True
            row = get_job(self, name)
            first_reads.wait(timeout=30)  # both have read the store before either goes on
            return row
        return get_job(self, name)

    monkeypatch.setattr(Store, "get_job", racing_get_job)
    loser_done = threading.Event()
    preparing: list[str] = []

    def slow_prepare(spec_, say):
        preparing.append(threading.current_thread().name)
        assert loser_done.wait(timeout=60), "the other submit never ended"
        open_store(spec.store).set_job(spec.name, state="cancelled")  # end without Ray

    monkeypatch.setattr(runner, "_prepare_data", slow_prepare)
    results: dict[str, object] = {}

    def submit(name: str) -> None:
        local.racing = True
        try:
            results[name] = run_job(load_job_spec(path), "", workdir=tmp_path / "runs", live=False,
                                    mlflow=False, console=_quiet())
        except BaseException as e:  # noqa: BLE001 (checked below)
            results[name] = e
            loser_done.set()

    threads = [threading.Thread(target=submit, args=(n,), name=n) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    refused = [r for r in results.values() if isinstance(r, BaseException)]
    ran = [r for r in results.values() if not isinstance(r, BaseException)]
    assert len(refused) == 1 and len(ran) == 1, results
    assert isinstance(refused[0], JobError) and "has a live driver" in str(refused[0]), refused[0]
    assert "\n" not in str(refused[0])
    assert len(preparing) == 1 and ran[0].state == "cancelled"
    job = open_store(spec.store).get_job(spec.name)
    assert job.driver_token is None and not _heartbeat_threads(spec.name)


def test_resume_and_cancel_during_data_preparation(tmp_path, monkeypatch):
    """Data preparation longer than the stale time: the driver keeps beating, so `ablate resume`
    is refused (no second driver) and `ablate cancel` finds a live driver, which then stops."""
    _fast_heartbeat(monkeypatch, every=0.05, stale=0.5)
    path = write_job(tmp_path)
    spec = load_job_spec(path)
    started, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def slow_prepare(spec_, say):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("a second driver is preparing the same job")
        started.set()
        assert release.wait(timeout=120)

    monkeypatch.setattr(runner, "_prepare_data", slow_prepare)
    outcome: dict[str, object] = {}

    def drive() -> None:
        try:
            outcome["value"] = run_job(spec, path.read_text(), workdir=tmp_path / "runs", live=False, mlflow=False,
                                       console=_quiet())
        except BaseException as e:  # noqa: BLE001
            outcome["value"] = e

    driver = threading.Thread(target=drive)
    driver.start()
    try:
        assert started.wait(timeout=120)
        time.sleep(1.2)  # more than twice the stale time, all of it in data preparation
        store = open_store(spec.store)
        job = store.get_job(spec.name)
        assert job.state == "running" and driver_alive(job)
        cli = CliRunner()
        resumed = cli.invoke(app, ["resume", spec.name, "--store", spec.store, "--workdir", str(tmp_path / "runs")])
        assert resumed.exit_code == 2 and "has a live driver" in resumed.output, resumed.output
        assert len(resumed.output.strip().splitlines()) <= 2 and len(calls) == 1
        again = cli.invoke(app, ["submit", str(path), "--workdir", str(tmp_path / "runs")])
        assert again.exit_code == 2 and "has a live driver" in again.output, again.output
        cancelled = cli.invoke(app, ["cancel", spec.name, "--store", spec.store])
        assert cancelled.exit_code == 0, cancelled.output
        assert store.get_job(spec.name).state == "cancelled"
    finally:
        release.set()
        driver.join(timeout=120)
    result = outcome["value"]
    assert not isinstance(result, BaseException), result
    assert result.state == "cancelled" and set(result.states.values()) == {"cancelled"}
    assert len(calls) == 1  # one driver prepared, and only once
    job = open_store(spec.store).get_job(spec.name)
    assert job.state == "cancelled" and job.driver_token is None and not _heartbeat_threads(spec.name)


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_heartbeat_stops_and_lease_is_released_on_every_exit(tmp_path, monkeypatch, exc):
    _fast_heartbeat(monkeypatch)
    path = write_job(tmp_path)
    spec = load_job_spec(path)
    beating: list[bool] = []

    def failing_prepare(spec_, say):
        time.sleep(0.2)
        beating.append(bool(_heartbeat_threads(spec.name)))
        raise exc

    monkeypatch.setattr(runner, "_prepare_data", failing_prepare)
    with pytest.raises((JobError, KeyboardInterrupt)) as raised:
        run_job(spec, path.read_text(), workdir=tmp_path / "runs", live=False, mlflow=False, console=_quiet())
    if isinstance(exc, RuntimeError):
        assert "disk full" in str(raised.value)
    assert beating == [True] and not _heartbeat_threads(spec.name)
    job = open_store(spec.store).get_job(spec.name)
    assert job.driver_token is None and not driver_alive(job)
    assert job.state == ("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
    # the next driver is not locked out
    monkeypatch.setattr(runner, "_prepare_data", lambda s, say: open_store(spec.store).set_job(spec.name,
                                                                                                state="cancelled"))
    out = run_job(spec, path.read_text(), resume=True, workdir=tmp_path / "runs", live=False, mlflow=False,
                  console=_quiet())
    assert out.state == "cancelled"


# --- other code ---------------------------------------------------------------------------------------

def test_trials_of_other_code_are_not_reused_nor_mixed_and_status_shows_them(tmp_path, monkeypatch):
    monkeypatch.setattr(ablate.fingerprint, "code_fingerprint", lambda: "0" * 64)  # the code of back then
    spec, store = finished_job(tmp_path)
    old_hashes = {t.key: t.hash for t in spec.trials()}
    monkeypatch.undo()  # this ablate's code
    now = load_job_spec(write_job(tmp_path))
    for t in now.trials():
        assert t.hash != old_hashes[t.key]
        assert store.finished_trial_with_hash(t.hash) is None  # another job could not reuse them
    with pytest.raises(JobError) as refused:
        run_job(now, "", workdir=tmp_path / "runs", live=False, mlflow=False, console=_quiet())
    msg = str(refused.value)
    assert "2 recorded trial(s) were trained by other code" in msg and "code 000000000000" in msg
    assert "--force" in msg and "\n" not in msg
    resumed = CliRunner().invoke(app, ["resume", spec.name, "--store", spec.store])
    assert resumed.exit_code == 2 and f"`ablate resume {spec.name} --force`" in " ".join(resumed.output.split())
    assert [t.state for t in store.trials_of(spec.name)] == ["finished", "finished"]  # kept, not mixed

    status = CliRunner().invoke(app, ["status", spec.name, "--store", spec.store])
    assert status.exit_code == 0, status.output
    text = " ".join(status.output.split())
    assert "000000000000 (other)" in text
    assert f"2 trial(s) of job {spec.name} came from other code" in text and "--force" in text
    listing = CliRunner().invoke(app, ["status", "--store", spec.store])
    assert "2 trial(s) by other code" in " ".join(listing.output.split())

    # with --force they are retrained by this code (here: reset, then cancelled during preparation)
    monkeypatch.setattr(runner, "_prepare_data", lambda s, say: store.set_job(spec.name, state="cancelled"))
    out = run_job(now, "", force=True, workdir=tmp_path / "runs", live=False, mlflow=False, console=_quiet())
    assert out.state == "cancelled"
    trials = store.trials_of(spec.name)
    assert {t.code_fingerprint for t in trials} == {ablate.fingerprint.code_fingerprint()}
    assert {t.hash for t in trials} == {t.hash for t in now.trials()}
    status = CliRunner().invoke(app, ["status", spec.name, "--store", spec.store])
    assert "(other)" not in status.output and "other code" not in status.output


# --- the store from before: migration 0002 -------------------------------------------------------------

def test_a_0001_store_is_refused_until_upgraded_and_keeps_its_rows(url):  # noqa: F811
    assert upgrade(url, "0001") == "0001"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO jobs (name, description, spec_yaml, spec_json, state, created_at, updated_at) "
            "VALUES ('old', '', 'name: old', '{}', 'running', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)")
        job_id = conn.exec_driver_sql("SELECT id FROM jobs").scalar_one()
        conn.exec_driver_sql(f"INSERT INTO variants (job_id, name, overrides_json) VALUES ({job_id}, 'mse', '{{}}')")
        variant_id = conn.exec_driver_sql("SELECT id FROM variants").scalar_one()
        conn.exec_driver_sql(
            "INSERT INTO trials (job_id, variant_id, seed, hash, state, attempts, epoch, config_json, created_at, "
            f"updated_at) VALUES ({job_id}, {variant_id}, 0, 'h0', 'finished', 1, 3, '{{}}', CURRENT_TIMESTAMP, "
            "CURRENT_TIMESTAMP)")
    engine.dispose()
    shown = sa.make_url(url).render_as_string(hide_password=True)
    with pytest.raises(StoreError) as refused:
        open_store(url)
    assert str(refused.value) == (f"store {shown} is at schema 0001, this ablate needs 0002: "
                                  f"run `ablate db upgrade --store {shown}`")
    assert upgrade(url) == "0002"
    store = open_store(url, create=False)
    try:
        job = store.get_job("old")
        assert job.state == "running" and job.driver_token is None and not driver_alive(job)  # no driver
        (trial,) = store.trials_of("old")
        assert trial.state == "finished" and trial.hash == "h0" and trial.code_fingerprint is None
        assert store.code_fingerprints() == {"old": {None: 1}}  # unknown code: counts as other code
        assert store.claim_driver("old", "new-driver", stale_s=30)
    finally:
        store.close()
    from alembic import command

    import ablate.store.db as store_db

    engine = store_db.make_engine(url)
    with engine.begin() as conn:  # and back down: the columns go, the rows stay
        command.downgrade(store_db.alembic_config(conn), "0001")
    with engine.connect() as conn:
        assert store_db.current_revision(conn) == "0001"
        assert "code_fingerprint" not in {c["name"] for c in sa.inspect(conn).get_columns("trials")}
        assert conn.exec_driver_sql("SELECT hash FROM trials").scalar_one() == "h0"
    engine.dispose()
