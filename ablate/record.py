"""Driver-side recording: MLflow and the SQL store. Only the driver writes; workers never open either.

One :class:`Recorder` per job submission (or resume). MLflow layout:

* one experiment per job name (``tracking.experiment`` or the job's name);
* one parent run per submission, named ``<job>`` and tagged ``ablate.job``; a resumed job opens a
  new parent run tagged ``ablate.resumed_from`` with the previous one;
* one child run per trial (``mlflow.parentRunId``), named ``variant/seed``, created the first
  time the trial starts and reused for every later attempt and resume (its id is kept in the
  store), so a trial never gets a second run. Params: the flattened resolved config; tags:
  job, variant, seed, preset, trial hash, ablate version; metric history: the loss terms by
  step and the COCO numbers by step (and ``epoch`` as a metric), written in batches; artifacts:
  ``config.json`` and ``final.json``.

The store is the source of truth; MLflow is a view of it that may lag. Every recorder call
writes the store first (through a database restart: ``Store.retry_s``) and MLflow after, best
effort:

* **Outage.** An MLflow write that fails (server down or timing out; MLflow's own HTTP retries
  are cut from minutes to seconds in the driver, :data:`MLFLOW_HTTP_DEFAULTS`) never reaches
  Tune, so it never ends the job: the recorder prints one warning line, marks MLflow behind and
  the trial out of sync, and training goes on. Nothing is queued in memory and no flag is
  stored: what MLflow lacks is exactly what the store has beyond what MLflow holds, so a later
  process finds it the same way.
* **Catch-up.** While MLflow is behind, later events and the job's end run :func:`sync_parent`
  and :func:`sync_trial` on what is out of sync: create the parent or a child run that is
  missing (never a second one: a run id in the store is used, and before creating, a run with
  the trial's hash under the same parent is looked for, since a create whose answer was lost
  may have been applied), log missing params and ``config.json``, send the store's metric
  points above the step MLflow holds, ``final.json``, tags and the terminal status. A tracking
  server is asked ``/health`` (cheap) on each event and the catch-up runs at the first event it
  answers; a failed catch-up is retried after a wait that doubles (:data:`CATCH_UP_EVERY_S`),
  so a sick server does not hold up the driver, and Tune's trials with it. One line says when
  MLflow has caught up; if it is still behind when the job ends, one line names
  ``ablate sync JOB``, which runs the same code from the store (:func:`sync_job`).

What MLflow holds is read from MLflow itself, never from memory (a request that timed out may
have been applied): per run and key, MLflow keeps the point with the highest step (the run's
latest metrics). Points go to MLflow in step order and a failed batch stops the rest, so MLflow
holds a prefix of each key's steps, and a sync sends exactly the store's points above it: no
step twice. (MLflow's own retry of a request resends identical points, which its store drops.)

Idempotence. A retried or resumed trial replays the steps after its last checkpoint. The
store ignores a row it already has (primary key ``(trial, name, step)``); MLflow has no such
key, so the recorder sends MLflow only steps above the highest step it holds for the trial
(read from MLflow by a sync the first time a trial with a run is touched).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from dataclasses import fields as dc_fields
from typing import Any, Callable, Iterable, Optional

from . import __version__, fingerprint
from .spec import JobSpec, Trial
from .store import Store

#: Event keys that are not metrics.
_NOT_METRICS = {"kind", "step", "epoch", "per_class_AP", "checkpoint"}
#: MLflow ``log_batch`` limits (metrics and params per call).
_MLFLOW_BATCH = 1000
_MLFLOW_PARAMS = 100
#: MLflow's HTTP settings in the driver and ``ablate sync``, unless the environment sets them.
#: MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) retry one request for minutes,
#: during which Tune's loop, and so every trial's next report, would wait; these give up after
#: about 3 s on a refused connection and 3 x 15 s on a silent one, and the recorder catches up later.
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}
#: While MLflow is behind, a catch-up attempt (a few requests per out-of-sync trial; 3 x the
#: HTTP timeout when the server hangs, during which Tune's trials wait for the driver) is made at
#: most every ``CATCH_UP_EVERY_S`` seconds, the wait doubling after each failed attempt up to
#: ``CATCH_UP_MAX_S``. A tracking server (http/https) is first asked ``/health`` (one request,
#: ``HEALTH_TIMEOUT_S``) on every event: no attempt while it does not answer, and the first
#: attempt at the first event after it answers again. The job's end always tries.
CATCH_UP_EVERY_S = 10.0
CATCH_UP_MAX_S = 120.0
HEALTH_TIMEOUT_S = 2.0
#: A trial's run status by its store state once it is over.
_TRIAL_STATUS = {"finished": "FINISHED", "diverged": "FAILED", "failed": "FAILED", "cancelled": "KILLED"}
#: The parent run's status by the job's store state once it is over.
_JOB_STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED", "cancelled": "KILLED"}


def event_metrics(event: dict[str, Any]) -> list[tuple[str, int, int, float]]:
    """``(name, step, epoch, value)`` rows of one training or evaluation event.

    Train events keep their names (``loss/box``, ``weighted/box``, ``lr``, ``grad_norm``,
    ``stat/num_pos``...); evaluation numbers are prefixed ``eval/`` (``eval/AP``) and per-class
    AP becomes ``eval/AP/<class>``. Epoch events give ``train_seconds`` and ``images_seen``.
    """
    step, epoch = int(event["step"]), int(event["epoch"])
    rows: list[tuple[str, int, int, float]] = []
    kind = event.get("kind")
    prefix = "eval/" if kind == "eval" else ""
    for k, v in event.items():
        if k in _NOT_METRICS or isinstance(v, (dict, list, str)) or v is None or isinstance(v, bool):
            continue
        rows.append((prefix + k, step, epoch, float(v)))
    if kind == "eval":
        for cls, ap in (event.get("per_class_AP") or {}).items():
            rows.append((f"eval/AP/{cls}", step, epoch, float("nan") if ap is None else float(ap)))
    return rows


def mlflow_key(name: str) -> str:
    """A metric name MLflow accepts (letters, digits, ``_ - . / :`` and spaces); the store keeps the raw one."""
    return re.sub(r"[^\w\-. /:]", "_", name)


def json_ready(x: Any) -> Any:
    """``x`` with every non-finite float as ``None`` (strict JSON), recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> ``{"train.lr": "0.003", ...}`` (strings, as MLflow params)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def short_mlflow_retries() -> None:
    """Set :data:`MLFLOW_HTTP_DEFAULTS` in this process's environment where the user has not
    (MLflow reads them at each request)."""
    for key, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class SyncError(RuntimeError):
    """``ablate sync`` cannot bring MLflow up to date; the message is one line."""


