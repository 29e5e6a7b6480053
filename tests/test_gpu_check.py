"""infra/gpu-check.sh: the no-GPU refusal, its nvidia-smi parsing, the Ray trial's device decision
(runner.trial_device) and, on the CPU, the whole pipeline (--cpu-dry-run: a real job on a private
local Ray, figures read back from its store)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ablate.runner import JobError, trial_device

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "infra" / "gpu-check.sh"
NO_GPU = "no NVIDIA GPU here (nvidia-smi not found / lists no GPU): nothing measured"


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "infra" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


gc = _load_gpu_check()

# recorded from `nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits
# -lms 500`: idle, a trial process's CUDA context appears (memory.used 0 -> 519), training, the last
# trial exits; one [N/A] utilisation and a line cut off when the sampler was stopped
SMI = """\
2025/11/20 10:00:00.000, 0, 0
2025/11/20 10:00:00.500, 0, 0
2025/11/20 10:00:01.000, 0, 519
2025/11/20 10:00:01.500, 35, 2100
2025/11/20 10:00:02.000, [N/A], 4200
2025/11/20 10:00:02.500, 80, 4200
2025/11/20 10:00:03.000, 60, 4300
2025/11/20 10:00:03.500, 0, 519
2025/11/20 10:00:04.000, 0, 0
2025/11/20 10:00:04.500, 0, 0
2025/11/20 10:00:05.0
"""


# ------------------------------------------------------------------------------ fast: parsing
def test_parse_smi_recorded_lines():
    samples = gc.parse_smi(SMI)
    assert len(samples) == 10  # the cut-off last line is dropped
    assert samples[0] == gc.Sample(samples[0].t, 0.0, 0.0)
    assert samples[4].util is None and samples[4].mem == 4200.0  # [N/A]
    assert samples[3].t - samples[0].t == pytest.approx(1.5)
    # a header (without noheader), an error message and "[Not Supported]" in both fields are skipped
    assert gc.parse_smi("timestamp, utilization.gpu [%], memory.used [MiB]\n"
                        "Failed to initialize NVML: Unknown Error\n"
                        "2025/11/20 10:00:00.000, [Not Supported], [Not Supported]\n") == []


def test_busy_share_over_the_window_the_trials_held_the_gpu():
    util = gc.busy_share(gc.parse_smi(SMI))
    # window: 10:00:01.0 .. 10:00:03.5 (memory above idle 0 + 256 MiB); utilisation samples in it:
    # 0, 35, 80, 60, 0 ([N/A] left out)
    assert util["samples"] == 5
    assert util["mean"] == pytest.approx(35.0)
    assert util["median"] == pytest.approx(35.0)
    assert util["seconds"] == pytest.approx(3.0)
    assert util["memory_used_peak_mib"] == 4300.0 and util["memory_used_idle_mib"] == 0.0
    assert util["samples_whole_run"] == 9 and util["mean_whole_run"] == pytest.approx(175 / 9)


def test_busy_share_none_when_the_trials_never_show():
    idle = "2025/11/20 10:00:00.000, 0, 300\n2025/11/20 10:00:00.500, 3, 400\n"
    assert gc.busy_share(gc.parse_smi(idle)) is None  # 100 MiB over idle: no trial process held it
    assert gc.busy_share([]) is None


def test_gpu_info_and_problems():
    info = gc.parse_gpu_info("0, NVIDIA H200, 143771, 580.159.03")
    assert info == {"index": "0", "name": "NVIDIA H200", "memory_total_mib": 143771.0, "driver": "580.159.03"}
    t = gc.TrialFigures("yolov3/0", "finished", "cpu", 8, 500.0, 600.0, None, None, None)
    found = gc.problems("finished", [t], None, dry_run=False)
    assert "trial yolov3/0 ran on cpu, not cuda" in found
    assert any("no nvidia-smi sample" in p for p in found)
    assert gc.problems("finished", [t], None, dry_run=True) == []


# ------------------------------------------------------------------------------ fast: device decision
@pytest.mark.parametrize("config_device", ["auto", "cuda"])
def test_trial_with_a_gpu_share_runs_on_cuda(config_device):
    assert trial_device(config_device, [0], cuda_available=True) == "cuda"
    assert trial_device(config_device, ["1"], cuda_available=True) == "cuda"


@pytest.mark.parametrize("config_device", ["auto", "cpu"])
def test_trial_without_a_gpu_runs_on_cpu_even_where_cuda_is_there(config_device):
    # Ray 2.6x does not hide the GPUs from a 0-GPU task: torch still sees them
    assert trial_device(config_device, [], cuda_available=True) == "cpu"
    assert trial_device(config_device, [], cuda_available=False) == "cpu"


@pytest.mark.parametrize("args, words", [
    (("cpu", [0], True), "device: cpu, but Ray gave this trial GPU 0"),
    (("auto", [0], False), "torch in the worker sees no CUDA device"),
    (("cuda", [0], False), "torch in the worker sees no CUDA device"),
    (("cuda", [], True), "device: cuda, but Ray gave this trial no GPU"),
])
def test_contradictions_fail_in_one_line(args, words):
    with pytest.raises(JobError) as e:
        trial_device(*args)
    assert words in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------ fast: no GPU, no figures
def _bin_without_nvidia_smi(tmp_path: Path) -> Path:
    """A PATH folder with only what the script needs before its GPU check (dirname)."""
    b = tmp_path / "bin"
    b.mkdir()
    (b / "dirname").symlink_to(shutil.which("dirname"))
    return b


def test_no_nvidia_smi_exits_3_with_one_line(tmp_path):
    b = _bin_without_nvidia_smi(tmp_path)
    out = tmp_path / "out.json"
    r = subprocess.run(["/bin/bash", str(SCRIPT), "--out", str(out)], env={**os.environ, "PATH": str(b)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    assert r.stderr.strip() == NO_GPU and r.stdout == ""
    assert not out.exists()  # nothing measured, nothing written


def test_nvidia_smi_listing_no_gpu_exits_3(tmp_path):
    b = _bin_without_nvidia_smi(tmp_path)
    stub = b / "nvidia-smi"  # what it prints on a machine whose driver sees no GPU
    stub.write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    stub.chmod(0o755)
    r = subprocess.run(["/bin/bash", str(SCRIPT)], env={**os.environ, "PATH": f"{b}:/usr/bin:/bin"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and r.stderr.strip() == NO_GPU


# ------------------------------------------------------------------------------ slow: the dry run
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cpu_dry_run_prints_the_store_figures(tmp_path):
    from ablate.store import open_store

    work, out = tmp_path / "work", tmp_path / "out.json"
    env = {**os.environ, "ABLATE_PYTHON": sys.executable}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run(["/bin/bash", str(SCRIPT), "--cpu-dry-run", "--dir", str(work), "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, r.stdout + r.stderr + (work / "submit.log").read_text()

    lines = r.stdout.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("trial "))
    rows = {}
    for ln in lines[header + 1:]:
        if ln.startswith("all "):
            break
        cols = ln.split()
        rows[cols[0]] = cols
    assert "GPU busy while trials ran: n/a (--cpu-dry-run)" in r.stdout

    store = open_store(f"sqlite:///{work / 'ablate.db'}", create=False)
    try:
        trials = store.trials_of("gpu_check")
        assert sorted(rows) == sorted(f"{t.variant_name}/{t.seed}" for t in trials) and len(rows) == 2
        for t in trials:
            trial, state, device, epochs, ips, steady, alloc, reserved = rows[f"{t.variant_name}/{t.seed}"]
            assert (state, device, epochs) == ("finished", "cpu", "2") and t.device == "cpu"
            seen = {ep: v for _, _, ep, v in store.metrics_of(t.id, "images_seen")}
            secs = {ep: v for _, _, ep, v in store.metrics_of(t.id, "train_seconds")}
            assert seen[2] == 16 * 2  # 16 images, 2 epochs
            want = seen[2] / secs[2]
            assert float(ips) > 0 and float(ips) == pytest.approx(want, abs=0.051)  # printed with 1 decimal
            assert want == pytest.approx(t.result["images_per_second"])  # the trial's own final figure
            assert float(steady) == pytest.approx((seen[2] - seen[1]) / (secs[2] - secs[1]), abs=0.051)
            assert (alloc, reserved) == ("n/a", "n/a")
            assert store.metrics_of(t.id, "gpu_mem_mib") == []  # on the CPU no GPU memory is recorded
    finally:
        store.close()

    doc = json.loads(out.read_text())
    assert doc["mode"] == "cpu-dry-run" and doc["gpu"] is None and doc["utilization"] is None
    assert doc["problems"] == []
    for t in doc["trials"]:
        assert float(rows[t["trial"]][4]) == pytest.approx(t["images_per_second"], abs=0.051)
    total = re.search(r"^all 2 \(sum\)\s+([\d.]+)", r.stdout, re.M)
    assert float(total.group(1)) == pytest.approx(sum(t["images_per_second"] for t in doc["trials"]), abs=0.11)
