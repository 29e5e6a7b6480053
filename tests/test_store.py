"""The SQL results store, on SQLite (a file under tmp_path) and PostgreSQL (127.0.0.1:5432).

PostgreSQL: one fresh database per test session (dropped at the end); each test
gets its own schema in it (``search_path`` in the URL), so every test starts
from an empty store. Unreachable PostgreSQL fails the run under CI and skips
those tests otherwise.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

import ablate.store.db as store_db
from ablate.store import (
    SCHEMA_REVISION,
    Job,
    VERSION_TABLE,
    Store,
    StoreError,
    open_store,
    upgrade,
)
from ablate.store.views import VIEW_NAMES, VIEWS_SQL, statements

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("ABLATE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
COCO = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def pg_database():
    """The URL of a fresh, uniquely named PostgreSQL database (dropped after the session)."""
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except sa.exc.OperationalError as e:
        admin.dispose()
        reason = f"PostgreSQL unreachable at {PG_ADMIN_URL}: {str(e.orig).strip().splitlines()[0]}"
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI is set: the store must be tested on PostgreSQL)")
        pytest.skip(reason)
    name = f"ablate_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def _pg_schema_url(database_url: str) -> str:
    """A URL whose connections work in a new, empty schema of the session database."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    engine.dispose()
    return sa.make_url(database_url).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
        hide_password=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    """An empty database: a SQLite file (in a folder that does not exist yet) or a PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'stores' / 'ablate.db'}"
    return _pg_schema_url(request.getfixturevalue("pg_database"))


@pytest.fixture
def store(url):
    s = open_store(url)
    yield s
    s.close()


def _job(store: Store, name: str = "box_losses", baseline: str | None = "giou"):
    return store.create_or_get_job(name, description=f"{name} job", spec_yaml=f"name: {name}\n",
                                   spec_json={"name": name}, baseline=baseline, tracking_uri="sqlite:///mlflow.db")


def _trials(variants=("giou", "ciou"), seeds=(0, 1), tag=""):
    return [dict(variant=v, overrides={"box_loss": v}, seed=s, hash=f"h-{v}-{s}{tag}",
                 config={"recipe": {"box_loss": v}, "seed": s}) for v in variants for s in seeds]


def _eval_rows(step: int, epoch: int, base: float):
    return [(f"eval/{k}", step, epoch, base + i / 100) for i, k in enumerate(COCO)]


def _snapshot(store: Store):
    """Everything a write could change: every table's rows and the list of tables and views."""
    with store.engine.connect() as conn:
        insp = sa.inspect(conn)
        names = sorted(insp.get_table_names()), sorted(insp.get_view_names())
        rows = {t: sorted(map(tuple, conn.exec_driver_sql(f"SELECT * FROM {t}").all()), key=repr)
                for t in ("jobs", "variants", "trials", "metrics", VERSION_TABLE)}
    return names, rows


# --- schema and migrations ---------------------------------------------------------------------------

def test_views_sql_file_is_the_migration_text():
    assert (REPO / "dashboards" / "views.sql").read_text() == VIEWS_SQL
    stmts = statements(VIEWS_SQL)
    assert [s.split()[2] for s in stmts] == list(VIEW_NAMES)
    # executed at driver level: no placeholder characters may hide in them
    assert not any(c in s for s in stmts for c in "%?:")
    assert store_db.head_revision() == SCHEMA_REVISION


def test_fresh_store_is_created_at_head(url):
    with pytest.raises(StoreError, match=r"has no ablate schema: run `ablate db upgrade --store "):
        open_store(url, create=False)
    store = open_store(url)
    try:
        with store.engine.connect() as conn:
            insp = sa.inspect(conn)
            assert {"jobs", "variants", "trials", "metrics", VERSION_TABLE} <= set(insp.get_table_names())
            assert set(VIEW_NAMES) <= set(insp.get_view_names())
            assert conn.exec_driver_sql(f"SELECT version_num FROM {VERSION_TABLE}").scalar_one() == SCHEMA_REVISION
            assert {c["name"] for c in insp.get_columns("trial_results")} >= {
                "job", "variant", "seed", "trial_id", "hash", "state", "attempts", "epoch", "wall_seconds",
                "mlflow_run_id", *COCO}
        assert upgrade(url) == SCHEMA_REVISION  # idempotent
        open_store(url, create=False).close()
    finally:
        store.close()
    if url.startswith("sqlite"):
        assert Path(sa.make_url(url).database).is_file()  # its folder was created


