#!/usr/bin/env bash
# GPU check: 4 real ablate trials at `gpus: 0.25` on one NVIDIA GPU through Ray, and what they got.
#
#   infra/gpu-check.sh [--out FILE.json] [--gpu N] [--dir DIR] [--cpu-dry-run]
#
# Submits infra/gpu-check.yaml (the quickstart's detector, 2 loss recipes x 2 seeds, 320 px,
# 10 epochs, AMP and channels-last as train.py does on CUDA) to a private local Ray (never the
# user's cluster: --address local, RAY_ADDRESS unset), with its data, store, MLflow and Tune
# folders in a temporary folder (removed at the end; --dir keeps them in DIR), while
# `nvidia-smi -lms 500` samples the GPU in its own process group (stopped by its PID). Then prints, per trial, img/s
# (all epochs and epochs 2+, from the store's images_seen / train_seconds), its peak GPU memory
# (the store's gpu_mem_mib / gpu_mem_reserved_mib) and the GPU's busy share while the trials held
# it (mean / median utilization.gpu); --out writes the same as JSON. infra/gpu_check.py says
# where each figure comes from.
#
# --cpu-dry-run: the same pipeline on the CPU (gpus: 0, 2 tiny trials, 2 epochs, GPU columns n/a),
#                for a machine without a GPU (tests/test_gpu_check.py runs it).
# --gpu N:       the GPU to use (nvidia-smi index, default 0; the only one Ray is shown).
#
# Python: $ABLATE_PYTHON, else .venv/bin/python, else python3 (ablate and its dependencies
# importable). Exit status: 0 measured; 1 the job or the measurement failed (figures printed all
# the same); 2 bad usage or no usable Python; 3 no NVIDIA GPU here (nothing is measured, no
# figures are made up).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

out="" gpu=0 dir="" dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="${2:?--out needs a file}"; shift 2 ;;
    --gpu) gpu="${2:?--gpu needs an index}"; shift 2 ;;
    --dir) dir="${2:?--dir needs a folder}"; shift 2 ;;
    --cpu-dry-run) dry=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$gpu" in *[!0-9]*|"") echo "gpu-check: --gpu $gpu: not a GPU index" >&2; exit 2 ;; esac
# --out and --dir are relative to where the script was called from, not to the repo
case "$out" in ""|/*) ;; *) out="$PWD/$out" ;; esac
case "$dir" in ""|/*) ;; *) dir="$PWD/$dir" ;; esac

repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
py="${ABLATE_PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
# the repo on the path too: the check also runs where ablate's dependencies are installed but
# ablate itself is not (Ray's workers inherit this environment)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

gpu_info=""
if [ "$dry" = 0 ]; then
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    echo "no NVIDIA GPU here (nvidia-smi not found / lists no GPU): nothing measured" >&2
    exit 3
  fi
  gpu_info="$(nvidia-smi -i "$gpu" --query-gpu=index,name,memory.total,driver_version \
              --format=csv,noheader,nounits 2>/dev/null | head -n 1)" || true
  if [ -z "$gpu_info" ]; then
    echo "gpu-check: --gpu $gpu: nvidia-smi knows no such GPU ($(nvidia-smi -L | wc -l) listed)" >&2
    exit 2
  fi
fi
if ! why="$("$py" -c 'import ablate.cli, ray, mlflow, torch' 2>&1)"; then
  echo "gpu-check: $py cannot import ablate, ray, mlflow and torch ($(printf '%s\n' "$why" | tail -n 1)):" \
       "run \`make install\` (or set ABLATE_PYTHON)" >&2
  exit 2
fi

if [ -n "$dir" ]; then
  mkdir -p "$dir"; work="$(cd "$dir" && pwd)"; keep=1
  if [ -e "$work/ablate.db" ]; then echo "gpu-check: --dir $dir already holds a check (ablate.db): give an empty folder" >&2; exit 2; fi
else
  work="$(mktemp -d "${TMPDIR:-/tmp}/ablate-gpu-check.XXXXXX")"; keep=0
fi
smi_pid=""
stop_sampler() {
  if [ -n "$smi_pid" ]; then  # the sampler's own process group (setsid: it leads it), by its PID
    kill -TERM -- "-$smi_pid" 2>/dev/null || kill -TERM "$smi_pid" 2>/dev/null || true
    wait "$smi_pid" 2>/dev/null || true
    smi_pid=""
  fi
}
QUERY=(--query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits)
start_sampler() {
  # nvidia-smi's own loop, line-buffered; where its lines stay in a buffer (no stdbuf, or stdbuf
  # has no effect on it) nothing would reach the file before it is killed, so after 2 s without a
  # line it is replaced by one query every 0.5 s (each nvidia-smi exits, so its line is written)
  if command -v stdbuf >/dev/null 2>&1; then
    setsid stdbuf -oL nvidia-smi -i "$gpu" "${QUERY[@]}" -lms 500 >"$work/smi.csv" 2>"$work/smi.err" </dev/null &
    smi_pid=$!
    sleep 2
    if [ -s "$work/smi.csv" ]; then return; fi
    stop_sampler
  fi
  setsid bash -c 'while :; do nvidia-smi -i "$0" "${@}"; sleep 0.5; done' "$gpu" "${QUERY[@]}" \
    >"$work/smi.csv" 2>"$work/smi.err" </dev/null &
  smi_pid=$!
  sleep 2
}
cleanup() {
  stop_sampler
  if [ "$keep" = 0 ]; then rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ncpu="$(nproc 2>/dev/null || echo 1)"
if [ "$dry" = 1 ]; then cpus=1; else cpus=$(( ncpu / 4 )); [ "$cpus" -ge 1 ] || cpus=1; [ "$cpus" -le 4 ] || cpus=4; fi
dry_flag=(); [ "$dry" = 1 ] && dry_flag=(--cpu-dry-run)
job="$("$py" infra/gpu_check.py job infra/gpu-check.yaml "$work" --cpus "$cpus" "${dry_flag[@]}")"

unset RAY_ADDRESS  # a private local Ray: never a cluster the user or anyone else started here
if [ "$dry" = 0 ]; then
  # Ray sees only this GPU, numbered as nvidia-smi numbers it; the sampler watches the same one
  export CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES="$gpu"
  start_sampler  # its first samples, before Ray starts, give the idle memory level
fi

echo "gpu-check: submitting $(basename "$job") (work folder $work, $cpus CPU per trial); log: $work/submit.log" >&2
start=$(date +%s.%N)
rc=0
"$py" -c 'from ablate.cli import app; app(prog_name="ablate")' submit "$job" --address local \
  --workdir "$work/runs" >"$work/submit.log" 2>&1 || rc=$?
wall=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
if [ -n "$smi_pid" ]; then sleep 1; stop_sampler; fi
if [ "$rc" != 0 ]; then
  echo "gpu-check: ablate submit exited $rc after ${wall} s; its last lines:" >&2
  tail -n 15 "$work/submit.log" >&2
fi

report=("$py" infra/gpu_check.py report "$work" --wall "$wall" "${dry_flag[@]}")
[ -n "$out" ] && report+=(--out "$out")
[ "$dry" = 0 ] && report+=(--smi "$work/smi.csv" --gpu-info "$gpu_info")
rrc=0
"${report[@]}" || rrc=$?
[ "$keep" = 1 ] && echo "gpu-check: kept $work" >&2
if [ "$rc" != 0 ] || [ "$rrc" != 0 ]; then exit 1; fi
