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

Idempotence. A retried or resumed trial replays the steps after its last checkpoint. The
store ignores a row it already has (primary key ``(trial, name, step)``); MLflow has no such
key, so the recorder sends MLflow only steps above the highest step it already holds for the
trial (read from the store when the recorder starts).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from . import __version__, fingerprint
from .spec import JobSpec, Trial
from .store import Store

#: Event keys that are not metrics.
_NOT_METRICS = {"kind", "step", "epoch", "per_class_AP", "checkpoint"}
#: MLflow ``log_batch`` limits (metrics and params per call).
_MLFLOW_BATCH = 1000
_MLFLOW_PARAMS = 100


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


@dataclass
class _TrialState:
    trial: Trial
    store_id: int
    run_id: Optional[str] = None
    mlflow_step: int = -1  # highest step MLflow holds for this trial


class Recorder:
    """Writes one job's trials to MLflow and the SQL store (driver only).

    Args:
        spec: the validated job.
        store: an open results store.
        spec_yaml: the submitted file's text (kept in the store).
        mlflow: record to MLflow (tests of the store alone may turn it off).
    """

    def __init__(self, spec: JobSpec, store: Store, spec_yaml: str, mlflow: bool = True):
        self.spec = spec
        self.store = store
        self.spec_yaml = spec_yaml
        self.use_mlflow = mlflow
        self.client = None
        self.experiment_id: Optional[str] = None
        self.parent_run_id: Optional[str] = None
        self.trials: dict[str, _TrialState] = {}

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
            state = _TrialState(t, row.id, row.mlflow_run_id)
            if row.mlflow_run_id:
                steps = [s for _, s, _, _ in self.store.metrics_of(row.id)]
                state.mlflow_step = max(steps, default=-1)
            self.trials[t.key] = state

    def start(self, resumed: bool = False) -> None:
        """Open this submission's parent run and mark the job running; ``resumed``: the job was
        running or interrupted before this driver took it over (its last parent run is linked)."""
        job = self.store.get_job(self.spec.name)
        if self.client is not None:
            tags = {"ablate.job": self.spec.name, "ablate.version": __version__, "ablate.kind": "job"}
            if resumed and job and job.mlflow_parent_run_id:
                tags["ablate.resumed_from"] = job.mlflow_parent_run_id
            run = self.client.create_run(self.experiment_id, tags=tags, run_name=self.spec.name)
            self.parent_run_id = run.info.run_id
            self.client.log_text(self.parent_run_id, self.spec_yaml, "job.yaml")
            self._log_params(self.parent_run_id, {
                "job.variants": ",".join(self.spec.variant_names()), "job.seeds": json.dumps(self.spec.seeds),
                "job.baseline": self.spec.baseline_variant})
        self.store.set_job(self.spec.name, state="running", mlflow_parent_run_id=self.parent_run_id)

    def finish(self, state: str) -> None:
        """End the submission: ``finished``, ``failed``, ``interrupted`` or ``cancelled``."""
        self.store.set_job(self.spec.name, state=state)
        if self.client is None:
            return
        status = {"finished": "FINISHED", "failed": "FAILED"}.get(state, "KILLED")
        for st in self.trials.values():
            row = self.store.get_trial(st.store_id)
            if st.run_id and row.state in ("running", "pending"):
                self.client.set_tag(st.run_id, "ablate.state", state)
                self.client.set_terminated(st.run_id, status="KILLED")
        if self.parent_run_id:
            self.client.set_tag(self.parent_run_id, "ablate.state", state)
            self.client.set_terminated(self.parent_run_id, status=status)

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        items = _params(params)
        for i in range(0, len(items), _MLFLOW_PARAMS):
            self.client.log_batch(run_id, params=items[i:i + _MLFLOW_PARAMS])

    # ------------------------------------------------------------------ trials
    def _child_run(self, st: _TrialState) -> Optional[str]:
        if self.client is None:
            return None
        t = st.trial
        if st.run_id:  # an earlier attempt or submission: continue that run
            self.client.update_run(st.run_id, status="RUNNING")
            if self.parent_run_id:
                self.client.set_tag(st.run_id, "ablate.submission", self.parent_run_id)
            return st.run_id
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
        return st.run_id

    def trial_started(self, key: str, attempt: int, node: Optional[str] = None, device: Optional[str] = None) -> None:
        st = self.trials[key]
        self._child_run(st)
        fields: dict[str, Any] = {"state": "running", "attempts": attempt}
        if node:
            fields["node"] = node
        if device:
            fields["device"] = device
        self.store.update_trial(st.store_id, **fields)

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
        if self.client is None or not rows:
            return
        if st.run_id is None:
            self._child_run(st)
        new = [r for r in rows if r[1] > st.mlflow_step]
        if not new:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(name), value, now, step) for name, step, _, value in new]
        metrics += [Metric("epoch", float(ep), now, step) for step, ep in sorted({(r[1], r[2]) for r in new})]
        for i in range(0, len(metrics), _MLFLOW_BATCH):
            self.client.log_batch(st.run_id, metrics=metrics[i:i + _MLFLOW_BATCH])
        st.mlflow_step = max(r[1] for r in new)

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
        if self.client is not None and st.run_id:
            self.client.log_dict(st.run_id, clean, "final.json")
            self.client.set_tag(st.run_id, "ablate.state", state)
            if status == "diverged":
                self.client.set_tag(st.run_id, "ablate.diverged_at", error)
            self.client.set_terminated(st.run_id, status="FINISHED" if state == "finished" else "FAILED")

    def trial_failed(self, key: str, error: str, attempts: int) -> None:
        st = self.trials[key]
        self.store.update_trial(st.store_id, state="failed", error=error.strip().splitlines()[-1][:2000] if error else None,
                                attempts=attempts)
        if self.client is not None and st.run_id:
            self.client.set_tag(st.run_id, "ablate.state", "failed")
            self.client.set_terminated(st.run_id, status="FAILED")

    def trial_reused(self, key: str, source_trial_id: int) -> None:
        """A trial whose hash already finished elsewhere: point at that one, train nothing."""
        self.store.mark_reused(self.trials[key].store_id, source_trial_id)

    def trial_cancelled(self, key: str) -> None:
        st = self.trials[key]
        self.store.update_trial(st.store_id, state="cancelled")
        if self.client is not None and st.run_id:
            self.client.set_tag(st.run_id, "ablate.state", "cancelled")
            self.client.set_terminated(st.run_id, status="KILLED")


def _params(d: dict[str, str]) -> list:
    """MLflow ``Param`` entities (values cut to MLflow's 6000-character limit)."""
    from mlflow.entities import Param

    return [Param(k, (v if len(v) <= 6000 else v[:5997] + "...")) for k, v in d.items()]