@dataclass
class SyncCounts:
    """What a sync sent to MLflow."""

    runs: int = 0  # runs created
    params: int = 0
    points: int = 0  # metric points (``epoch`` included)
    artifacts: int = 0  # job.yaml, config.json, final.json
    updates: int = 0  # tags set and statuses changed

    def add(self, other: "SyncCounts") -> "SyncCounts":
        for f in dc_fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in dc_fields(self))

    def describe(self) -> str:
        """``"1 run, 120 metric points, 2 artifacts"`` (only what was sent), or ``"nothing"``."""
        names = {"runs": "run", "params": "param", "points": "metric point", "artifacts": "artifact",
                 "updates": "tag/status update"}
        parts = [f"{n} {names[f.name]}{'s' if n != 1 else ''}" for f in dc_fields(self)
                 if (n := getattr(self, f.name))]
        return ", ".join(parts) or "nothing"


def _filter_value(v: str) -> str:
    return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _held_steps(client, run) -> dict[str, int]:
    """Per metric key, the highest step the run holds in MLflow.

    One request: a run's latest metrics are, per key, its point with the highest step (MLflow
    updates them by (step, timestamp, value)); ``RunData`` keeps those points with their steps
    in ``_metric_objs``. Without that attribute, each key's full history is read.
    """
    objs = getattr(run.data, "_metric_objs", None)
    if objs is not None:
        return {m.key: int(m.step) for m in objs}
    return {k: max((int(m.step) for m in client.get_metric_history(run.info.run_id, k)), default=-1)
            for k in run.data.metrics}


def _missing_params(client, run_id: str, have: dict[str, str], params: dict[str, str]) -> int:
    """Log the params the run lacks (an existing one is never changed: MLflow refuses that)."""
    missing = {k: v for k, v in params.items() if k not in have}
    items = _params(missing)
    for i in range(0, len(items), _MLFLOW_PARAMS):
        client.log_batch(run_id, params=items[i:i + _MLFLOW_PARAMS])
    return len(items)


def trial_params(row) -> dict[str, str]:
    """A trial's MLflow params from its store row: the flattened resolved config, the variant
    and its overrides (``row`` is a store ``Trial``)."""
    params = flatten(row.config)
    params.pop("name", None)
    params["variant"] = row.variant_name
    params["overrides"] = json.dumps(row.variant.overrides, sort_keys=True)
    return params


