"""The results store: jobs, their variants and trials, and every trial's metric curves.

Only the driver writes here (workers never open the store). Objects returned
by the methods are detached but fully loaded (``expire_on_commit=False``; a
trial's variant comes with it), so callers read their attributes freely.

A database restart or a dropped connection does not end a job: each method the driver calls
runs again, with exponential backoff, for up to ``Store.retry_s`` seconds (60 by default,
``ABLATE_STORE_RETRY_S``) when it fails on a lost connection (:func:`is_connection_error`;
never on an integrity, programming or data error, nor a statement timeout). Every such
method is one transaction and idempotent (metric points are keyed by (trial, name, step)
and inserted with ON CONFLICT DO NOTHING; the rest are compare-and-set or plain sets), so
running one again after a commit whose answer was lost changes nothing. The engine pings a
pooled connection before use (``pool_pre_ping``), so a connection the restart killed is
replaced rather than failing the next call.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Sequence, TypeVar

from sqlalchemy import Engine, bindparam, delete, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from .db import (
    DEFAULT_URL,
    StoreError,
    _one_line,
    display_url,
    make_engine,
    schema_status,
    upgrade_engine,
)
from .models import JOB_STATES, TRIAL_STATES, Job, Metric, Trial, Variant, utcnow

if TYPE_CHECKING:
    import pandas

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
JOB_FIELDS = frozenset({"state", "mlflow_experiment_id", "mlflow_parent_run_id", "description", "spec_yaml",
                        "spec_json", "baseline", "tracking_uri", "updated_at"})
TRIAL_FIELDS = frozenset({"state", "attempts", "epoch", "node", "device", "wall_seconds", "error", "mlflow_run_id",
                          "result_json", "reused_from", "config_json", "checkpoint", "code_fingerprint"})
_METRIC_BATCH = 1000  # rows per INSERT (6 parameters a row: far under SQLite's 32766)
_SQLITE_INSERT_METRICS = (sqlite_insert(Metric.__table__)
                          .on_conflict_do_nothing(index_elements=["trial_id", "name", "step"])
                          .returning(Metric.__table__.c.step))
_PG_INSERT_METRICS = text(
    "INSERT INTO metrics (trial_id, name, step, epoch, value, is_nan) "
    "SELECT :trial_id, u.name, u.step, u.epoch, u.value, u.is_nan FROM unnest("
    "CAST(:names AS VARCHAR[]), CAST(:steps AS INTEGER[]), CAST(:epochs AS INTEGER[]), "
    "CAST(:vals AS DOUBLE PRECISION[]), CAST(:nans AS BOOLEAN[])) AS u(name, step, epoch, value, is_nan) "
    "ON CONFLICT (trial_id, name, step) DO NOTHING RETURNING step")


#: Seconds a store call goes on retrying through a lost database connection (``ABLATE_STORE_RETRY_S``).
STORE_RETRY_S = 60.0
#: PostgreSQL SQLSTATEs of a server going away or not yet back: admin_shutdown (a restart),
#: crash_shutdown, cannot_connect_now ("the database system is starting up"); class 08 is
#: "connection exception".
_PG_CONNECTION_STATES = ("57P01", "57P02", "57P03")
_T = TypeVar("_T")


def is_connection_error(e: BaseException) -> bool:
    """Whether ``e`` means the database connection was lost or could not be made (a server
    restarting, a dropped connection): worth running the transaction again.

    True for a SQLAlchemy error whose connection SQLAlchemy invalidated (its disconnect
    detection), and for psycopg's ``OperationalError`` without a SQLSTATE (connection refused,
    server closed the connection) or with a connection SQLSTATE (class 08, 57P01-57P03).
    False for everything else: integrity and programming errors, a statement timeout
    (57014), SQLite's errors (a locked SQLite file already waits ``busy_timeout``).
    """
    if isinstance(e, DBAPIError):
        if e.connection_invalidated:
            return True
        e = e.orig
    try:
        import psycopg
    except ImportError:  # no PostgreSQL driver: no PostgreSQL connection to lose
        return False
    if not isinstance(e, psycopg.OperationalError):
        return False
    state = getattr(e, "sqlstate", None)
    return state is None or state.startswith("08") or state in _PG_CONNECTION_STATES


def retry_on_disconnect(call: Callable[[], _T], *, budget_s: float, notify: Optional[Callable[[str], None]] = None,
                        what: str = "store", sleep: Callable[[float], None] = time.sleep,
                        clock: Callable[[], float] = time.monotonic) -> _T:
    """``call()``, run again after a lost connection (:func:`is_connection_error`) with
    exponential backoff (0.5 s, 1, 2, 4, then every 8 s) for up to ``budget_s`` seconds in all;
    any other error, or the last connection error once the budget is spent, is raised at once.

    ``call`` must be one transaction that may run twice (its first commit's answer may have
    been lost). ``notify`` gets one line when the first retry starts and one when a retry
    succeeds (not one per attempt). ``sleep`` and ``clock``: tests pass fakes.
    """
    started = clock()
    delay, failures = 0.5, 0
    while True:
        try:
            result = call()
        except Exception as e:
            if not is_connection_error(e) or clock() - started + delay > budget_s:
                raise
            failures += 1
            if failures == 1 and notify is not None:
                notify(f"warning: {what}: connection lost ({_one_line(e)}); retrying for up to {budget_s:g} s")
            sleep(delay)
            delay = min(2 * delay, 8.0)
        else:
            if failures and notify is not None:
                notify(f"{what}: connected again after {clock() - started:.0f} s ({failures} retries)")
            return result


def _retrying(method: Callable[..., _T]) -> Callable[..., _T]:
    """A Store method that :func:`retry_on_disconnect` runs again after a lost connection."""

    @functools.wraps(method)
    def wrapper(self: "Store", *args: Any, **kwargs: Any) -> _T:
        if self.retry_s <= 0:
            return method(self, *args, **kwargs)
        return retry_on_disconnect(lambda: method(self, *args, **kwargs), budget_s=self.retry_s,
                                   notify=self.notify, what=f"store {display_url(self.url)}")

    return wrapper


def _json(value: Any) -> str:
    """A JSON text column's value: strings pass through (already JSON), anything else is dumped."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _reset(trial: Trial) -> None:
    trial.state, trial.attempts, trial.epoch = "pending", 0, 0
    trial.node = trial.device = trial.wall_seconds = trial.error = None
    trial.mlflow_run_id = trial.result_json = trial.reused_from = trial.checkpoint = None