def test_models_match_the_migrated_schema(store):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from ablate.store import Base

    with store.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "version_table": VERSION_TABLE})
        assert compare_metadata(ctx, Base.metadata) == []


def test_session_commits_or_rolls_back(store):
    with pytest.raises(RuntimeError):
        with store.session() as s:
            s.add(Job(name="rolled_back", spec_yaml="", spec_json="{}"))
            s.flush()
            raise RuntimeError("boom")
    assert store.get_job("rolled_back") is None
    with store.session() as s:
        s.add(Job(name="kept", spec_yaml="", spec_json="{}"))
    assert store.get_job("kept").name == "kept"


NEXT_REVISION = f"{int(SCHEMA_REVISION) + 1:04d}"  # what a newer ablate would carry


def _fake_newer_migrations(tmp_path: Path) -> Path:
    """A copy of the packaged migrations plus one revision past this ablate's head."""
    copy = tmp_path / f"migrations_{NEXT_REVISION}"
    shutil.copytree(store_db.MIGRATIONS_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "versions" / f"{NEXT_REVISION}_metric_name_index.py").write_text(textwrap.dedent(f'''
        """Index metrics by name.

        Revision ID: {NEXT_REVISION}
        Revises: {SCHEMA_REVISION}
        """
        from alembic import op

        revision = "{NEXT_REVISION}"
        down_revision = "{SCHEMA_REVISION}"
        branch_labels = None
        depends_on = None


        def upgrade():
            op.create_index("ix_metrics_name", "metrics", ["name"])


        def downgrade():
            op.drop_index("ix_metrics_name", table_name="metrics")
    '''))
    return copy


def test_store_at_another_schema_revision_is_refused(url, tmp_path, monkeypatch):
    open_store(url).close()  # at SCHEMA_REVISION, this ablate's head
    packaged = store_db.MIGRATIONS_DIR
    shown = sa.make_url(url).render_as_string(hide_password=True)
    head, nxt = SCHEMA_REVISION, NEXT_REVISION

    # an ablate that needs the next revision meets a store at this one
    monkeypatch.setattr(store_db, "MIGRATIONS_DIR", _fake_newer_migrations(tmp_path))
    with pytest.raises(StoreError) as refused:
        open_store(url)  # create=True does not upgrade an existing store behind the user's back
    assert str(refused.value) == (f"store {shown} is at schema {head}, this ablate needs {nxt}: "
                                  f"run `ablate db upgrade --store {shown}`")
    assert upgrade(url) == nxt
    newer = open_store(url, create=False)
    with newer.engine.connect() as conn:
        assert "ix_metrics_name" in {i["name"] for i in sa.inspect(conn).get_indexes("metrics")}
    newer.close()

    # this ablate meets the store a newer ablate upgraded
    monkeypatch.setattr(store_db, "MIGRATIONS_DIR", packaged)
    with pytest.raises(StoreError) as refused:
        open_store(url)
    assert str(refused.value) == (f"store {shown} is at schema {nxt}, unknown to this ablate (which needs {head}): "
                                  f"it was written by a newer ablate; upgrade ablate")
    with pytest.raises(StoreError, match="unknown to this ablate"):
        upgrade(url)

    # ablate's tables without a revision: not ours to touch
    engine = store_db.make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DELETE FROM {VERSION_TABLE}")
    engine.dispose()
    for attempt in (lambda: open_store(url), lambda: upgrade(url)):
        with pytest.raises(StoreError, match=r"has tables jobs, variants, trials, metrics but no ablate schema "
                                             r"revision") as refused:
            attempt()
        assert "\n" not in str(refused.value)


# --- jobs, variants, trials ---------------------------------------------------------------------------

