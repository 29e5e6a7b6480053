"""Run a job's trials on Ray Tune; the driver records (``ablate.record``) and shows a live table.

Why Ray Tune rather than Ray core: Tune already has what a trial needs from a scheduler, and
we would otherwise write it again: a per-trial resource request (``tune.with_resources``,
fractional GPUs included) with queueing beyond the cluster's capacity and
``max_concurrent_trials``; per-epoch results and checkpoints that flow from the worker to the
driver (``tune.report(..., checkpoint=...)``) and are kept on the experiment's storage; and
retries of a crashed trial from its last checkpoint (``FailureConfig(max_failures)``). Its
driver-side ``Callback`` hooks are exactly where our recorder belongs: they run in the
driver process, so only the driver writes to MLflow and the store.

What Tune does not decide: which trials to run. Before ``fit`` the driver asks the store:
a trial already finished or diverged in this job is not run again; one whose hash finished in
another job is reused (unless ``force``); an interrupted one (the driver died) continues from
the checkpoint path the store kept. A trial's hash includes the code fingerprint
(``ablate.fingerprint``), so reuse never crosses code versions, and a job whose recorded
trials other code trained is refused (``--force`` retrains them) rather than mixed.

One driver per job: before it writes anything the driver takes the job's lease in the store (one
compare-and-set UPDATE, ``Store.claim_driver``) and a heartbeat thread renews it every
``HEARTBEAT_EVERY_S`` from then until the driver ends, whatever the exit (data preparation
included); a second driver on a job whose lease is fresh is refused with one line. So ``ablate resume`` starts a new Tune experiment over the
unfinished trials instead of restoring Tune's own experiment state, and the store stays the
single source of truth.

The worker (:func:`_trainable`) calls :func:`ablate.train.train` exactly as a test does,
buffers its events, and at the end of every epoch reports them with the epoch's checkpoint.
A diverged trial returns normally (its result says so): Tune does not retry it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ray import tune

from .spec import JobSpec, Trial

#: Seconds between two heartbeats of a running driver (``jobs.driver_heartbeat_at``).
HEARTBEAT_EVERY_S = 5.0
#: Trial states in which nothing is left to run.
DONE_STATES = ("finished", "diverged", "reused")


class JobError(RuntimeError):
    """A job that cannot run as asked; the message is one line."""


# ---------------------------------------------------------------------------------- storage
#: URI schemes of Tune's storage (pyarrow filesystems) taken as reachable from every node.
URI_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss", "file")


@dataclass(frozen=True)
class Storage:
    """Where Tune keeps a job's experiment state and checkpoints (its ``storage_path``).

    ``root`` is what the user gave (``--workdir``): a local folder, or a URI that pyarrow
    resolves (``s3://bucket/prefix``, ``gs://...``, ``file:///mnt/shared/ablate``). ``shared``:
    every node of the cluster reads the same storage there (true for a URI; for a local folder
    only when declared with ``--shared-workdir``, e.g. an NFS mount at the same path everywhere).
    """

    root: str
    shared: bool

    @classmethod
    def parse(cls, workdir: "str | Path", shared: bool = False) -> "Storage":
        text = str(workdir).strip()
        if not text:
            raise JobError("--workdir: empty; give a folder or a URI (s3://bucket/prefix, gs://..., file:///shared/path)")
        if "://" in text:
            scheme = text.split("://", 1)[0].lower()
            if scheme not in URI_SCHEMES:
                raise JobError(f"--workdir {text}: unknown scheme {scheme!r}; use one of "
                               f"{', '.join(s + '://' for s in URI_SCHEMES)} or a folder")
            return cls(text.rstrip("/"), True)
        return cls(str(Path(text).expanduser().resolve()), shared)

    def check(self) -> None:
        """Open the storage's filesystem once on the driver, so that an unreachable bucket or a
        missing credential is one line now rather than a failure of every trial later."""
        if not self.is_uri:
            return
        import pyarrow.fs

        try:
            fs, path = pyarrow.fs.FileSystem.from_uri(self.root)
            fs.create_dir(path, recursive=True)
        except Exception as e:  # no such bucket, no network, missing credentials
            raise JobError(f"--workdir {self.root}: cannot open it: {_first_line(e)}") from None

    @property
    def is_uri(self) -> bool:
        return "://" in self.root

    def job_path(self, job: str) -> str:
        """Tune's ``storage_path`` for ``job`` (created when it is a local folder)."""
        if self.is_uri:
            return f"{self.root}/{job}"
        path = Path(self.root) / job
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def checkpoint_uri(self, checkpoint) -> str:
        """A Tune checkpoint's location as a string a later driver or worker can open
        (``Checkpoint(path)``): a URI unless the storage is a local folder."""
        if not self.is_uri or self.root.startswith("file://"):
            return checkpoint.path
        return f"{self.root.split('://', 1)[0]}://{checkpoint.path.lstrip('/')}"


def check_storage_reach(storage: Storage, nodes: int) -> None:
    """Refuse a local, undeclared checkpoint folder on a cluster of several nodes: a trial retried
    on another node would not find its checkpoint, and a node's loss would lose them."""
    if nodes > 1 and not storage.shared:
        raise JobError(f"--workdir {storage.root}: a local folder on a {nodes}-node Ray cluster: checkpoints written "
                       f"on one node are lost to the others; pass a URI every node reads (s3://bucket/ablate, "
                       f"gs://bucket/ablate, file:///mnt/shared/ablate) or add --shared-workdir if this folder is a "
                       f"mount every node shares at the same path")


def open_checkpoint_dir(location: str):
    """A context manager giving a local folder with the checkpoint at ``location`` (a path or a
    URI, as :meth:`Storage.checkpoint_uri` wrote it), or None when there is none there."""
    import contextlib

    import pyarrow.fs

    if "://" not in location:
        return contextlib.nullcontext(location if Path(location).is_dir() else None)
    fs, path = pyarrow.fs.FileSystem.from_uri(location)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        return contextlib.nullcontext(None)
    return tune.Checkpoint(location).as_directory()


# ---------------------------------------------------------------------------------- worker
def trial_device(config_device: str, ray_gpu_ids: Sequence[Any], cuda_available: bool) -> str:
    """The device a Ray trial trains on: ``"cuda"`` exactly when Ray gave it GPUs, else ``"cpu"``.

    Args:
        config_device: the trial config's ``device`` (``auto``, ``cpu`` or ``cuda``).
        ray_gpu_ids: ``ray.get_gpu_ids()`` in the worker (``[0]`` for a 0.25 share of GPU 0).
        cuda_available: whether torch sees a CUDA device in the worker.

    Why not ``device: auto`` alone: Ray 2.6x leaves ``CUDA_VISIBLE_DEVICES`` untouched for a task
    given no GPU (``ray._private.utils.set_visible_accelerator_ids`` skips empty id lists unless
    ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1``), so a 0-GPU trial on a GPU node still sees every GPU
    and would train on one that Ray never reserved for it. A contradiction between the config,
    Ray and torch is a :class:`JobError` (one line), never a silent fallback.
    """
    if ray_gpu_ids:
        ids = ",".join(str(i) for i in ray_gpu_ids)
        if config_device == "cpu":
            raise JobError(f"device: cpu, but Ray gave this trial GPU {ids} (resources.gpus > 0): drop `device: cpu` "
                           f"or set resources.gpus: 0")
        if not cuda_available:
            raise JobError(f"Ray gave this trial GPU {ids}, but torch in the worker sees no CUDA device "
                           f"(a CPU-only torch build, or CUDA_VISIBLE_DEVICES hides it)")
        return "cuda"
    if config_device == "cuda":
        raise JobError("device: cuda, but Ray gave this trial no GPU (resources.gpus: 0): set resources.gpus "
                       "(0.25 shares a GPU between four trials) or drop `device: cuda`")
    return "cpu"


def _trainable(params: dict[str, Any], trials: dict[str, dict[str, Any]], fault: Optional[dict] = None) -> None:
    """One trial in a Ray worker: ``train()`` with per-epoch reports and checkpoints to Tune."""
    import ray
    import torch

    from .config import TrialConfig
    from .train import CHECKPOINT, train

    key = params["trial"]
    payload = trials[key]
    config = TrialConfig.model_validate_json(payload["config"])
    work = Path(tempfile.mkdtemp(prefix="ablate-trial-"))
    ckpt = tune.get_checkpoint()
    if ckpt is not None:  # a retry after a crash: Tune hands back the last checkpoint
        with ckpt.as_directory() as d:
            shutil.copy(Path(d) / CHECKPOINT, work / CHECKPOINT)
    elif payload.get("resume_from"):  # ablate resume: the checkpoint the store kept (a path or a URI)
        with open_checkpoint_dir(payload["resume_from"]) as d:
            if d is not None and Path(d, CHECKPOINT).is_file():
                shutil.copy(Path(d) / CHECKPOINT, work / CHECKPOINT)

    node = ray.get_runtime_context().get_node_id()[:12]
    gpu_ids = ray.get_gpu_ids()
    # a trial given no GPU never touches CUDA (not even to ask whether it is there)
    device = trial_device(config.device, gpu_ids, bool(gpu_ids) and torch.cuda.is_available())
    config = config.model_copy(update={"device": device})  # device is not in the trial's hash or identity
    buffer: list[dict[str, Any]] = []
    injected = fault is not None and fault.get("trial") == key and not Path(fault["marker"]).exists()

    def report(event: dict[str, Any]) -> None:
        if event["kind"] == "epoch":
            buffer.append(event)
            events = list(buffer)
            buffer.clear()
            tune.report({"epoch": event["epoch"], "events": events, "node": node, "device": device},
                        checkpoint=tune.Checkpoint.from_directory(str(work)))
            return
        buffer.append(event)
        if injected and event["kind"] == "train" and event["epoch"] > fault["epoch"]:
            Path(fault["marker"]).touch()  # once: the retry must get through
            os._exit(1)  # a worker killed mid-epoch (tests inject this)

    job = config.name.split("/")[0]
    hint = f"retraining it (`ablate submit {job}.yaml --force` or `ablate resume {job} --force`)"
    try:
        result = train(config, report, out_dir=work, resume=True, restart_hint=hint)
        tune.report({"epoch": result["epoch"], "events": list(buffer), "final": result, "node": node,
                     "device": device})
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------- driver
@dataclass
class _Row:
    trial: Trial
    state: str = "pending"
    epoch: int = 0
    ap: Optional[float] = None
    node: str = ""
    attempts: int = 0
    note: str = ""


@dataclass
class Outcome:
    """What a job run did: trial keys by final state, the job's state and the wall time."""

    job: str
    state: str
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    states: dict[str, str] = field(default_factory=dict)
    wall_seconds: float = 0.0


class _Unpicklable:
    """Tune pickles its run config (for a restore we never use); our driver-side hooks hold
    live connections, so they pickle as empty shells."""

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        pass


class _RecorderCallback(_Unpicklable, tune.Callback):
    """Forwards Tune's driver-side events to the recorder (MLflow + store) and the live table."""

    def __init__(self, recorder, rows: dict[str, _Row], live_update, storage: Optional[Storage] = None):
        self.recorder, self.rows, self.live_update, self.storage = recorder, rows, live_update, storage

    @staticmethod
    def _key(trial) -> str:
        return trial.config["trial"]

    def on_trial_start(self, iteration, trials, trial, **info):
        key = self._key(trial)
        row = self.rows[key]
        row.attempts += 1
        row.state = "running"
        self.recorder.trial_started(key, row.attempts)
        self.live_update()

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.rows[self._key(trial)].note = f"retrying after a crash ({trial.num_failures} so far)"
        self.live_update()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        key = self._key(trial)
        row = self.rows[key]
        events = result.get("events") or []
        row.node = result.get("node", row.node)
        self.recorder.trial_events(key, events, node=row.node, device=result.get("device"))
        for e in events:
            if e.get("kind") == "eval":
                row.ap = e.get("AP")
            if e.get("kind") == "epoch":
                row.epoch = e["epoch"]
        final = result.get("final")
        if final is not None:
            self.recorder.trial_result(key, final)
            row.state = {"finished": "finished", "diverged": "diverged"}.get(final["status"], "stopped")
            row.note = ""
        self.live_update()

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        where = self.storage.checkpoint_uri(checkpoint) if self.storage is not None else checkpoint.path
        self.recorder.trial_checkpoint(self._key(trial), where)

    def on_trial_error(self, iteration, trials, trial, **info):
        key = self._key(trial)
        error = ""
        try:
            error = trial.get_error() or ""
        except Exception:  # the error file is best effort
            pass
        lines = [ln for ln in str(error).strip().splitlines() if ln.strip()]
        msg = lines[-1] if lines else "trial failed"
        self.recorder.trial_failed(key, msg, self.rows[key].attempts)
        self.rows[key].state = "failed"
        self.rows[key].note = msg[:80]
        self.live_update()


class _CancelStopper(_Unpicklable, tune.Stopper):
    """Stops everything once ``ablate cancel`` marked the job cancelled in the store, or once this
    driver lost its lease (another driver took the job over)."""

    def __init__(self, store, job: str, lease: Optional["_DriverLease"] = None, poll_s: float = 2.0):
        self.store, self.job, self.lease, self.poll_s = store, job, lease, poll_s
        self._last = 0.0
        self.cancelled = False

    def __call__(self, trial_id, result):
        return self.cancelled or bool(self.lease and self.lease.lost)

    def stop_all(self):
        """Polled by Tune every step: reads the job's state (the lease's thread writes the heartbeat)."""
        now = time.monotonic()
        if not self.cancelled and now - self._last >= self.poll_s:
            self._last = now
            try:
                job_row = self.store.get_job(self.job)
                self.cancelled = bool(job_row and job_row.state == "cancelled")
            except Exception:  # a transient store error must not end the job; the next poll retries
                pass
        return self.cancelled or bool(self.lease and self.lease.lost)


class _DriverLease:
    """This driver's hold on a job: claimed once (compare-and-set in the store), then renewed by a
    daemon thread every ``HEARTBEAT_EVERY_S`` until :meth:`close`, which stops the thread and
    releases the lease. ``lost`` turns true if a renewal finds another driver's token."""

    def __init__(self, store, job: str):
        self.store, self.job = store, job
        self.token = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def claim(self, **create) -> bool:
        return self.store.claim_driver(self.job, self.token, heartbeat_stale_s(), **create)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"ablate-heartbeat-{self.job}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_EVERY_S):
            try:
                if not self.store.beat_driver(self.job, self.token):
                    self.lost = True
                    return
            except Exception:  # a transient store error: the next beat retries (stale only after several)
                pass

    @property
    def beating(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.store.release_driver(self.job, self.token)
        except Exception:  # best effort: a lease left behind goes stale by itself
            pass


def _check_capacity(spec: JobSpec) -> None:
    """Refuse a per-trial request that no node of the cluster can hold (Tune would wait forever)."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    cpu = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    gpu = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    r = spec.resources
    if r.cpus > cpu or r.gpus > gpu:
        raise JobError(f"resources: a trial asks for {r.cpus:g} CPU and {r.gpus:g} GPU, but the largest node of this "
                       f"Ray cluster has {cpu:g} CPU and {gpu:g} GPU")


def _worker_config(trial: Trial, threads: int) -> str:
    """The trial config as JSON for a worker: data paths absolute (workers run elsewhere) and the
    thread count set from the trial's CPU share unless the spec gave one."""
    data = trial.config.data
    if data.synthetic is not None:
        data = data.model_copy(update={"synthetic": data.synthetic.model_copy(
            update={"root": data.synthetic.root.resolve()})})
    else:
        c = data.coco
        data = data.model_copy(update={"coco": c.model_copy(update={k: getattr(c, k).resolve() for k in (
            "train_ann", "train_images", "val_ann", "val_images")})})
    return trial.config.model_copy(update={"data": data, "threads": trial.config.threads or threads}).model_dump_json()


def _prepare_data(spec: JobSpec, say) -> None:
    """Generate the synthetic set once on the driver, before the workers start (they would race)."""
    s = spec.dataset.synthetic
    if s is None:
        return
    from .data.synth import generate_synthetic

    generate_synthetic(s.root, num_train=s.train, num_val=s.val, image_size=s.size, seed=s.seed, progress=say)


def _table(spec: JobSpec, rows: dict[str, _Row], started: float):
    from rich.markup import escape
    from rich.table import Table

    done = sum(r.state in ("finished", "diverged", "reused", "failed") for r in rows.values())
    table = Table(title=f"job {spec.name}: {done}/{len(rows)} trials done, {time.time() - started:.0f} s",
                  title_justify="left")
    for col in ("trial", "state", "epoch", "AP", "node", "attempts", ""):
        table.add_column(col, justify="right" if col in ("epoch", "AP", "attempts") else "left")
    color = {"running": "cyan", "finished": "green", "diverged": "yellow", "failed": "red", "reused": "blue",
             "cancelled": "magenta"}
    for key, r in rows.items():
        total = r.trial.config.train.epochs
        table.add_row(key, f"[{color.get(r.state, 'white')}]{r.state}[/]", f"{r.epoch}/{total}",
                      "" if r.ap is None else f"{r.ap:.3f}", r.node, str(r.attempts or ""), escape(r.note))
    return table


def run_job(spec: JobSpec, spec_yaml: str, *, address: Optional[str] = None, force: bool = False,
            resume: bool = False, workdir: "str | Path" = Path("runs"), shared_workdir: bool = False,
            live: bool = True, mlflow: bool = True,
            fault: Optional[dict] = None, console=None) -> Outcome:
    """Run (or resume) a job: register it, skip or reuse what is done, train the rest on Ray.

    Args:
        spec: the validated job.
        spec_yaml: the file's text (stored with the job).
        address: a Ray cluster to join (default: ``RAY_ADDRESS`` or a new local Ray).
        force: retrain trials even when they (or the same hash elsewhere) already finished, and
            trials that other code trained (refused otherwise).
        resume: continue a job that exists in the store (``ablate resume``).
        workdir: Tune's experiment storage (checkpoints) goes under ``workdir/<job>/``: a local
            folder or a URI (``s3://``, ``gs://``, ``file://``; see :class:`Storage`). On a cluster
            of several nodes it must be shared: a URI, or a folder declared with ``shared_workdir``.
        shared_workdir: the local ``workdir`` is a mount every node shares at the same path.
        live: show the live Rich table.
        mlflow: record to MLflow as well as to the store.
        fault: tests only: ``{"trial": key, "epoch": k, "marker": path}`` kills that trial's worker
            once, during epoch ``k + 1``.
    """
    from rich.console import Console

    from .record import Recorder
    from .store import StoreError, display_url, open_store

    console = console or Console(stderr=True)
    started = time.time()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith("ray://"):
        raise JobError(f"--address {address}: Ray Client cannot run the driver-side recorder; run the driver on the "
                       f"cluster instead (`ray job submit -- ablate submit JOB.yaml`) or give the GCS address (host:6379)")
    if address and address.startswith(("http://", "https://")):  # e.g. RAY_ADDRESS from `make cluster-up`
        raise JobError(f"Ray address {address} is the Jobs API, for `ray job submit --address {address} -- ablate "
                       f"submit JOB.yaml`; to run the driver here give the GCS address (--address host:6390) or "
                       f"--address local for a Ray of its own")
    from .fingerprint import code_fingerprint

    storage = Storage.parse(workdir, shared_workdir)  # a bad --workdir is refused before anything is written
    storage.check()
    trials = spec.trials()
    for t in trials:  # the worker would refuse these (trial_device); say so once, before anything is written
        if t.config.device == "cuda" and not spec.resources.gpus:
            raise JobError(f"trial {t.key}: device: cuda, but resources.gpus is 0; give the trials a GPU share "
                           f"(resources.gpus: 0.25 puts four on one GPU) or drop `device: cuda`")
        if t.config.device == "cpu" and spec.resources.gpus:
            raise JobError(f"trial {t.key}: device: cpu, but resources.gpus is {spec.resources.gpus:g}: the GPU would "
                           f"be reserved and idle; set resources.gpus: 0 or drop `device: cpu`")
    store = open_store(spec.store)
    where = display_url(spec.store)
    existing = store.get_job(spec.name)
    if resume and existing is None:
        raise JobError(f"no job named {spec.name!r} in the store {where}")
    if existing is not None:
        if driver_alive(existing):
            raise JobError(_live_driver(existing))
        if existing.state == "running" and not resume:
            raise JobError(f"job {spec.name!r} was interrupted (its driver is gone); continue it with "
                           f"`ablate resume {spec.name}` or stop it with `ablate cancel {spec.name}`")
    if existing is not None:
        _refuse_changed_spec(store, spec, trials, force=force, where=where, resume=resume)
    recorder = Recorder(spec, store, spec_yaml, mlflow=mlflow,
                        say=lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
    if mlflow:
        _check_tracking(spec)  # an unusable MLflow URI or server: refused before the store is written
    lease = _DriverLease(store, spec.name)
    if not lease.claim(description=spec.description, spec_yaml=spec_yaml, spec_json=spec.model_dump_json(),
                       baseline=spec.baseline_variant, tracking_uri=spec.tracking.uri):
        raise JobError(_live_driver(store.get_job(spec.name)))  # another driver won the race for the lease
    lease.start()  # heartbeats from here (the job row says running) until the driver ends
    try:
        try:
            recorder.register(trials)
        except BaseException as e:
            try:
                store.set_job(spec.name, state=existing.state if existing is not None else "failed")
            except Exception:  # best effort: the store may be what failed
                pass
            if isinstance(e, (StoreError, KeyboardInterrupt)):
                raise
            raise JobError(f"tracking: cannot use MLflow at {display_url(spec.tracking.uri)}: {_first_line(e)}") from None
        store.set_code_fingerprint([st.store_id for st in recorder.trials.values()], code_fingerprint())
        try:
            return _run_registered(spec, store, recorder, trials, existing, address=address, force=force,
                                   storage=storage, live=live, fault=fault, console=console, started=started,
                                   lease=lease)
        except BaseException as e:
            if lease.lost:  # the job is another driver's now: record nothing more
                raise JobError(f"job {spec.name}: another driver took the job over after this one's heartbeat "
                               f"stopped for over {heartbeat_stale_s():g} s; this driver stopped") from None
            state = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            try:
                recorder.finish(state)
            except Exception:  # best effort: the store or MLflow may be what failed
                pass
            if isinstance(e, (KeyboardInterrupt, JobError)):
                raise
            raise JobError(f"job {spec.name} {state}: {type(e).__name__}: {_first_line(e)}") from e
    finally:
        lease.close()  # the heartbeat stops and the lease is free, whatever the exit


def _check_tracking(spec: JobSpec) -> None:
    from mlflow import MlflowClient

    from .store import display_url

    try:
        MlflowClient(tracking_uri=spec.tracking.uri).get_experiment_by_name(spec.experiment_name)
    except Exception as e:
        raise JobError(f"tracking: cannot use MLflow at {display_url(spec.tracking.uri)}: {_first_line(e)}") from None


def _live_driver(job) -> str:
    beat = job.driver_heartbeat_at
    age = f"last heartbeat {time.time() - beat.timestamp():.0f} s ago" if beat is not None else "no heartbeat yet"
    return f"job {job.name!r} has a live driver ({age}); wait for it or `ablate cancel {job.name}`"


def heartbeat_stale_s() -> float:
    """Seconds without a heartbeat after which a running job's driver is taken as gone
    (``ABLATE_HEARTBEAT_STALE_S``, default 30: six missed heartbeats)."""
    return float(os.environ.get("ABLATE_HEARTBEAT_STALE_S", "30"))


def driver_alive(job) -> bool:
    """Whether ``job`` (a store row) has a driver: a lease whose heartbeat is recent (whatever the
    job's state: a cancelled job's driver is alive until it has stopped its trials)."""
    beat = job.driver_heartbeat_at
    return job.driver_token is not None and beat is not None and time.time() - beat.timestamp() < heartbeat_stale_s()


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__


def _refuse_changed_spec(store, spec: JobSpec, trials: list[Trial], force: bool, where: str,
                         resume: bool = False) -> None:
    """A job name reused with another spec, or by other code, must not silently discard recorded
    trials nor mix their results with new ones: refused unless ``force``."""
    from .fingerprint import code_fingerprint

    if force:
        return
    stored = {(t.variant_name, t.seed): t for t in store.trials_of(spec.name)}
    changed = [(t, stored[(t.variant, t.seed)]) for t in trials if (t.variant, t.seed) in stored
               and stored[(t.variant, t.seed)].hash != t.hash and stored[(t.variant, t.seed)].state != "pending"]
    if not changed:
        return
    current = code_fingerprint()
    other_code = [(t, row) for t, row in changed if row.code_fingerprint != current]
    if other_code:
        t, row = other_code[0]
        was = row.code_fingerprint[:12] if row.code_fingerprint else "unrecorded (before code fingerprints)"
        how = f"`ablate resume {spec.name} --force`" if resume else "--force"
        raise JobError(f"job {spec.name!r} in {where}: {len(other_code)} recorded trial(s) were trained by other code "
                       f"(e.g. {t.key}: code {was}, this ablate {current[:12]}); results of two code versions are not "
                       f"mixed: retrain them with {how}, or give the job another name")
    raise JobError(f"job {spec.name!r} exists in {where} with a different spec: {len(changed)} recorded trial(s) "
                   f"would be discarded (e.g. {changed[0][0].key}); give the job another name, or pass --force")


def _run_registered(spec: JobSpec, store, recorder, trials: list[Trial], existing, *, address, force, storage, live,
                    fault, console, started, lease: _DriverLease) -> Outcome:
    from rich.live import Live

    say = lambda m: console.print(m, highlight=False)  # noqa: E731
    if existing is not None and existing.state in ("running", "interrupted") and existing.mlflow_parent_run_id:
        recorder.close_previous_parent(existing.mlflow_parent_run_id)  # MLflow best effort, as every recorder write

    outcome = Outcome(spec.name, "finished")
    rows = {t.key: _Row(t) for t in trials}
    to_run: list[Trial] = []
    resume_from: dict[str, Optional[str]] = {}
    for t in trials:
        st = recorder.trials[t.key]
        row = store.get_trial(st.store_id)
        if force and row.state in DONE_STATES + ("failed", "cancelled"):
            recorder.supersede(t.key)  # the store's trial reset; its old MLflow run stays, tagged as replaced
            row = store.get_trial(st.store_id)
        rows[t.key].attempts = row.attempts or 0
        if row.state in DONE_STATES:
            rows[t.key].state, rows[t.key].epoch = row.state, row.epoch or 0
            outcome.skipped.append(t.key)
            continue
        source = None if force else store.finished_trial_with_hash(t.hash, exclude_job=spec.name)
        if source is not None:
            recorder.trial_reused(t.key, source.id)
            rows[t.key].state, rows[t.key].note = "reused", f"from trial {source.id}"
            outcome.reused.append(t.key)
            continue
        to_run.append(t)
        resume_from[t.key] = row.checkpoint if row.state in ("running", "pending", "failed", "cancelled") else None
        rows[t.key].epoch = row.epoch or 0

    if not to_run:
        say(f"job {spec.name}: nothing to train ({len(outcome.skipped)} done, {len(outcome.reused)} reused)")
        store.set_job(spec.name, state="finished")
        outcome.states = {k: r.state for k, r in rows.items()}
        return outcome

    _prepare_data(spec, say)  # the lease's heartbeat goes on meanwhile: no second driver, cancel is seen
    if lease.lost:
        raise JobError("lease lost")  # run_job says what happened
    if store.get_job(spec.name).state == "cancelled":  # `ablate cancel` while we prepared
        for t in to_run:
            recorder.trial_cancelled(t.key)
        outcome.state = "cancelled"
        outcome.states = {k: ("cancelled" if k in {t.key for t in to_run} else r.state) for k, r in rows.items()}
        return outcome

    import ray

    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # the recorder is our logger
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune banner, our live table instead
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import logging

    for name in ("ray.tune", "ray.train"):  # Tune's own reporting: the live table and the recorder replace it
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")  # the recorder keeps each failure's last line

    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        _check_capacity(spec)
        check_storage_reach(storage, sum(1 for n in ray.nodes() if n.get("Alive")))
        # the state before this driver took the lease (which marks the job running)
        recorder.start(resumed=existing is not None and existing.state in ("running", "interrupted"))
        outcome.trained = [t.key for t in to_run]
        threads = max(1, int(spec.resources.cpus))
        payload = {t.key: {"config": _worker_config(t, threads), "resume_from": resume_from.get(t.key)} for t in to_run}

        storage_path = storage.job_path(spec.name)
        resources = {"cpu": spec.resources.cpus, "gpu": spec.resources.gpus}
        trainable = tune.with_resources(tune.with_parameters(_trainable, trials=payload, fault=fault), resources)
        stopper = _CancelStopper(store, spec.name, lease)
        lock = threading.Lock()
        live_view = Live(_table(spec, rows, started), console=console, refresh_per_second=2, transient=False) \
            if live else None

        def update() -> None:
            if live_view is not None:
                with lock:
                    live_view.update(_table(spec, rows, started))

        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([t.key for t in to_run])},
            tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent, reuse_actors=False),
            run_config=tune.RunConfig(
                name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=storage_path,
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=[_RecorderCallback(recorder, rows, update, storage)],
                stop=stopper,
                verbose=0,
            ),
        )
        say(f"job {spec.name}: {len(to_run)} trial(s) to train on Ray"
            f" ({spec.resources.cpus:g} CPU, {spec.resources.gpus:g} GPU each"
            f"{f', at most {spec.max_concurrent} at once' if spec.max_concurrent else ''});"
            f" {len(outcome.skipped)} already done, {len(outcome.reused)} reused")
        interrupted = False
        try:
            if live_view is not None:
                with live_view:
                    tuner.fit()
            else:
                tuner.fit()
        except KeyboardInterrupt:
            interrupted = True
    finally:
        if own_ray:
            ray.shutdown()
    if lease.lost:
        raise JobError("lease lost")  # run_job says what happened; the job is another driver's

    cancelled = stopper.cancelled or (store.get_job(spec.name).state == "cancelled")
    for key, r in rows.items():
        row = store.get_trial(recorder.trials[key].store_id)
        if row.state in ("pending", "running") and cancelled:
            recorder.trial_cancelled(key)
            r.state = "cancelled"
        else:
            r.state = row.state
    outcome.states = {k: r.state for k, r in rows.items()}
    left = [k for k, s in outcome.states.items() if s in ("pending", "running")]
    if cancelled:
        outcome.state = "cancelled"
    elif interrupted or left:
        outcome.state = "interrupted"
    elif any(s == "failed" for s in outcome.states.values()):
        outcome.state = "failed"
    recorder.finish(outcome.state)
    outcome.wall_seconds = time.time() - started
    return outcome
