"""The Python half of ``infra/gpu-check.sh``: write the check's job file, then read what the job
recorded and what ``nvidia-smi`` sampled, and print the figures (a table; JSON with ``--out``).

    python infra/gpu_check.py job BASE.yaml DIR [--cpus N] [--cpu-dry-run]   -> DIR/gpu_check.yaml
    python infra/gpu_check.py report DIR [--smi FILE] [--gpu-info LINE] [--wall S] [--out FILE]

Where each figure comes from:

* img/s of a trial: the store's per-epoch metrics ``images_seen`` and ``train_seconds`` (both
  cumulative, recorded from the worker's epoch events): ``images_seen / train_seconds`` after the
  last epoch (the trial's ``images_per_second`` result), and over epochs 2+ the difference
  ``(images_seen[last] - images_seen[1]) / (train_seconds[last] - train_seconds[1])``: the first
  epoch decodes every PNG, the later ones read the in-memory image cache. Training time only
  (data loading included): evaluation and checkpoints are not in ``train_seconds``.
* peak GPU memory of a trial: the max over its epochs of the store's ``gpu_mem_mib`` (peak
  allocated to tensors in that epoch, ``torch.cuda.max_memory_allocated``) and
  ``gpu_mem_reserved_mib`` (peak held by torch's caching allocator); the CUDA context
  (~0.5 GiB a process) is in neither, only in nvidia-smi's ``memory.used``.
* the GPU's busy share: ``utilization.gpu`` (percent of the sample period in which a kernel ran)
  sampled by ``nvidia-smi -lms 500``, over the window in which the trials held the GPU: from the
  first to the last sample whose ``memory.used`` is above the first sample's (taken before Ray
  starts) by more than ``HELD_MIB``; a trial process's CUDA context alone exceeds that.

Exit status of ``report``: 0 when every trial finished on the device the check asked for (cuda;
cpu in a dry run) and, on a GPU, the samples show the trials; 1 otherwise (the figures are
printed all the same).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

JOB = "gpu_check"
#: memory.used above the idle level that means some trial process holds the GPU (MiB)
HELD_MIB = 256.0
#: nvidia-smi's sampling period in the script (-lms 500), for a duration when timestamps are missing
SAMPLE_S = 0.5


# ------------------------------------------------------------------------------- the job file
def write_job(base: Path, work: Path, cpus: int, dry_run: bool) -> Path:
    """``work/gpu_check.yaml``: ``base`` with its data, store and MLflow inside ``work``, ``cpus``
    CPUs per trial and, for ``dry_run``, 2 tiny CPU trials (gpus 0, one seed, 16 images of 64 px,
    2 epochs: two so that the epochs-2+ figure is exercised too)."""
    import yaml

    doc = yaml.safe_load(Path(base).read_text())
    work = Path(work).resolve()
    doc["dataset"]["synthetic"]["root"] = str(work / "synth")
    doc["store"] = f"sqlite:///{work / 'ablate.db'}"
    doc["tracking"] = {"uri": f"sqlite:///{work / 'mlflow.db'}"}
    doc["resources"]["cpus"] = cpus
    if dry_run:
        doc["dataset"]["synthetic"].update({"train": 16, "val": 8, "size": 64})
        doc["dataset"]["image_size"] = 64
        doc["base"]["train"].update({"epochs": 2, "batch_size": 8, "eval_every": 2, "log_every": 1,
                                     "warmup_epochs": 0.5})
        doc["seeds"] = [0]
        doc["resources"]["gpus"] = 0
        doc["max_concurrent"] = 2
    out = work / "gpu_check.yaml"
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


# ------------------------------------------------------------------------------- nvidia-smi
@dataclass(frozen=True)
class Sample:
    """One line of ``nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used
    --format=csv,noheader,nounits``: seconds since the epoch (local clock), percent, MiB;
    None where nvidia-smi printed ``[N/A]`` or ``[Not Supported]``."""

    t: Optional[float]
    util: Optional[float]
    mem: Optional[float]


def _number(field: str) -> Optional[float]:
    try:
        v = float(field.strip().rstrip("%").removesuffix("MiB").strip())
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _timestamp(field: str) -> Optional[float]:
    for fmt in ("%Y/%m/%d %H:%M:%S.%f", "%Y/%m/%d %H:%M:%S"):
        try:
            return datetime.strptime(field.strip(), fmt).timestamp()
        except ValueError:
            continue
    return None


def parse_smi(text: str) -> list[Sample]:
    """The samples of nvidia-smi's CSV (one GPU). Lines without three fields (a header, a line cut
    off when the sampler was stopped, an error message) are skipped, as are lines in which neither
    number parses."""
    samples = []
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) != 3:
            continue
        util, mem = _number(fields[1]), _number(fields[2])
        if util is None and mem is None:
            continue
        samples.append(Sample(_timestamp(fields[0]), util, mem))
    return samples


def busy_share(samples: list[Sample], held_mib: float = HELD_MIB) -> Optional[dict[str, Any]]:
    """The GPU's utilisation while trials held it (see the module docstring), or None when no
    sample shows them: ``{"mean", "median", "samples", "seconds", "memory_used_peak_mib",
    "memory_used_idle_mib", "mean_whole_run", "samples_whole_run"}``."""
    mems = [s.mem for s in samples if s.mem is not None]
    if not mems:
        return None
    idle = mems[0]
    held = [i for i, s in enumerate(samples) if s.mem is not None and s.mem > idle + held_mib]
    if not held:
        return None
    window = samples[held[0]:held[-1] + 1]
    utils = [s.util for s in window if s.util is not None]
    if not utils:
        return None
    t0, t1 = window[0].t, window[-1].t
    seconds = t1 - t0 + SAMPLE_S if t0 is not None and t1 is not None else len(window) * SAMPLE_S
    every = [s.util for s in samples if s.util is not None]
    return {"mean": statistics.fmean(utils), "median": statistics.median(utils), "samples": len(utils),
            "seconds": seconds, "memory_used_peak_mib": max(mems), "memory_used_idle_mib": idle,
            "mean_whole_run": statistics.fmean(every), "samples_whole_run": len(every)}


def parse_gpu_info(line: str) -> Optional[dict[str, Any]]:
    """``nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader,nounits``."""
    fields = [f.strip() for f in line.split(",")]
    if len(fields) != 4:
        return None
    return {"index": fields[0], "name": fields[1], "memory_total_mib": _number(fields[2]), "driver": fields[3]}


# ------------------------------------------------------------------------------- the store
@dataclass
class TrialFigures:
    trial: str
    state: str
    device: Optional[str]
    epochs: int
    images_per_second: Optional[float]  # all epochs
    images_per_second_steady: Optional[float]  # epochs 2+ (None with one epoch)
    gpu_mem_mib: Optional[float]  # peak allocated over the trial
    gpu_mem_reserved_mib: Optional[float]  # peak reserved over the trial
    error: Optional[str]


def trial_figures(store_url: str, job: str = JOB) -> tuple[str, list[TrialFigures]]:
    """``(job state, per-trial figures)`` from the store's rows (see the module docstring)."""
    from ablate.store import open_store

    store = open_store(store_url, create=False)
    try:
        row = store.get_job(job)
        if row is None:
            raise LookupError(f"no job {job} in the store (ablate submit stopped before it registered the job)")
        state = row.state
        out = []
        for t in store.trials_of(job):
            by_name: dict[str, dict[int, float]] = {}
            for name, _step, epoch, value in store.metrics_of(t.id):
                if name in ("images_seen", "train_seconds", "gpu_mem_mib", "gpu_mem_reserved_mib"):
                    by_name.setdefault(name, {})[epoch] = value
            seen, secs = by_name.get("images_seen", {}), by_name.get("train_seconds", {})
            epochs = sorted(set(seen) & set(secs))
            ips = steady = None
            if epochs and secs[epochs[-1]] > 0:
                ips = seen[epochs[-1]] / secs[epochs[-1]]
            if len(epochs) >= 2 and epochs[0] == 1 and secs[epochs[-1]] > secs[1]:
                steady = (seen[epochs[-1]] - seen[1]) / (secs[epochs[-1]] - secs[1])
            peak = lambda name: max(by_name[name].values()) if by_name.get(name) else None  # noqa: E731
            out.append(TrialFigures(f"{t.variant_name}/{t.seed}", t.state, t.device, epochs[-1] if epochs else 0,
                                    ips, steady, peak("gpu_mem_mib"), peak("gpu_mem_reserved_mib"), t.error))
        return state, out
    finally:
        store.close()