def test_jobs_and_trials_are_idempotent(store):
    job = _job(store)
    assert (job.state, job.baseline, job.created_at.tzinfo is not None) == ("running", "giou", True)
    again = store.create_or_get_job("box_losses", description="edited", spec_yaml="name: box_losses\nx: 1\n",
                                    spec_json='{"name": "box_losses", "x": 1}', baseline="ciou", tracking_uri=None)
    assert again.id == job.id and again.description == "edited" and again.baseline == "ciou"
    assert store.get_job("box_losses").spec == {"name": "box_losses", "x": 1}
    assert store.get_job("nope") is None

    rows = store.ensure_trials("box_losses", _trials())
    assert [(t.variant_name, t.seed, t.state, t.attempts, t.epoch) for t in rows] == [
        ("giou", 0, "pending", 0, 0), ("giou", 1, "pending", 0, 0),
        ("ciou", 0, "pending", 0, 0), ("ciou", 1, "pending", 0, 0)]
    assert rows[2].config == {"recipe": {"box_loss": "ciou"}, "seed": 0}
    store.update_trial(rows[0].id, state="running", attempts=1, node="10.0.0.2", device="cpu")
    store.update_trial(rows[1].id, state="finished", attempts=1, epoch=3, wall_seconds=12.5,
                       result_json={"AP": 0.31}, mlflow_run_id="abc")

    # same spec again, in another order: same rows, nothing reset
    again = store.ensure_trials("box_losses", list(reversed(_trials())))
    assert [t.id for t in again] == [t.id for t in reversed(rows)]
    by_id = {t.id: t for t in store.trials_of("box_losses")}
    assert (by_id[rows[0].id].state, by_id[rows[0].id].attempts, by_id[rows[0].id].node) == ("running", 1, "10.0.0.2")
    assert (by_id[rows[1].id].state, by_id[rows[1].id].result, by_id[rows[1].id].epoch) == ("finished", {"AP": 0.31}, 3)
    assert [(t.variant_name, t.seed) for t in store.trials_of("box_losses")] == [
        ("giou", 0), ("giou", 1), ("ciou", 0), ("ciou", 1)]  # variant creation order, then seed
    assert store.get_trial(rows[1].id).wall_seconds == 12.5

    store.set_job("box_losses", state="finished", mlflow_experiment_id="7", mlflow_parent_run_id="p1")
    listed = store.list_jobs()
    assert [(j["name"], j["state"], j["trials"], j["n_trials"]) for j in listed] == [
        ("box_losses", "finished", {"finished": 1, "pending": 2, "running": 1}, 4)]
    assert store.get_job("box_losses").mlflow_parent_run_id == "p1"

    with pytest.raises(StoreError, match="no job named 'missing'"):
        store.ensure_trials("missing", _trials())
    with pytest.raises(ValueError, match="unknown trial state"):
        store.update_trial(rows[0].id, state="exploded")
    with pytest.raises(StoreError, match="no trial 999999"):
        store.get_trial(999999)


def test_changed_hash_resets_the_trial(store):
    _job(store)
    rows = store.ensure_trials("box_losses", _trials())
    for t in rows:
        store.update_trial(t.id, state="finished", attempts=2, epoch=3, mlflow_run_id=f"r{t.id}", result_json="{}",
                           checkpoint=f"/ckpt/{t.id}")
        store.add_metrics(t.id, [("loss/box", 1, 1, 0.5), *_eval_rows(3, 3, 0.2)])

    changed = _trials()
    changed[3]["hash"] = "h-ciou-1-new"
    changed[3]["config"] = {"recipe": {"box_loss": "ciou", "iou_weight": 2.0}, "seed": 1}
    new = store.ensure_trials("box_losses", changed)
    assert [t.id for t in new] == [t.id for t in rows]
    reset = store.get_trial(rows[3].id)
    assert (reset.hash, reset.state, reset.attempts, reset.epoch, reset.mlflow_run_id, reset.result_json,
            reset.checkpoint) == ("h-ciou-1-new", "pending", 0, 0, None, None, None)
    assert reset.config["recipe"]["iou_weight"] == 2.0
    assert store.metrics_of(rows[3].id) == []
    kept = store.get_trial(rows[2].id)
    assert (kept.state, kept.epoch, kept.checkpoint) == ("finished", 3, f"/ckpt/{rows[2].id}")
    assert len(store.metrics_of(rows[2].id)) == 13

    # --force: the same reset, hash and config kept
    store.reset_trial(rows[0].id)
    forced = store.get_trial(rows[0].id)
    assert (forced.hash, forced.state, forced.attempts, forced.epoch, forced.checkpoint) == (
        "h-giou-0", "pending", 0, 0, None)
    assert store.metrics_of(rows[0].id) == [] and len(store.metrics_of(rows[1].id)) == 13


