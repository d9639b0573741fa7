#!/usr/bin/env bash
# The GPU check (issue 16 item 6): on one CUDA GPU, in under 8 minutes,
#   1. the GPU and the library versions             -> environment.json
#   2. the tests marked `cuda` (pytest -m cuda)      -> cuda_tests.log
#   3. the throughput benchmark on CUDA: a random ~0.94B-parameter Llama (bf16) at N = 1, 64, 256, plus
#      SmolLM2-135M when its wheel is installed, peak GPU memory per N  -> throughput.{json,md}
#   4. a short MaskablePPO training on TokenAccept-v0 on CUDA (env-steps/s)  -> ppo.json
#   5. one summary                                   -> gpu_check.{json,md}, and the whole log gpu_check.log
# into benchmarks/results/gpu/ or --out DIR: 8 flat files (the most the device tool brings back).
# Step timeouts (120 + 240 + 90 s) keep a hung step from eating the device budget.
# --dry-run: the same steps on CPU at toy sizes (llama-tiny, N = 1, 4, 128 PPO steps) into a temp dir,
# in well under a minute; CI runs it (tests/test_gpu_check.py) so that the script does not rot.
# --wheels DIR: install the wheels in DIR first (a bare GPU machine lacks gymnasium, SB3, sb3-contrib).
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--wheels DIR]
#   bash benchmarks/gpu_check.sh --dry-run [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

usage() { echo "usage: bash benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--wheels DIR]" >&2; exit 2; }
dry_run=0 out="" wheels=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --out) [ $# -ge 2 ] || usage; out=$2; shift 2 ;;
    --wheels) [ $# -ge 2 ] || usage; wheels=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1'" >&2; usage ;;
  esac
done

python=${PYTHON:-python3}
command -v "$python" > /dev/null || python=python
# Nothing may wait on a network (the GPU machine has none; a hub lookup would hang until its timeout).
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled HF_HUB_DISABLE_TELEMETRY=1
export PYTHONUNBUFFERED=1 PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # GPU_NOTES §4

if [ -n "$wheels" ]; then
  site=$(mktemp -d)
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$PYTHONPATH:$site"
fi

if [ "$dry_run" = 1 ]; then
  out=${out:-$(mktemp -d -t gpu_check_dry.XXXXXX)}
  device=cpu shape=llama-tiny num_envs="1 4" quick=--quick ppo_args="--num-envs 2 --steps 128 --n-steps 32"
  smollm2=0
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  out=${out:-benchmarks/results/gpu}
  device=cuda shape=llama-1b num_envs="1 64 256" quick="" ppo_args="--num-envs 16 --steps 4096 --n-steps 64"
  smollm2=$("$python" -c 'from benchmarks.throughput import smollm2_available as a; print(int(a()))' 2>/dev/null || echo 0)
fi
mkdir -p "$out"
# One log beside the results (the device tool returns files, not the terminal, when a step times out).
exec > >(tee "$out/gpu_check.log") 2>&1

# Fail in seconds, naming the fix, rather than minutes in.
"$python" - "$device" <<'PY'
import importlib.util, sys
missing = [m for m in ("torch", "transformers", "gymnasium", "stable_baselines3", "sb3_contrib", "pytest")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check.sh: missing Python packages {missing}; install them (pip install -e '.[dev]') or pass "
             "--wheels DIR with their wheels (see /work/.library/device/README.md on carrying wheels).")
if sys.argv[1] == "cuda" and not __import__("torch").cuda.is_available():  # torch's import only where needed
    sys.exit("gpu_check.sh: torch sees no CUDA device here; run it on a GPU machine, or pass --dry-run on CPU.")
PY

echo "== 1/4 environment ($([ "$dry_run" = 1 ] && echo dry run, CPU || echo CUDA)) -> $out"
if command -v nvidia-smi > /dev/null; then timeout 20 nvidia-smi || true; fi
"$python" -m benchmarks.gpu_check environment --out "$out"

echo "== 2/4 tests marked cuda"
set +e  # a failing test is recorded and the check goes on: the benchmark numbers are still worth having
timeout 120 "$python" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/cuda_tests.log"
tests_rc=${PIPESTATUS[0]}
set -e

echo "== 3/4 throughput on $device"
models="$shape"
[ "$smollm2" = 1 ] && models="$models smollm2"
# shellcheck disable=SC2086  # the lists are meant to split into arguments
timeout 240 "$python" -m benchmarks.throughput $quick --device "$device" --models $models \
  --num-envs $num_envs --out "$out"

echo "== 4/4 MaskablePPO on $device"
# shellcheck disable=SC2086
timeout 90 "$python" -m benchmarks.gpu_check ppo --out "$out" --device "$device" --shape "$shape" $ppo_args

seconds=$(( $(date +%s) - started ))
"$python" -m benchmarks.gpu_check summary --out "$out" --seconds "$seconds" --tests-rc "$tests_rc"
echo "gpu_check.sh: done in ${seconds} s; results in $out"
exit "$tests_rc"