# ------------------------------------------------------------------------------- the report
def _fmt(v: Optional[float], digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def render(trials: list[TrialFigures], util: Optional[dict[str, Any]], gpu: Optional[dict[str, Any]],
           dry_run: bool, wall: Optional[float]) -> str:
    """The table and the utilisation line, as printed."""
    head = ("trial", "state", "device", "epochs", "img/s", "img/s ep2+", "peak alloc MiB", "peak reserved MiB")
    rows = [(t.trial, t.state, t.device or "-", str(t.epochs), _fmt(t.images_per_second),
             _fmt(t.images_per_second_steady), _fmt(t.gpu_mem_mib), _fmt(t.gpu_mem_reserved_mib)) for t in trials]

    def total(values: list[Optional[float]]) -> str:
        return "n/a" if not values or any(v is None for v in values) else f"{sum(values):.1f}"

    rows.append((f"all {len(trials)} (sum)", "", "", "", total([t.images_per_second for t in trials]),
                 total([t.images_per_second_steady for t in trials]), "", ""))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) if i < 3 else c.rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    if dry_run:
        title = f"GPU check, --cpu-dry-run: {len(trials)} trials on the CPU (gpus: 0); no GPU figures"
    elif gpu:
        title = (f"GPU check: {len(trials)} trials at 0.25 GPU each on GPU {gpu['index']} ({gpu['name']}, "
                 f"{_fmt(gpu['memory_total_mib'], 0)} MiB, driver {gpu['driver']}); AMP + channels-last on CUDA")
    else:
        title = f"GPU check: {len(trials)} trials"
    out = [title, line(head), *[line(r) for r in rows]]
    if dry_run:
        out.append("GPU busy while trials ran: n/a (--cpu-dry-run)")
    elif util is None:
        out.append("GPU busy while trials ran: n/a (no nvidia-smi sample shows the trials holding GPU memory)")
    else:
        out.append(f"GPU busy while trials ran: mean {util['mean']:.1f}%, median {util['median']:.1f}% "
                   f"({util['samples']} samples over {util['seconds']:.1f} s; whole run mean "
                   f"{util['mean_whole_run']:.1f}% over {util['samples_whole_run']}); memory.used peak "
                   f"{util['memory_used_peak_mib']:.0f} MiB (idle {util['memory_used_idle_mib']:.0f})")
    if wall is not None:
        out.append(f"ablate submit: {wall:.0f} s wall (Ray start, data generation, trials, recording)")
    return "\n".join(out)