def _child_tags(job: str, row, parent_run_id: Optional[str]) -> dict[str, str]:
    tags = {"mlflow.parentRunId": parent_run_id, "ablate.job": job, "ablate.variant": row.variant_name,
            "ablate.seed": str(row.seed), "ablate.preset": row.config.get("preset"), "ablate.trial_hash": row.hash,
            "ablate.version": __version__, "ablate.submission": parent_run_id}
    return {k: str(v) for k, v in tags.items() if v is not None}


def _run_target(trial_state: str, job_state: str, live: bool) -> tuple[Optional[str], Optional[str]]:
    """The status and ``ablate.state`` tag a trial's run should have (None: leave it): a trial that
    is over has its own; one this driver is training runs; a pending or running one of a job that
    is over was killed with the job; otherwise (another submission's trial) it is left as it is."""
    if trial_state in _TRIAL_STATUS:
        return _TRIAL_STATUS[trial_state], trial_state
    if live:
        return "RUNNING", None
    if job_state in _JOB_STATUS:
        return "KILLED", job_state
    return None, None


def _set_status(client, run, status: Optional[str]) -> int:
    if status is None or run.info.status == status:
        return 0
    if status == "RUNNING":
        client.update_run(run.info.run_id, status="RUNNING")
    else:
        client.set_terminated(run.info.run_id, status=status)
    return 1


def _set_tags(client, run, tags: dict[str, Optional[str]]) -> int:
    n = 0
    for k, v in tags.items():
        if v is not None and run.data.tags.get(k) != v:
            client.set_tag(run.info.run_id, k, v)
            n += 1
    return n


def sync_trial(client, store: Store, experiment_id: str, parent: Callable[[], Optional[str]], job, row, *,
               live: bool = False, submission: Optional[str] = None) -> tuple[Optional[str], int, SyncCounts]:
    """Bring one trial's child run up to date from the store; return its run id (None when the
    trial never started), the highest step MLflow now holds for it (-1: none) and what was sent.

    Args:
        client: an ``MlflowClient``; ``experiment_id``: the job's experiment there.
        store: the results store; ``job`` and ``row``: the job's and the trial's rows in it.
        parent: the parent run's id for a run that must be created (called only then; it may
            create the parent).
        live: this driver is training the trial now (its run must be RUNNING).
        submission: the parent run of the submission training it (tag ``ablate.submission``).

    Every write is skipped when MLflow already has it, so a second sync sends nothing.
    """
    counts = SyncCounts()
    if row.state == "reused":  # its run is the source trial's
        return row.mlflow_run_id, -1, counts
    points = store.metrics_of(row.id)
    run_id = row.mlflow_run_id
    if run_id is None:
        if not points and not live:
            return None, -1, counts  # it never got as far as an event: nothing for MLflow
        parent_id = parent()
        found = client.search_runs(
            [experiment_id], max_results=1,
            filter_string=f"tags.`mlflow.parentRunId` = {_filter_value(parent_id)} and "
                          f"tags.`ablate.trial_hash` = {_filter_value(row.hash)}") if parent_id else []
        if found:  # created by a request whose answer was lost
            run_id = found[0].info.run_id
        else:
            run_id = client.create_run(experiment_id, tags=_child_tags(job.name, row, parent_id),
                                       run_name=f"{row.variant_name}/{row.seed}").info.run_id
            counts.runs += 1
        store.update_trial(row.id, mlflow_run_id=run_id)  # at once: never a second run
    try:
        run = client.get_run(run_id)
    except Exception as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(e, "error_code", "")) + str(e):
            raise SyncError(f"trial {row.variant_name}/{row.seed}: its MLflow run {run_id} is not in this tracking "
                            f"store (is it the one the job recorded to?)") from None
        raise
    counts.params += _missing_params(client, run_id, run.data.params, trial_params(row))
    artifacts = {f.path for f in client.list_artifacts(run_id)}
    if "config.json" not in artifacts:
        client.log_dict(run_id, row.config, "config.json")
        counts.artifacts += 1

    from mlflow.entities import Metric

    held = _held_steps(client, run)
    now = int(time.time() * 1000)
    new: dict[tuple[str, int], Metric] = {}
    for name, step, epoch, value in points:
        key = mlflow_key(name)
        if step > held.get(key, -1):
            new.setdefault((key, step), Metric(key, value, now, step))
        if step > held.get("epoch", -1):
            new.setdefault(("epoch", step), Metric("epoch", float(epoch), now, step))
    metrics = sorted(new.values(), key=lambda m: (m.step, m.key))  # step order: a failed batch leaves a prefix
    for i in range(0, len(metrics), _MLFLOW_BATCH):
        client.log_batch(run_id, metrics=metrics[i:i + _MLFLOW_BATCH])
        counts.points += len(metrics[i:i + _MLFLOW_BATCH])
    top = max([*held.values(), *(m.step for m in metrics)], default=-1)

    if row.result_json is not None and "final.json" not in artifacts:
        client.log_dict(run_id, json.loads(row.result_json), "final.json")
        counts.artifacts += 1
    status, state_tag = _run_target(row.state, job.state, live)
    tags = {"ablate.state": state_tag,
            "ablate.diverged_at": row.error if row.state == "diverged" else None,
            "ablate.submission": submission if live else None}
    counts.updates += _set_tags(client, run, tags) + _set_status(client, run, status)
    return run_id, top, counts