def _check_state(state: str, allowed: Sequence[str], what: str) -> None:
    if state not in allowed:
        raise ValueError(f"unknown {what} state {state!r}; one of: {', '.join(allowed)}")


class Store:
    """A results store at ``url`` whose schema is at this ablate's head revision (see ``open_store``)."""

    def __init__(self, url: str, engine: Engine) -> None:
        self.url = url
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        #: seconds a call retries through a lost connection (0: never); see the module's docstring
        self.retry_s = float(os.environ.get("ABLATE_STORE_RETRY_S", STORE_RETRY_S))
        #: gets a line when a call starts retrying and when it got through (the driver prints it)
        self.notify: Optional[Callable[[str], None]] = None

    def __repr__(self) -> str:
        return f"Store({display_url(self.url)!r})"

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed when the block ends, rolled back on an exception."""
        with self._sessions.begin() as session:
            yield session

    # --- jobs ---------------------------------------------------------------------------------

    @_retrying
    def get_job(self, name: str) -> Job | None:
        with self.session() as s:
            return s.scalar(select(Job).where(Job.name == name))

    def _job(self, s: Session, name: str) -> Job:
        job = s.scalar(select(Job).where(Job.name == name))
        if job is None:
            raise StoreError(f"no job named {name!r} in store {display_url(self.url)}")
        return job

    @_retrying
    def create_or_get_job(self, name: str, *, description: str | None = "", spec_yaml: str, spec_json: Any,
                          baseline: str | None = None, tracking_uri: str | None = None) -> Job:
        """The job called ``name``: created (state "running") or, if it exists, its spec fields updated.

        An existing job keeps its id, state, MLflow ids and trials; ``spec_json`` may be
        a JSON string or a JSON-able object.
        """
        fields = dict(description=description or "", spec_yaml=spec_yaml, spec_json=_json(spec_json),
                      baseline=baseline, tracking_uri=tracking_uri)
        with self.session() as s:
            job = s.scalar(select(Job).where(Job.name == name))
            if job is None:
                job = Job(name=name, state="running", **fields)
                s.add(job)
            else:
                for key, value in fields.items():
                    setattr(job, key, value)
            s.flush()
            return job

    @_retrying
    def set_job(self, name: str, **fields: Any) -> None:
        """Set fields of a job: state, mlflow_experiment_id, mlflow_parent_run_id, description, baseline, ..."""
        unknown = set(fields) - JOB_FIELDS
        if unknown:
            raise TypeError(f"set_job: unknown field(s) {', '.join(sorted(unknown))}")
        if "state" in fields:
            _check_state(fields["state"], JOB_STATES, "job")
        if "spec_json" in fields:
            fields["spec_json"] = _json(fields["spec_json"])
        with self.session() as s:
            job = self._job(s, name)
            for key, value in fields.items():
                setattr(job, key, value)

    # --- the driver lease ----------------------------------------------------------------------
    #
    # One driver at a time works on a job. The lease is two columns of the job's row (token and
    # heartbeat), taken by a compare-and-set UPDATE whose WHERE admits only a free, stale or own
    # lease: the database serialises two such UPDATEs of one row (SQLite: one writer at a time;
    # PostgreSQL: the second waits on the row lock, then re-checks the WHERE against the committed
    # row), so of two drivers that race, exactly one gets rowcount 1. No check-then-act.

    @_retrying
    def claim_driver(self, name: str, token: str, stale_s: float, **create: Any) -> bool:
        """Take the job's driver lease for ``token`` and mark the job "running"; False when another
        driver holds it with a heartbeat younger than ``stale_s`` seconds.

        With ``create`` (the fields of :meth:`create_or_get_job`), a job that does not exist is
        inserted already leased (``INSERT ... ON CONFLICT DO NOTHING``: a concurrent insert of the
        same name loses without an error and then meets the lease).
        """
        now = utcnow()
        with self.session() as s:
            if create:
                fields = dict(description=create.get("description") or "", spec_yaml=create["spec_yaml"],
                              spec_json=_json(create["spec_json"]), baseline=create.get("baseline"),
                              tracking_uri=create.get("tracking_uri"))
                dialect_insert = pg_insert if self.engine.dialect.name == "postgresql" else sqlite_insert
                s.execute(dialect_insert(Job.__table__).values(
                    name=name, state="running", driver_token=token, driver_heartbeat_at=now, created_at=now,
                    updated_at=now, **fields).on_conflict_do_nothing(index_elements=["name"]))
            claimed = s.execute(
                update(Job).where(Job.name == name, or_(
                    Job.driver_token.is_(None), Job.driver_token == token, Job.driver_heartbeat_at.is_(None),
                    Job.driver_heartbeat_at < now - timedelta(seconds=stale_s)))
                .values(driver_token=token, driver_heartbeat_at=now, state="running")
                .execution_options(synchronize_session=False)).rowcount
            if not claimed and not create:
                self._job(s, name)  # a missing job is a StoreError, not a held lease
            return claimed == 1

    @_retrying
    def beat_driver(self, name: str, token: str) -> bool:
        """Renew ``token``'s lease (heartbeat now); False when it no longer holds it (another driver
        took the job over after this one's heartbeat went stale)."""
        with self.session() as s:
            return s.execute(update(Job).where(Job.name == name, Job.driver_token == token)
                             .values(driver_heartbeat_at=utcnow())
                             .execution_options(synchronize_session=False)).rowcount == 1

    @_retrying
    def release_driver(self, name: str, token: str) -> None:
        """Give the lease up (a no-op when ``token`` does not hold it); the last heartbeat stays."""
        with self.session() as s:
            s.execute(update(Job).where(Job.name == name, Job.driver_token == token).values(driver_token=None)
                      .execution_options(synchronize_session=False))

    @_retrying
    def list_jobs(self) -> list[dict[str, Any]]:
        """Every job, oldest first: name, state, description, baseline, created_at, updated_at,
        ``trials`` (count of trials per state, only states that occur) and ``n_trials``."""
        with self.session() as s:
            jobs = s.scalars(select(Job).order_by(Job.id)).all()
            counts: dict[int, dict[str, int]] = {}
            for job_id, state, n in s.execute(
                    select(Trial.job_id, Trial.state, func.count()).group_by(Trial.job_id, Trial.state)):
                counts.setdefault(job_id, {})[state] = n
        return [
            dict(name=j.name, state=j.state, description=j.description, baseline=j.baseline,
                 created_at=j.created_at, updated_at=j.updated_at, trials=dict(sorted(counts.get(j.id, {}).items())),
                 n_trials=sum(counts.get(j.id, {}).values()))
            for j in jobs
        ]

    # --- variants and trials ------------------------------------------------------------------

    @_retrying
    def ensure_trials(self, job_name: str, trials: list[dict[str, Any]]) -> list[Trial]:
        """Register a job's trials; return their rows in input order.

        Each dict has ``variant`` (name), ``overrides`` (dict), ``seed``, ``hash``, ``config``
        (dict) and optionally ``code_fingerprint``. Missing variants and trials are created (trials "pending");
        an existing (job, variant, seed) row with the same hash is left alone; one whose
        hash differs (the spec changed) gets the new hash and config, is reset to
        "pending" with its run fields and checkpoint cleared, and loses its old metrics. A variant's
        overrides are updated to the latest. Trials of the job that are not in
        ``trials`` are kept.
        """
        seen: set[tuple[str, int]] = set()
        for t in trials:
            key = (t["variant"], int(t["seed"]))
            if key in seen:
                raise StoreError(f"job {job_name!r}: trial variant={key[0]!r} seed={key[1]} is listed twice")
            seen.add(key)
        with self.session() as s:
            job = self._job(s, job_name)
            variants = {v.name: v for v in s.scalars(select(Variant).where(Variant.job_id == job.id))}
            for t in trials:
                overrides = _json(t.get("overrides") or {})
                v = variants.get(t["variant"])
                if v is None:
                    v = variants[t["variant"]] = Variant(job_id=job.id, name=t["variant"], overrides_json=overrides)
                    s.add(v)
                elif v.overrides_json != overrides:
                    v.overrides_json = overrides
            s.flush()
            existing = {(r.variant_id, r.seed): r for r in s.scalars(select(Trial).where(Trial.job_id == job.id))}
            out: list[Trial] = []
            reset: list[int] = []
            for t in trials:
                v = variants[t["variant"]]
                seed = int(t["seed"])
                row = existing.get((v.id, seed))
                if row is None:
                    row = Trial(job_id=job.id, variant_id=v.id, variant=v, seed=seed, hash=t["hash"],
                                config_json=_json(t.get("config") or {}), state="pending", attempts=0, epoch=0,
                                code_fingerprint=t.get("code_fingerprint"))
                    s.add(row)
                elif row.hash != t["hash"]:
                    row.hash = t["hash"]
                    row.config_json = _json(t.get("config") or {})
                    row.code_fingerprint = t.get("code_fingerprint")
                    _reset(row)
                    reset.append(row.id)
                out.append(row)
            if reset:
                s.execute(delete(Metric).where(Metric.trial_id.in_(reset)))
            s.flush()
            return out

    @_retrying
    def get_trial(self, trial_id: int) -> Trial:
        with self.session() as s:
            trial = s.get(Trial, trial_id)
            if trial is None:
                raise StoreError(f"no trial {trial_id} in store {display_url(self.url)}")
            return trial

    @_retrying
    def trials_of(self, job_name: str) -> list[Trial]:
        """The job's trials in variant creation order, then seed."""
        with self.session() as s:
            job = self._job(s, job_name)
            return list(s.scalars(select(Trial).where(Trial.job_id == job.id)
                                  .order_by(Trial.variant_id, Trial.seed)).all())

    @_retrying
    def set_code_fingerprint(self, trial_ids: Sequence[int], fingerprint: str) -> None:
        """Record which code trains these trials (``ablate.fingerprint.code_fingerprint()``)."""
        if not trial_ids:
            return
        with self.session() as s:
            s.execute(update(Trial).where(Trial.id.in_(list(trial_ids))).values(code_fingerprint=fingerprint)
                      .execution_options(synchronize_session=False))

    @_retrying
    def code_fingerprints(self) -> dict[str, dict[str | None, int]]:
        """Per job name: how many of its trials that are not "pending" each code fingerprint has
        (None: recorded before fingerprints). ``ablate status`` compares them with the current code."""
        with self.session() as s:
            rows = s.execute(select(Job.name, Trial.code_fingerprint, func.count())
                             .join(Trial, Trial.job_id == Job.id).where(Trial.state != "pending")
                             .group_by(Job.name, Trial.code_fingerprint)).all()
        out: dict[str, dict[str | None, int]] = {}
        for name, fp, n in rows:
            out.setdefault(name, {})[fp] = n
        return out

    @_retrying
    def finished_trial_with_hash(self, hash: str, exclude_job: str | None = None) -> Trial | None:
        """The most recently finished trial (state "finished", not "reused") with this hash, in any job
        but ``exclude_job``; None when there is none."""
        q = select(Trial).where(Trial.hash == hash, Trial.state == "finished")
        if exclude_job is not None:
            q = q.join(Job, Job.id == Trial.job_id).where(Job.name != exclude_job)
        with self.session() as s:
            return s.scalars(q.order_by(Trial.updated_at.desc(), Trial.id.desc()).limit(1)).first()

    @_retrying
    def reset_trial(self, trial_id: int) -> None:
        """Make a trial as new (``--force``): "pending", attempts and epoch 0, run fields, result,
        reuse link and checkpoint cleared, its metrics deleted. Hash and config stay."""
        with self.session() as s:
            trial = s.get(Trial, trial_id)
            if trial is None:
                raise StoreError(f"no trial {trial_id} in store {display_url(self.url)}")
            _reset(trial)
            s.execute(delete(Metric).where(Metric.trial_id == trial_id))
            # trials of other jobs that reused this one lose their source: they must train again
            for dependent in s.scalars(select(Trial).where(Trial.reused_from == trial_id)):
                _reset(dependent)

    @_retrying
    def update_trial(self, trial_id: int, **fields: Any) -> None:
        """Set fields of a trial: state, attempts, epoch, node, device, wall_seconds, error, mlflow_run_id,
        result_json (a dict is dumped), reused_from, config_json, checkpoint, code_fingerprint."""
        unknown = set(fields) - TRIAL_FIELDS
        if unknown:
            raise TypeError(f"update_trial: unknown field(s) {', '.join(sorted(unknown))}")
        if "state" in fields:
            _check_state(fields["state"], TRIAL_STATES, "trial")
        for key in ("result_json", "config_json"):
            if fields.get(key) is not None:
                fields[key] = _json(fields[key])
        if not fields:
            return
        with self.session() as s:
            n = s.execute(update(Trial).where(Trial.id == trial_id).values(**fields)
                          .execution_options(synchronize_session=False)).rowcount
            if n == 0:
                raise StoreError(f"no trial {trial_id} in store {display_url(self.url)}")

    @_retrying
    def mark_reused(self, trial_id: int, source_trial_id: int) -> None:
        """Make a trial a reuse of another: state "reused", ``reused_from`` the source (followed to the
        trial that actually trained when the source is itself a reuse), and the source's
        mlflow_run_id, result_json, epoch and wall_seconds copied."""
        with self.session() as s:
            trial = s.get(Trial, trial_id)
            source = s.get(Trial, source_trial_id)
            if trial is None or source is None:
                raise StoreError(f"no trial {trial_id if trial is None else source_trial_id} "
                                 f"in store {display_url(self.url)}")
            if source.state == "reused" and source.reused_from is not None:
                source = s.get(Trial, source.reused_from) or source
            if source.id == trial.id:
                raise StoreError(f"trial {trial_id} cannot reuse itself")
            trial.state = "reused"
            trial.reused_from = source.id
            trial.mlflow_run_id = source.mlflow_run_id
            trial.result_json = source.result_json
            trial.epoch = source.epoch
            trial.wall_seconds = source.wall_seconds
            trial.error = None

    # --- metrics ------------------------------------------------------------------------------

    @_retrying
    def add_metrics(self, trial_id: int, rows: Iterable[tuple[str, int, int, float]]) -> int:
        """Record points ``(name, step, epoch, value)`` of a trial's curves; return how many were new.

        Idempotent per (trial, name, step): a point already there is kept as it is
        (INSERT ... ON CONFLICT DO NOTHING), so re-reporting after a retry is safe.
        Non-finite values are stored as NULL with ``is_nan`` true.
        """
        params = []
        for name, step, epoch, value in rows:
            v = None if value is None else float(value)
            finite = v is not None and math.isfinite(v)
            params.append({"trial_id": trial_id, "name": str(name), "step": int(step), "epoch": int(epoch),
                           "value": v if finite else None, "is_nan": not finite})
        if not params:
            return 0
        inserted = 0
        try:
            with self.engine.begin() as conn:
                for start in range(0, len(params), _METRIC_BATCH):
                    batch = params[start:start + _METRIC_BATCH]
                    if conn.dialect.name == "postgresql":
                        # five arrays instead of 6 x N parameters: psycopg converts a query with
                        # thousands of placeholders slowly
                        result = conn.execute(_PG_INSERT_METRICS, {
                            "trial_id": trial_id, "names": [p["name"] for p in batch],
                            "steps": [p["step"] for p in batch], "epochs": [p["epoch"] for p in batch],
                            "vals": [p["value"] for p in batch], "nans": [p["is_nan"] for p in batch]})
                    else:
                        # one multi-row INSERT per batch ("insertmanyvalues")
                        result = conn.execute(_SQLITE_INSERT_METRICS, batch)
                    inserted += len(result.all())  # RETURNING: one row per point that was new
        except IntegrityError as e:
            raise StoreError(f"no trial {trial_id} in store {display_url(self.url)}") from e
        return inserted

    @_retrying
    def metrics_of(self, trial_id: int, name: str | None = None) -> list[tuple[str, int, int, float]]:
        """The trial's own recorded points ``(name, step, epoch, value)`` by name then step; NaN where
        a non-finite value was recorded. (Raw rows of this trial id: the views, ``results`` and
        ``curves`` are the ones that follow a reused trial to its source.)"""
        q = select(Metric.name, Metric.step, Metric.epoch, Metric.value, Metric.is_nan).where(
            Metric.trial_id == trial_id)
        if name is not None:
            q = q.where(Metric.name == name)
        with self.session() as s:
            rows = s.execute(q.order_by(Metric.name, Metric.step)).all()
        return [(n, st, ep, math.nan if is_nan or v is None else float(v)) for n, st, ep, v, is_nan in rows]

    @_retrying
    def delete_metrics_after(self, trial_id: int, step: int) -> int:
        """Drop the trial's points with a step greater than ``step``; return how many."""
        with self.session() as s:
            return s.execute(delete(Metric).where(Metric.trial_id == trial_id, Metric.step > step)
                             .execution_options(synchronize_session=False)).rowcount

    # --- results ------------------------------------------------------------------------------

    def _frame(self, sql: str, params: dict[str, Any], *, floats: Sequence[str] = (),
               bools: Sequence[str] = (), expanding: Sequence[str] = ()) -> "pandas.DataFrame":
        import pandas as pd

        stmt = text(sql)
        if expanding:
            stmt = stmt.bindparams(*(bindparam(k, expanding=True) for k in expanding))
        with self.engine.connect() as conn:
            result = conn.execute(stmt, params)
            columns = list(result.keys())
            rows = result.all()
        df = pd.DataFrame.from_records([tuple(r) for r in rows], columns=columns)
        for col in floats:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
        for col in bools:
            df[col] = df[col].astype(bool)
        return df

    def _require_job(self, job_name: str) -> None:
        with self.session() as s:
            self._job(s, job_name)

    def results(self, job_name: str) -> "pandas.DataFrame":
        """The job's rows of the ``trial_results`` view (final COCO numbers per trial; NaN where a
        trial has none), in variant creation order, then seed."""
        self._require_job(job_name)
        return self._frame(
            "SELECT r.* FROM trial_results r JOIN trials t ON t.id = r.trial_id "
            "WHERE r.job = :job ORDER BY t.variant_id, r.seed",
            {"job": job_name}, floats=("wall_seconds", *COCO_METRICS))

    def curves(self, job_name: str, names: list[str] | None = None) -> "pandas.DataFrame":
        """The job's rows of the ``metric_curves`` view (all curves, or those in ``names``), in variant
        creation order, then seed, name and step; value is NaN where it was not finite."""
        self._require_job(job_name)
        sql = ("SELECT c.* FROM metric_curves c JOIN trials t ON t.id = c.trial_id WHERE c.job = :job"
               + (" AND c.name IN :names" if names is not None else "")
               + " ORDER BY t.variant_id, c.seed, c.name, c.step")
        params: dict[str, Any] = {"job": job_name}
        if names is not None:
            params["names"] = list(names)
        return self._frame(sql, params, floats=("value",), bools=("is_nan",),
                           expanding=("names",) if names is not None else ())

    def query(self, sql: str, timeout: float | None = None) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run one read-only SELECT; return its column names and rows.

        Delegates to :func:`ablate.store.readonly.run_query`: the statement is classified by a
        SQL parser, then runs under the database's own limits (PostgreSQL: the ``ablate_reader``
        role in a READ ONLY transaction with a statement timeout; SQLite: ``query_only``, an
        authorizer that allows reads of the store's tables and views only, a progress-handler
        timeout). Anything else is a one-line StoreError and the store is left untouched.
        """
        from .readonly import DEFAULT_TIMEOUT_S, run_query

        return run_query(self, sql, timeout=DEFAULT_TIMEOUT_S if timeout is None else timeout)


def open_store(url: str = DEFAULT_URL, create: bool = True) -> Store:
    """Open the results store at ``url`` (SQLite file or PostgreSQL URL).

    An empty database gets the schema when ``create`` (the default). A store at
    an older or unknown schema revision, or with ablate's table names but no
    revision, is refused with a one-line StoreError saying what to do.
    """
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            status = schema_status(conn, url)
        if status.state != "current":
            if not (status.state == "empty" and create):
                raise StoreError(status.message or f"store {display_url(url)}: unusable schema")
            upgrade_engine(engine, url)
    except StoreError:
        engine.dispose()
        raise
    except SQLAlchemyError as e:
        engine.dispose()
        raise StoreError(f"cannot open store {display_url(url)}: {_one_line(e)}") from e
    return Store(url, engine)