def problems(job_state: str, trials: list[TrialFigures], util: Optional[dict[str, Any]], dry_run: bool) -> list[str]:
    """Why the check did not measure what it should (empty: it did)."""
    want = "cpu" if dry_run else "cuda"
    found = []
    if job_state != "finished":
        found.append(f"job {JOB} {job_state}")
    for t in trials:
        if t.state != "finished":
            found.append(f"trial {t.trial} {t.state}" + (f": {t.error}" if t.error else ""))
        elif t.device != want:
            found.append(f"trial {t.trial} ran on {t.device}, not {want}")
        elif t.images_per_second is None:
            found.append(f"trial {t.trial}: no images_seen / train_seconds in the store")
        elif not dry_run and t.gpu_mem_mib is None:
            found.append(f"trial {t.trial}: no gpu_mem_mib in the store")
    if not dry_run and util is None:
        found.append("no nvidia-smi sample shows the trials on the GPU (sampler output empty or memory never rose)")
    return found


def report(work: Path, smi: Optional[Path], gpu_info: Optional[str], wall: Optional[float], out: Optional[Path],
           dry_run: bool) -> int:
    work = Path(work).resolve()
    state, trials = trial_figures(f"sqlite:///{work / 'ablate.db'}")
    samples = parse_smi(smi.read_text(errors="replace")) if smi is not None and smi.exists() else []
    util = None if dry_run else busy_share(samples)
    gpu = None if dry_run or not gpu_info else parse_gpu_info(gpu_info)
    print(render(trials, util, gpu, dry_run, wall))
    found = problems(state, trials, util, dry_run)
    if out is not None:
        doc = {"mode": "cpu-dry-run" if dry_run else "gpu", "job": JOB, "job_state": state, "gpu": gpu,
               "amp": not dry_run, "channels_last": True,  # train.py: autocast + GradScaler on CUDA; channels_last always
               "wall_seconds": wall, "trials": [asdict(t) for t in trials], "utilization": util,
               "samples": len(samples), "problems": found}
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(doc, indent=2) + "\n")
    for p in found:
        print(f"gpu-check: {p}", file=sys.stderr)
    return 1 if found else 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    j = sub.add_parser("job")
    j.add_argument("base", type=Path)
    j.add_argument("work", type=Path)
    j.add_argument("--cpus", type=int, default=1)
    j.add_argument("--cpu-dry-run", action="store_true")
    r = sub.add_parser("report")
    r.add_argument("work", type=Path)
    r.add_argument("--smi", type=Path)
    r.add_argument("--gpu-info")
    r.add_argument("--wall", type=float)
    r.add_argument("--out", type=Path)
    r.add_argument("--cpu-dry-run", action="store_true")
    a = ap.parse_args(argv)
    if a.cmd == "job":
        print(write_job(a.base, a.work, a.cpus, a.cpu_dry_run))
        return 0
    try:
        return report(a.work, a.smi, a.gpu_info, a.wall, a.out, a.cpu_dry_run)
    except Exception as e:  # no store (submit failed before it wrote one), no job in it: one line
        why = str(e) if isinstance(e, LookupError) else f"{type(e).__name__}: {e}"
        print(f"gpu-check: cannot read the job's results in {a.work}: {why}".splitlines()[0], file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