def sync_parent(client, store: Store, experiment_id: str, job, *, create: bool, spec_yaml: str,
                params: dict[str, str], resumed_from: Optional[str] = None) -> tuple[Optional[str], SyncCounts]:
    """Bring the job's parent run (its latest submission's) up to date from the store; return its
    id (None when there is none and ``create`` is false) and what was sent.

    Creates it when the store has none and ``create`` (tags, ``job.yaml``, ``params``; its id
    goes to the store at once), logs what it lacks, gives it the job's terminal status, and
    marks every other parent run of the job that is still RUNNING interrupted (its driver died).
    """
    counts = SyncCounts()
    run_id = job.mlflow_parent_run_id
    if run_id is None:
        if not create:
            return None, counts
        tags = {"ablate.job": job.name, "ablate.version": __version__, "ablate.kind": "job"}
        if resumed_from:
            tags["ablate.resumed_from"] = resumed_from
        run_id = client.create_run(experiment_id, tags=tags, run_name=job.name).info.run_id
        counts.runs += 1
        store.set_job(job.name, mlflow_parent_run_id=run_id)
    run = client.get_run(run_id)
    if "job.yaml" not in {f.path for f in client.list_artifacts(run_id)}:
        client.log_text(run_id, spec_yaml, "job.yaml")
        counts.artifacts += 1
    counts.params += _missing_params(client, run_id, run.data.params, params)
    stale = client.search_runs([experiment_id], max_results=1000, filter_string=(
        f"tags.`ablate.job` = {_filter_value(job.name)} and tags.`ablate.kind` = 'job' "
        f"and attributes.status = 'RUNNING'"))
    for other in stale:
        if other.info.run_id != run_id:
            counts.updates += _set_tags(client, other, {"ablate.state": "interrupted"})
            counts.updates += _set_status(client, other, "KILLED")
    if job.state in _JOB_STATUS:
        counts.updates += _set_tags(client, run, {"ablate.state": job.state})
        counts.updates += _set_status(client, run, _JOB_STATUS[job.state])
    return run_id, counts


def _experiment_name(job) -> str:
    try:
        tracking = json.loads(job.spec_json or "{}").get("tracking") or {}
    except ValueError:
        tracking = {}
    return tracking.get("experiment") or job.name


def _job_params(store: Store, job) -> dict[str, str]:
    """The parent run's params from the store (the recorder logs the same from the spec)."""
    variants = list(dict.fromkeys(t.variant_name for t in store.trials_of(job.name)))
    try:
        seeds = json.loads(job.spec_json or "{}").get("seeds")
    except ValueError:
        seeds = None
    params = {"job.variants": ",".join(variants), "job.baseline": job.baseline}
    if seeds is not None:
        params["job.seeds"] = json.dumps(seeds)
    return {k: v for k, v in params.items() if v is not None}