# --- metrics -------------------------------------------------------------------------------------------

def test_add_metrics_is_idempotent_and_keeps_nan(store):
    _job(store)
    trial = store.ensure_trials("box_losses", _trials(seeds=(0,)))[0]
    rows = [("loss/box", step, step // 10, 1.0 / (step + 1)) for step in range(0, 3000)]
    assert store.add_metrics(trial.id, rows) == 3000
    assert store.add_metrics(trial.id, rows) == 0  # same rows again: nothing new
    assert store.add_metrics(trial.id, rows[-10:] + [("loss/box", 3000, 300, 0.1)]) == 1
    assert store.add_metrics(trial.id, []) == 0

    bad = [("loss/obj", 1, 0, float("nan")), ("loss/obj", 2, 0, float("inf")), ("loss/obj", 3, 0, -math.inf),
           ("loss/obj", 4, 0, 0.25)]
    assert store.add_metrics(trial.id, bad) == 4
    got = store.metrics_of(trial.id, "loss/obj")
    assert [r[:3] for r in got] == [("loss/obj", s, 0) for s in (1, 2, 3, 4)]
    assert all(math.isnan(r[3]) for r in got[:3]) and got[3][3] == 0.25
    with store.engine.connect() as conn:  # stored uniformly: NULL plus the flag
        assert conn.execute(sa.text("SELECT value, is_nan FROM metrics WHERE name = 'loss/obj' ORDER BY step")
                            ).all() == [(None, True), (None, True), (None, True), (0.25, False)]

    everything = store.metrics_of(trial.id)
    assert len(everything) == 3005 and everything[0] == ("loss/box", 0, 0, 1.0)  # by name, then step
    assert store.delete_metrics_after(trial.id, 1000) == 2000  # loss/box 1001..3000; loss/obj ends at 4
    remaining = store.metrics_of(trial.id)
    assert max(r[1] for r in remaining) == 1000
    with pytest.raises(StoreError, match="no trial 424242"):
        store.add_metrics(424242, [("lr", 1, 1, 0.1)])


def test_trial_results_take_the_last_step_and_follow_reuse(store):
    _job(store, "first")
    first = store.ensure_trials("first", _trials())
    # the final evaluation is recorded before an earlier one: the view goes by step, not by insertion
    store.add_metrics(first[0].id, _eval_rows(30, 3, 0.40))
    store.add_metrics(first[0].id, _eval_rows(10, 1, 0.10) + _eval_rows(20, 2, 0.20))
    store.add_metrics(first[0].id, [("eval/AP", 5, 0, 0.9), ("loss/box", 31, 3, 1.5)])
    store.add_metrics(first[1].id, [("eval/AP", 10, 1, 0.30), ("eval/AP", 20, 2, float("nan"))])
    store.update_trial(first[0].id, state="finished", epoch=3, wall_seconds=60.0, mlflow_run_id="run-a",
                       result_json={"AP": 0.4})
    store.update_trial(first[1].id, state="diverged", epoch=2)

    res = store.results("first")
    assert list(res["variant"]) == ["giou", "giou", "ciou", "ciou"] and list(res["seed"]) == [0, 1, 0, 1]
    row = res.iloc[0]
    assert [row[k] for k in COCO] == pytest.approx([0.40 + i / 100 for i in range(12)])
    assert (row["state"], row["epoch"], row["wall_seconds"], row["mlflow_run_id"]) == ("finished", 3, 60.0, "run-a")
    assert math.isnan(res.iloc[1]["AP"]) and math.isnan(res.iloc[1]["AP50"])  # last AP was NaN; no AP50 at all
    assert res["AP"].isna().sum() == 3

    # finished_trial_with_hash: finished only, any job, optionally not this one
    assert store.finished_trial_with_hash("h-giou-0").id == first[0].id
    assert store.finished_trial_with_hash("h-giou-1") is None  # diverged
    assert store.finished_trial_with_hash("h-giou-0", exclude_job="first") is None
    assert store.finished_trial_with_hash("no-such-hash") is None

    _job(store, "second")
    second = store.ensure_trials("second", _trials(variants=("giou",), seeds=(0,)))
    source = store.finished_trial_with_hash(second[0].hash, exclude_job="second")
    store.mark_reused(second[0].id, source.id)
    reused = store.get_trial(second[0].id)
    assert (reused.state, reused.reused_from, reused.mlflow_run_id, reused.result, reused.epoch,
            reused.wall_seconds) == ("reused", first[0].id, "run-a", {"AP": 0.4}, 3, 60.0)
    assert store.finished_trial_with_hash("h-giou-0", exclude_job="first") is None  # a reuse is not a source

    res2 = store.results("second")
    assert len(res2) == 1 and res2.iloc[0]["trial_id"] == second[0].id and res2.iloc[0]["job"] == "second"
    assert [res2.iloc[0][k] for k in COCO] == pytest.approx([0.40 + i / 100 for i in range(12)])
    curves = store.curves("second", ["eval/AP", "loss/box"])
    assert list(curves.columns) == ["job", "variant", "seed", "trial_id", "name", "step", "epoch", "value", "is_nan"]
    assert list(zip(curves["name"], curves["step"])) == [
        ("eval/AP", 5), ("eval/AP", 10), ("eval/AP", 20), ("eval/AP", 30), ("loss/box", 31)]
    assert set(curves["trial_id"]) == {second[0].id}
    nan_curve = store.curves("first", ["eval/AP"])
    nan_curve = nan_curve[nan_curve["trial_id"] == first[1].id]
    assert list(nan_curve["is_nan"]) == [False, True] and math.isnan(nan_curve["value"].iloc[1])
    assert len(store.curves("first")) == 12 * 3 + 2 + 2

    cols, rows = store.query('SELECT job, variant, n_trials, n_finished, "AP_mean" FROM variant_summary '
                             "ORDER BY job, variant")
    assert cols == ["job", "variant", "n_trials", "n_finished", "AP_mean"]
    assert [r[:4] for r in rows] == [("first", "ciou", 2, 0), ("first", "giou", 2, 1), ("second", "giou", 1, 1)]
    assert rows[1][4] == pytest.approx(0.40) and rows[2][4] == pytest.approx(0.40)
    with pytest.raises(StoreError, match="no job named"):
        store.results("third")


# --- read-only query ------------------------------------------------------------------------------------

WRITES = [
    "delete from trials",
    "DROP TABLE metrics",
    "update trials set state = 'finished'",
    "insert into jobs (name, spec_yaml, spec_json, created_at, updated_at) values ('x', '', '{}', '2020-01-01', "
    "'2020-01-01')",
    "pragma writable_schema=1",
    "select 1; delete from trials",
    "select count(*) from trials; drop table jobs;",
    "attach database 'other.db' as other",
    "with gone as (delete from trials returning id) select * from gone",
    "WITH x AS (SELECT 1) UPDATE trials SET seed = 9",
    "select * into trials_copy from trials",
    "create table t as select * from trials",
    "select * from trials for update",
    "/* just a comment */ delete from metrics",
    "select 'it''s fine'; -- and then\ndelete from metrics",
    "alter table jobs add column x int",
    "vacuum",
    "select set_config('default_transaction_read_only', 'off', false)",
    "",
]
# PostgreSQL: what a superuser login could read (issue 11), spelled past any list of names
SERVER_FILE_READS = [
    "select \"pg_read_file\"('/etc/passwd', 0, 40)",
    "select U&\"pg\\005fread_file\"('/etc/passwd', 0, 40)",
    # leave a role entered with SET ROLE, then read through dynamic SQL
    "select set_config('role', 'none', true), query_to_xml('select pg_read_file(''/etc/passwd'', 0, 40) as f', "
    "true, false, '')",
]


def _query(url: str, sql: str, *extra: str):
    from typer.testing import CliRunner

    from ablate.cli import app

    return CliRunner().invoke(app, ["query", sql, "--store", url, "--format", "csv", *extra])


def test_query_returns_columns_and_rows(store):
    from ablate.store.readonly import run_query

    _job(store)
    trials = store.ensure_trials("box_losses", _trials())
    store.add_metrics(trials[0].id, _eval_rows(10, 1, 0.5))
    cols, rows = run_query(store, "-- final AP per variant\n"
                           'SELECT variant, seed, "AP" FROM trial_results WHERE job = \'box_losses\' AND variant '
                           "LIKE 'g%' ORDER BY seed;")
    assert cols == ["variant", "seed", "AP"]
    assert rows == [("giou", 0, pytest.approx(0.5)), ("giou", 1, None)]
    cols, rows = run_query(store, "with n as (select count(*) as n from metrics) select n, 'a;b' as s from n")
    assert (cols, rows) == (["n", "s"], [(12, "a;b")])
    # classified by its structure, not by its words: an alias may be called load, copy or lock
    cols, rows = run_query(store, "select count(*) as load, count(*) as copy, 1 as lock from trials")
    assert (cols, rows) == (["load", "copy", "lock"], [(4, 4, 1)])
    with pytest.raises(StoreError, match="query failed: .*no_such_table"):
        run_query(store, "select * from no_such_table")
    store.update_trial(trials[0].id, state="running")  # the store is still writable afterwards
    # the command line: a plain SELECT over the views
    r = _query(store.url, 'select job, variant, n_trials from variant_summary order by variant')
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == ["job,variant,n_trials", "box_losses,ciou,2", "box_losses,giou,2"]


def test_query_refuses_writes_and_leaves_the_store_untouched(store, monkeypatch):
    from ablate.store import readonly
    from ablate.store.readonly import run_query

    _job(store)
    trials = store.ensure_trials("box_losses", _trials())
    store.add_metrics(trials[0].id, _eval_rows(10, 1, 0.5))
    before = _snapshot(store)
    dialect = store.engine.dialect.name
    for sql in WRITES:
        with pytest.raises(StoreError) as refused:
            run_query(store, sql)
        if dialect == "sqlite" and "set_config" in sql:  # not a SQLite function at all
            assert str(refused.value) == "query failed: no such function: set_config"
            continue
        assert str(refused.value).startswith("query refused: ") and "\n" not in str(refused.value), sql
    assert _snapshot(store) == before

    # the privileges alone: with the statement check switched off, every write is still refused,
    # named by the database (the authorizer on SQLite, the reader role on PostgreSQL)
    monkeypatch.setattr(readonly, "check_select", lambda sql, dialect: sql)
    # (PostgreSQL checks READ ONLY before the privileges: test_pg_reader_role_has_select_on_the_store_only
    # shows the role alone may not write)
    read_only = "cannot execute {} in a read-only transaction"
    unchecked = {"delete from trials": ("not allowed: write (delete) to table trials", read_only.format("DELETE")),
                 "update trials set state = 'finished'": ("not allowed: write (update) to table trials",
                                                          read_only.format("UPDATE")),
                 "DROP TABLE metrics": ("not allowed: drop (a schema change)", read_only.format("DROP TABLE")),
                 "insert into variants (job_id, name, overrides_json) values (1, 'x', '{}')": (
                     "not allowed: write (insert) to table variants", read_only.format("INSERT")),
                 "create table t2 (x int)": ("not allowed: create (a schema change)", read_only.format("CREATE TABLE"))}
    if dialect == "postgresql":
        unchecked.update({"with gone as (delete from trials returning id) select * from gone": (
            "", read_only.format("SELECT")),
            "select nextval('trials_id_seq')": ("", "permission denied for sequence trials_id_seq")})
    else:
        unchecked.update({"pragma writable_schema=1": ("not allowed: pragma writable_schema = 1", ""),
                          "pragma query_only = 0": ("not allowed: pragma query_only = 0", ""),
                          "attach database 'other.db' as other": ("not allowed: attach other.db", "")})
    for sql, (on_sqlite, on_pg) in unchecked.items():
        with pytest.raises(StoreError) as refused:
            run_query(store, sql)
        assert str(refused.value).startswith("query refused: " + (on_pg if dialect == "postgresql" else on_sqlite)), \
            (sql, str(refused.value))
    assert _snapshot(store) == before
    monkeypatch.undo()
    store.update_trial(trials[0].id, state="finished")  # the writer's connections are untouched
    assert store.get_trial(trials[0].id).state == "finished"


def test_query_reads_only_the_stores_tables_and_views(store):
    """Another table in the same database is not the store's: the reader may not read it."""
    with store.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE other_secrets (x INTEGER)")
        conn.exec_driver_sql("INSERT INTO other_secrets VALUES (42)")
    r = _query(store.url, "select x from other_secrets")
    assert r.exit_code == 2 and "42" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    if store.engine.dialect.name == "postgresql":
        assert "query refused: permission denied for table other_secrets" in r.output
    else:
        assert "query refused: not allowed: read of other_secrets" in r.output
    assert _query(store.url, "select count(*) from trials").exit_code == 0


def test_pg_query_cannot_read_server_files(pg_database):
    url = _pg_schema_url(pg_database)
    open_store(url).close()
    for sql in SERVER_FILE_READS:
        r = _query(url, sql)
        assert r.exit_code == 2 and "root:" not in r.output, (sql, r.output)
        assert "query refused: permission denied for function pg_read_file" in r.output, (sql, r.output)
        assert len(r.output.strip().splitlines()) == 1


def test_pg_reader_role_has_select_on_the_store_only(pg_database):
    from ablate.store.readonly import READER_ROLE, open_reader

    url = _pg_schema_url(pg_database)
    store = open_store(url)
    try:
        with store.engine.connect() as conn:
            can = {(name, priv): conn.exec_driver_sql(
                f"SELECT has_table_privilege('{READER_ROLE}', '{name}', '{priv}')").scalar()
                for name in ("trials", "metrics", "trial_results", "variant_summary") for priv in ("SELECT", "INSERT")}
            assert not conn.exec_driver_sql(
                f"SELECT rolsuper OR rolcreaterole OR rolcreatedb FROM pg_roles WHERE rolname = '{READER_ROLE}'").scalar()
        assert can == {k: k[1] == "SELECT" for k in can}
        # the other read commands (results, report, status) read as the role, with a statement timeout
        reader = open_reader(url, timeout=7)
        try:
            with reader.engine.connect() as conn:
                row = conn.exec_driver_sql("SELECT current_user, current_setting('statement_timeout'), "
                                           "current_setting('transaction_read_only')").one()
            assert tuple(row) == (READER_ROLE, "7s", "on")
            assert reader.list_jobs() == []
            with pytest.raises(sa.exc.DBAPIError, match="permission denied for table jobs|read-only transaction"):
                with reader.session() as s:
                    s.execute(sa.text("DELETE FROM jobs"))
        finally:
            reader.close()
    finally:
        store.close()


def test_pg_runaway_query_is_cancelled_on_the_server(pg_database):
    """The client dies; the server still stops the statement after --timeout."""
    url = _pg_schema_url(pg_database)
    open_store(url).close()
    marker = f"runaway_{uuid.uuid4().hex[:8]}"
    sql = f"select count(*) as {marker} from generate_series(1, 3000000000)"
    proc = subprocess.Popen([sys.executable, "-c", "from ablate.cli import app; app()", "query", sql, "--store", url, "--timeout", "3"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    admin = sa.create_engine(pg_database, isolation_level="AUTOCOMMIT")
    running = sa.text("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND strpos(query, :m) > 0"
                      ).bindparams(m=f"{marker} from")
    try:
        with admin.connect() as conn:
            deadline = time.monotonic() + 30
            while conn.execute(running).scalar() == 0:
                assert time.monotonic() < deadline and proc.poll() is None, "the query never started"
                time.sleep(0.1)
            proc.kill()  # the client is gone; the statement is not
            proc.wait()
            started = time.monotonic()
            while conn.execute(running).scalar() and time.monotonic() - started < 15:
                time.sleep(0.2)
            assert conn.execute(running).scalar() == 0, "still running 15 s after its client died"
    finally:
        with admin.connect() as conn:  # the old code leaves it running: do not leave it behind
            conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE strpos(query, :m) > 0 AND pid <> pg_backend_pid()"), {"m": f"{marker} from"})
        admin.dispose()
        if proc.poll() is None:
            proc.kill()


def test_sqlite_runaway_query_stops_at_the_timeout(tmp_path):
    url = f"sqlite:///{tmp_path / 'ablate.db'}"
    open_store(url).close()
    started = time.monotonic()
    r = _query(url, "with recursive r(n) as (select 1 union all select n + 1 from r) select count(*) from r",
               "--timeout", "1")
    assert r.exit_code == 2 and r.output.strip() == "error: query exceeded --timeout 1 s", r.output
    assert time.monotonic() - started < 20


def test_read_commands_take_a_timeout(tmp_path):
    from typer.testing import CliRunner

    from ablate.cli import app

    url = f"sqlite:///{tmp_path / 'ablate.db'}"
    open_store(url).close()
    for cmd in (["status"], ["results", "j"], ["report", "j", "-o", str(tmp_path / "r.html")], ["query", "select 1"]):
        r = CliRunner().invoke(app, [*cmd, "--store", url, "--timeout", "0"])
        assert r.exit_code == 2 and r.output.strip() == "error: --timeout: 0 is not a positive number of seconds", \
            (cmd, r.output)
    assert CliRunner().invoke(app, ["status", "--store", url, "--timeout", "5"]).exit_code == 0


# --- SQLite specifics --------------------------------------------------------------------------------------

def test_sqlite_connections_use_wal_busy_timeout_and_foreign_keys(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'a' / 'b' / 'ablate.db'}")
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert (tmp_path / "a" / "b" / "ablate.db-wal").exists()
    finally:
        store.close()


WRITER = textwrap.dedent("""
    import sys
    from ablate.store import open_store
    store = open_store(sys.argv[1], create=False)
    trial_id = int(sys.argv[2])
    for step in range(150):
        rows = [(f"loss/{k}", step, step, float(step)) for k in ("box", "obj", "cls")]
        assert store.add_metrics(trial_id, rows) == 3
        store.update_trial(trial_id, epoch=step, state="running")
    store.update_trial(trial_id, state="finished")
    print("writer done")
""")


def test_sqlite_concurrent_writer_is_not_locked_out(tmp_path):
    url = f"sqlite:///{tmp_path / 'ablate.db'}"
    store = open_store(url)
    try:
        _job(store)
        trials = store.ensure_trials("box_losses", _trials())
        writer = subprocess.Popen([sys.executable, "-c", WRITER, url, str(trials[0].id)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        reads = 0
        try:
            # read (and write a little) while the other process writes
            while writer.poll() is None or reads < 5:
                with store.engine.connect() as conn:  # a read transaction held open across a pause
                    conn.exec_driver_sql("BEGIN")
                    conn.exec_driver_sql("SELECT COUNT(*) FROM metrics").scalar()
                    store.add_metrics(trials[1].id, [("lr", reads, reads, 0.01)])
                    conn.exec_driver_sql("SELECT COUNT(*) FROM metrics").scalar()
                    conn.rollback()
                store.results("box_losses")
                store.query("select count(*) from metric_curves")
                store.metrics_of(trials[0].id, "loss/box")
                reads += 1
            out, err = writer.communicate(timeout=60)
        finally:
            if writer.poll() is None:
                writer.kill()
        assert writer.returncode == 0, err
        assert "writer done" in out and "locked" not in err
        assert len(store.metrics_of(trials[0].id)) == 450
        assert len(store.metrics_of(trials[1].id)) == reads
        assert store.get_trial(trials[0].id).state == "finished"
    finally:
        store.close()
