"""Orchestration overhead, measured: one trial through ``ray job submit`` on a running cluster vs
``ablate train`` of the same trial config, on the same machine, interleaved in one run.

Run it with a cluster and an MLflow server up (``eval "$(make -s cluster-up)"``)::

    .venv/bin/python infra/local/overhead.py [--epochs 6] [--repeats 1]

The trial is the quickstart job's baseline (``jobs/quickstart.yaml``, variant yolov3, seed 0) at
its own size (1,000 synthetic 160 px images, 6 epochs, one CPU thread). The synthetic set is
generated before anything is timed. Each repeat times, in alternating order:

* ``ablate train trial.yaml`` (no Ray, no MLflow, no store), wall clock of the whole command;
* ``ray job submit --working-dir ... -- ablate submit job.yaml --force`` with the store on
  PostgreSQL (a database made for the run and dropped after) and MLflow on the tracking server,
  wall clock of the whole command (it returns when the job ends).

It prints both, the difference (the overhead per trial) and the ratio, and the trial's own
training time as the store recorded it, so the overhead can be told from the training.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PG = os.environ.get("ABLATE_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432")


def _admin(sql: str) -> None:
    import psycopg

    url = PG.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql)


def _timed(cmd: list[str], cwd: Path) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"overhead.py: {' '.join(cmd[:4])} ... failed ({proc.returncode}): "
                 f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=None, help="override the quickstart's epochs (default: its 6)")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    ray_address, tracking = os.environ.get("RAY_ADDRESS"), os.environ.get("MLFLOW_TRACKING_URI")
    if not (ray_address and ray_address.startswith("http") and tracking):
        sys.exit('overhead.py: RAY_ADDRESS (http://...) and MLFLOW_TRACKING_URI must be set: eval "$(make -s cluster-up)"')

    from ablate.data.synth import generate_synthetic
    from ablate.spec import load_job_spec

    work = Path(tempfile.mkdtemp(prefix="ablate-overhead-"))
    doc = yaml.safe_load((REPO / "jobs/quickstart.yaml").read_text())
    doc["name"] = "overhead"
    doc["variants"] = {"yolov3": {}}
    doc["seeds"] = [0]
    doc["max_concurrent"] = 1
    doc["dataset"]["synthetic"]["root"] = str(REPO / doc["dataset"]["synthetic"]["root"])
    if args.epochs:
        doc["base"].setdefault("train", {})["epochs"] = args.epochs
    (work / "jobs").mkdir()
    job_path = work / "jobs" / "overhead.yaml"
    job_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    (trial,) = load_job_spec(job_path).trials()
    cfg = trial.config.model_dump(mode="json")
    (work / "trial.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    s = trial.config.data.synthetic
    print(f"synthetic set {s.root} (generated once, not timed)", file=sys.stderr)
    generate_synthetic(s.root, num_train=s.train, num_val=s.val, image_size=s.size, seed=s.seed)

    db = f"ablate_overhead_{uuid.uuid4().hex[:8]}"
    _admin(f'CREATE DATABASE "{db}"')
    store = f"{PG}/{db}"
    rows = []
    try:
        for r in range(args.repeats):
            order = ("train", "submit") if r % 2 == 0 else ("submit", "train")
            got = {}
            for mode in order:
                print(f"repeat {r + 1}/{args.repeats}: {mode} ...", file=sys.stderr)
                if mode == "train":
                    got[mode] = _timed([str(BIN / "ablate"), "train", str(work / "trial.yaml"), "--out",
                                        str(work / f"train-{r}"), "--no-resume"], work)
                else:
                    got[mode] = _timed([str(BIN / "ray"), "job", "submit", "--address", ray_address, "--working-dir",
                                        str(work / "jobs"), "--", "ablate", "submit", "overhead.yaml", "--force",
                                        "--tracking", tracking, "--store", store,
                                        "--workdir", (work / "checkpoints").as_uri()], work)
            print(f"repeat {r + 1}: {got}", file=sys.stderr)
            from ablate.store import open_store

            st = open_store(store, create=False)
            (t,) = st.trials_of("overhead")
            got["trial_wall"] = t.wall_seconds or float("nan")
            st.close()
            rows.append(got)
            print(f"repeat {r + 1}: ablate train {got['train']:.1f} s, ray job submit {got['submit']:.1f} s "
                  f"(trial's own train+eval {got['trial_wall']:.1f} s): overhead {got['submit'] - got['train']:+.1f} s, "
                  f"ratio {got['submit'] / got['train']:.3f}")
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    train = sum(r["train"] for r in rows) / len(rows)
    submit = sum(r["submit"] for r in rows) / len(rows)
    print(json.dumps({"epochs": trial.config.train.epochs, "repeats": len(rows), "ablate_train_s": round(train, 1),
                      "ray_job_submit_s": round(submit, 1), "overhead_s": round(submit - train, 1),
                      "ratio": round(submit / train, 3)}))


if __name__ == "__main__":
    main()