def sync_job(store: Store, job_name: str, tracking_uri: Optional[str] = None,
             say: Callable[[str], None] = _stderr) -> SyncCounts:
    """``ablate sync``: bring a job's MLflow runs up to date from the store (the parent run of its
    latest submission, every trial's child run, metric history beyond what MLflow holds,
    ``final.json``, tags, terminal statuses); return what was sent. Idempotent: run twice, the
    second sends nothing. Progress lines go to ``say``; a problem is a one-line SyncError.

    ``tracking_uri`` replaces the URI the job recorded (the same tracking store at another address).
    """
    from mlflow import MlflowClient

    from .store import display_url

    job = store.get_job(job_name)
    if job is None:
        raise SyncError(f"no job named {job_name!r} in the store {display_url(store.url)}")
    uri = tracking_uri or job.tracking_uri or "sqlite:///mlflow.db"
    where = display_url(uri)
    short_mlflow_retries()
    client = MlflowClient(tracking_uri=uri)
    try:
        name = _experiment_name(job)
        exp = client.get_experiment_by_name(name)
        if exp is not None and exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        experiment_id = exp.experiment_id if exp else client.create_experiment(name)
    except Exception as e:
        raise SyncError(f"cannot use MLflow at {where}: {_first_line(e)}") from None
    if job.mlflow_experiment_id is None:
        store.set_job(job.name, mlflow_experiment_id=experiment_id)
    say(f"job {job.name}: syncing MLflow at {where} (experiment {experiment_id}) from the store "
        f"{display_url(store.url)}")
    total = SyncCounts()
    parent_id: list[Optional[str]] = [job.mlflow_parent_run_id]

    def parent(create: bool = True) -> Optional[str]:
        run_id, counts = sync_parent(client, store, experiment_id, store.get_job(job.name), create=create,
                                     spec_yaml=job.spec_yaml, params=_job_params(store, job))
        total.add(counts)
        parent_id[0] = run_id
        return run_id

    try:
        for row in store.trials_of(job.name):
            key = f"{row.variant_name}/{row.seed}"
            if row.state == "reused":
                continue
            run_id, _, counts = sync_trial(client, store, experiment_id,
                                           lambda: parent_id[0] if parent_id[0] is not None else parent(),
                                           job, row)
            total.add(counts)
            if counts.total:
                say(f"  {key}: {counts.describe()} (run {run_id})")
        if parent_id[0] is not None:
            parent(create=False)  # the terminal status last, once every child is there
    except SyncError:
        raise
    except Exception as e:
        raise SyncError(f"MLflow at {where}: {_first_line(e)}; nothing sent is lost, run `ablate sync "
                        f"{job.name}` again") from None
    say(f"job {job.name}: MLflow is up to date ({total.describe()} sent)" if total.total
        else f"job {job.name}: MLflow was already up to date (nothing sent)")
    return total


@dataclass
class _TrialState:
    trial: Trial
    store_id: int
    run_id: Optional[str] = None
    mlflow_step: int = -1  # highest step MLflow holds for this trial (valid while in_sync)
    # MLflow holds everything the store has for this trial up to mlflow_step. False for a trial
    # that already has a run or recorded epochs (a sync reads what MLflow holds first) and after
    # a failed write.
    in_sync: bool = True
    live: bool = False  # this driver is training it


class Recorder:
    """Writes one job's trials to the SQL store and, best effort, to MLflow (driver only).

    Args:
        spec: the validated job.
        store: an open results store.
        spec_yaml: the submitted file's text (kept in the store).
        mlflow: record to MLflow (tests of the store alone may turn it off).
        say: prints the outage and catch-up lines (default: stderr).
    """

    def __init__(self, spec: JobSpec, store: Store, spec_yaml: str, mlflow: bool = True,
                 say: Optional[Callable[[str], None]] = None):
        self.spec = spec
        self.store = store
        self.spec_yaml = spec_yaml
        self.use_mlflow = mlflow
        self.say = say or _stderr
        self.client = None
        self.experiment_id: Optional[str] = None
        self.parent_run_id: Optional[str] = None
        self.trials: dict[str, _TrialState] = {}
        self.behind = False  # an MLflow write failed and MLflow has not caught up since
        self._parent_in_sync = True
        self._submitted = False  # start() ran: this submission has (or must get) a parent run
        self._resumed_from: Optional[str] = None
        self._last_try = 0.0  # when the last catch-up attempt (or the failure) ended
        self._wait = 0.0  # from then until the next attempt
        self._server = spec.tracking.uri.startswith(("http://", "https://"))
        if store.notify is None:  # the store's "connection lost, retrying" lines
            store.notify = self.say
        if mlflow:
            short_mlflow_retries()

    # ------------------------------------------------------------------ MLflow, best effort
    def _mlflow(self, st: Optional[_TrialState], write: Callable[[], Any]) -> None:
        """Run one MLflow ``write`` (after the store's), or, while MLflow is behind, try to catch
        it up instead (the store has what ``write`` would send). A failure marks MLflow behind."""
        if self.client is None:
            return
        if self.behind:
            if st is not None:
                st.in_sync = False
            else:
                self._parent_in_sync = False
            self._catch_up()
            return
        try:
            write()
        except Exception as e:  # whatever MLflow raised, training goes on: the store has it all
            if st is not None:
                st.in_sync = False
            else:
                self._parent_in_sync = False
            self._fall_behind(e)

    def _fall_behind(self, e: BaseException) -> None:
        if self.behind:
            return
        self.behind = True
        # a server is asked /health before each attempt, so the first one may come at once
        self._last_try, self._wait = time.monotonic(), 0.0 if self._server else CATCH_UP_EVERY_S
        from .store import display_url

        self.say(f"warning: MLflow at {display_url(self.spec.tracking.uri)} failed ({_first_line(e)}); training goes "
                 f"on and the store keeps every number; MLflow is caught up when it answers again")

    def _catch_up(self, force: bool = False) -> bool:
        """Sync the parent run and every out-of-sync trial from the store (unless ``force``, only
        once the wait since the last attempt is over); True when MLflow has caught up."""
        if not force and (time.monotonic() - self._last_try < self._wait or not self._answers()):
            return False
        counts = SyncCounts()
        try:
            if not self._parent_in_sync or (self._submitted and self.parent_run_id is None):
                counts.add(self._sync_parent())
            for st in self.trials.values():
                if not st.in_sync:
                    counts.add(self._sync(st))
        except Exception:  # still down: a later event (or the job's end) tries again
            self._last_try = time.monotonic()
            self._wait = min(max(2 * self._wait, CATCH_UP_EVERY_S), CATCH_UP_MAX_S)
            return False
        if self.behind:
            from .store import display_url

            self.behind = False
            self.say(f"MLflow at {display_url(self.spec.tracking.uri)} answers again: caught up with the store "
                     f"({counts.describe()} sent)")
        return True

    def _answers(self) -> bool:
        """Whether the tracking server answers at all (any HTTP status: an auth proxy's 401 is an
        answer); always true for a database or file URI, which has no cheaper probe than a try."""
        if not self._server:
            return True
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.spec.tracking.uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S):
                return True
        except urllib.error.HTTPError:
            return True
        except (OSError, ValueError):  # refused, timed out, no route
            return False

    def _parent_params(self) -> dict[str, str]:
        return {"job.variants": ",".join(self.spec.variant_names()), "job.seeds": json.dumps(self.spec.seeds),
                "job.baseline": self.spec.baseline_variant}

    def _sync_parent(self) -> SyncCounts:
        run_id, counts = sync_parent(self.client, self.store, self.experiment_id, self.store.get_job(self.spec.name),
                                     create=self._submitted, spec_yaml=self.spec_yaml, params=self._parent_params(),
                                     resumed_from=self._resumed_from)
        if self._submitted:
            self.parent_run_id = run_id
        self._parent_in_sync = True
        return counts

    def _parent(self) -> Optional[str]:
        """This submission's parent run, created first when it is missing (MLflow was down at start)."""
        if self.parent_run_id is None and self._submitted:
            self._sync_parent()
        return self.parent_run_id

    def _sync(self, st: _TrialState) -> SyncCounts:
        run_id, top, counts = sync_trial(self.client, self.store, self.experiment_id, self._parent,
                                         self.store.get_job(self.spec.name), self.store.get_trial(st.store_id),
                                         live=st.live, submission=self.parent_run_id)
        st.run_id, st.mlflow_step, st.in_sync = run_id, top, True
        return counts

    # ------------------------------------------------------------------ job
    def register(self, trials: list[Trial]) -> None:
        """Open MLflow's experiment (first: a bad tracking URI must fail before the store is
        touched), then store the job, its variants and trials (idempotent)."""
        spec = self.spec
        if self.use_mlflow:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri=spec.tracking.uri)
            name = spec.experiment_name
            exp = self.client.get_experiment_by_name(name)
            if exp is not None and exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(name)
        self.store.create_or_get_job(spec.name, description=spec.description, spec_yaml=self.spec_yaml,
                                     spec_json=spec.model_dump_json(), baseline=spec.baseline_variant,
                                     tracking_uri=spec.tracking.uri)
        if self.experiment_id is not None:
            self.store.set_job(spec.name, mlflow_experiment_id=self.experiment_id)
        code = fingerprint.code_fingerprint()
        rows = self.store.ensure_trials(spec.name, [
            {"variant": t.variant, "overrides": t.overrides, "seed": t.seed, "hash": t.hash,
             "config": t.config.resolved(), "code_fingerprint": code} for t in trials])
        for t, row in zip(trials, rows):
            # a trial with a run, or with recorded epochs (its run was never made: MLflow was down),
            # is brought up to date by a sync, which reads what MLflow holds, before anything is sent
            fresh = row.mlflow_run_id is None and not row.epoch
            self.trials[t.key] = _TrialState(t, row.id, row.mlflow_run_id, in_sync=fresh)

    def start(self, resumed: bool = False) -> None:
        """Open this submission's parent run and mark the job running; ``resumed``: the job was
        running or interrupted before this driver took it over (its last parent run is linked)."""
        job = self.store.get_job(self.spec.name)
        self._resumed_from = job.mlflow_parent_run_id if resumed and job else None
        self._submitted = True
        # the previous submission's parent is no longer this job's: a parent MLflow does not create
        # now is created by the catch-up (or `ablate sync`)
        self.store.set_job(self.spec.name, state="running", mlflow_parent_run_id=None)
        self._mlflow(None, self._sync_parent)

    def close_previous_parent(self, run_id: str) -> None:
        """Mark the parent run of an interrupted submission (a dead driver's) as such."""
        def write() -> None:
            self.client.set_tag(run_id, "ablate.state", "interrupted")
            self.client.set_terminated(run_id, status="KILLED")

        self._mlflow(None, write)

    def finish(self, state: str) -> None:
        """End the submission: ``finished``, ``failed``, ``interrupted`` or ``cancelled``. MLflow
        behind: a last catch-up, and if it fails, one line naming ``ablate sync``."""
        self.store.set_job(self.spec.name, state=state)
        for st in self.trials.values():
            st.live = False
        if self.client is None:
            return
        status = _JOB_STATUS.get(state, "KILLED")

        def write() -> None:
            for st in self.trials.values():
                row = self.store.get_trial(st.store_id)
                if st.run_id and st.in_sync and row.state in ("running", "pending"):
                    self.client.set_tag(st.run_id, "ablate.state", state)
                    self.client.set_terminated(st.run_id, status="KILLED")
                elif not st.in_sync and row.state not in ("pending", "reused"):
                    self._sync(st)
            if self.parent_run_id:
                self.client.set_tag(self.parent_run_id, "ablate.state", state)
                self.client.set_terminated(self.parent_run_id, status=status)

        self._mlflow(None, write)
        if self.behind:  # the last try brings everything up to date, the job's end included
            for st in self.trials.values():
                st.in_sync = False
            self._parent_in_sync = False
            if not self._catch_up(force=True):
                from .store import display_url

                self.say(f"warning: MLflow at {display_url(self.spec.tracking.uri)} is still behind the store; bring "
                         f"it up to date with `ablate sync {self.spec.name} --store '{display_url(self.store.url)}'`")

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        items = _params(params)
        for i in range(0, len(items), _MLFLOW_PARAMS):
            self.client.log_batch(run_id, params=items[i:i + _MLFLOW_PARAMS])

    # ------------------------------------------------------------------ trials
    def _new_child_run(self, st: _TrialState) -> None:
        """Create a trial's child run (the trial has none; its id goes to the store at once)."""
        t = st.trial
        tags = {"mlflow.parentRunId": self.parent_run_id, "ablate.job": t.job, "ablate.variant": t.variant,
                "ablate.seed": str(t.seed), "ablate.preset": t.config.preset, "ablate.trial_hash": t.hash,
                "ablate.version": __version__, "ablate.submission": self.parent_run_id}
        run = self.client.create_run(self.experiment_id, tags={k: v for k, v in tags.items() if v is not None},
                                     run_name=t.key)
        st.run_id = run.info.run_id
        self.store.update_trial(st.store_id, mlflow_run_id=st.run_id)  # at once: never a second run
        params = flatten(t.config.resolved())
        params.pop("name", None)
        params["variant"] = t.variant
        params["overrides"] = json.dumps(t.overrides, sort_keys=True) or "{}"
        self._log_params(st.run_id, params)
        self.client.log_dict(st.run_id, t.config.resolved(), "config.json")

    def trial_started(self, key: str, attempt: int, node: Optional[str] = None, device: Optional[str] = None) -> None:
        st = self.trials[key]
        fields: dict[str, Any] = {"state": "running", "attempts": attempt}
        if node:
            fields["node"] = node
        if device:
            fields["device"] = device
        self.store.update_trial(st.store_id, **fields)
        st.live = True

        def write() -> None:
            if not st.in_sync:  # an earlier attempt or submission's run: continued, brought up to date
                self._sync(st)
            elif st.run_id is None:
                self._new_child_run(st)
            else:  # this submission's run, after a retry
                self.client.update_run(st.run_id, status="RUNNING")

        self._mlflow(st, write)

    def trial_events(self, key: str, events: Iterable[dict[str, Any]], node: Optional[str] = None,
                     device: Optional[str] = None) -> None:
        """Record a batch of train / eval / epoch events reported by the worker."""
        st = self.trials[key]
        rows = [r for e in events for r in event_metrics(e)]
        fields: dict[str, Any] = {}
        epochs = [int(e["epoch"]) for e in events if e.get("kind") == "epoch"]
        if epochs:
            fields["epoch"] = max(epochs)
        if node:
            fields["node"] = node
        if device:
            fields["device"] = device
        if rows:
            self.store.add_metrics(st.store_id, rows)
        if fields:
            self.store.update_trial(st.store_id, **fields)
        if not rows:
            return

        def write() -> None:
            if not st.in_sync or st.run_id is None:
                self._sync(st)  # sends what the store has beyond what MLflow holds, these rows included
                return
            new = [r for r in rows if r[1] > st.mlflow_step]
            if not new:
                return
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [Metric(mlflow_key(name), value, now, step) for name, step, _, value in new]
            metrics += [Metric("epoch", float(ep), now, step) for step, ep in sorted({(r[1], r[2]) for r in new})]
            metrics.sort(key=lambda m: (m.step, m.key))  # step order: a failed batch leaves a prefix per key
            for i in range(0, len(metrics), _MLFLOW_BATCH):
                self.client.log_batch(st.run_id, metrics=metrics[i:i + _MLFLOW_BATCH])
            st.mlflow_step = max(r[1] for r in new)

        self._mlflow(st, write)

    def trial_checkpoint(self, key: str, path: str) -> None:
        self.store.update_trial(self.trials[key].store_id, checkpoint=path)

    def trial_result(self, key: str, result: dict[str, Any]) -> None:
        """A trial's final result (``status`` finished / diverged / stopped)."""
        st = self.trials[key]
        status = result.get("status", "finished")
        state = {"finished": "finished", "diverged": "diverged"}.get(status, "pending")
        clean = json_ready(result)
        error = None
        if status == "diverged":
            d = result.get("diverged_at", {})
            error = f"diverged at step {d.get('step')} (epoch {d.get('epoch')}): " + ", ".join(
                f"{k} {v}" for k, v in d.get("losses", {}).items())
        self.store.update_trial(st.store_id, state=state, result_json=json.dumps(clean),
                                wall_seconds=result.get("wall_seconds", result.get("train_seconds")), error=error)
        st.live = False

        def write() -> None:
            if not st.in_sync:
                self._sync(st)
                return
            if st.run_id is None:
                return
            self.client.log_dict(st.run_id, clean, "final.json")
            self.client.set_tag(st.run_id, "ablate.state", state)
            if status == "diverged":
                self.client.set_tag(st.run_id, "ablate.diverged_at", error)
            self.client.set_terminated(st.run_id, status="FINISHED" if state == "finished" else "FAILED")

        self._mlflow(st, write)

    def trial_failed(self, key: str, error: str, attempts: int) -> None:
        st = self.trials[key]
        self.store.update_trial(st.store_id, state="failed", error=error.strip().splitlines()[-1][:2000] if error else None,
                                attempts=attempts)
        st.live = False
        self._end_run(st, "failed", "FAILED")

    def trial_reused(self, key: str, source_trial_id: int) -> None:
        """A trial whose hash already finished elsewhere: point at that one, train nothing."""
        self.store.mark_reused(self.trials[key].store_id, source_trial_id)

    def trial_cancelled(self, key: str) -> None:
        st = self.trials[key]
        self.store.update_trial(st.store_id, state="cancelled")
        st.live = False
        self._end_run(st, "cancelled", "KILLED")

    def _end_run(self, st: _TrialState, state: str, status: str) -> None:
        def write() -> None:
            if not st.in_sync:
                self._sync(st)
            elif st.run_id:
                self.client.set_tag(st.run_id, "ablate.state", state)
                self.client.set_terminated(st.run_id, status=status)

        self._mlflow(st, write)

    def supersede(self, key: str) -> None:
        """``--force`` on a trial that has results: the store's trial is reset (metrics deleted) and
        its old MLflow run, which stays, is tagged ``ablate.superseded``; the next start creates a new run."""
        st = self.trials[key]
        old = st.run_id
        self.store.reset_trial(st.store_id)
        st.run_id, st.mlflow_step, st.in_sync = None, -1, True
        if old:
            self._mlflow(None, lambda: self.client.set_tag(old, "ablate.superseded", "true"))


def _params(d: dict[str, str]) -> list:
    """MLflow ``Param`` entities (values cut to MLflow's 6000-character limit)."""
    from mlflow.entities import Param

    return [Param(k, (v if len(v) <= 6000 else v[:5997] + "...")) for k, v in d.items()]
