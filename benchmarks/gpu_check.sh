#!/usr/bin/env bash
# Every GPU check of the project as one prepared command, for a GPU machine with little time to spare (a bare
# machine, a few minutes, no network). Usage, from the repo root:
#
#   bash benchmarks/gpu_check.sh OUT_DIR [check] [tests] [bench] [scoring]     (default: all four)
#
#   check    python -m zr_kernels.check: every op against its PyTorch twin, real sizes, bad ids (the users' check)
#   tests    the suite natively (no interpreter), compute-sanitizer
#   bench    python -m benchmarks (every op, the overhead bench) into OUT_DIR/results
#   scoring  student scoring ours vs naive at 128 and 512 px, the ReFL step, the demo on cuda
#
# Wheels the GPU image lacks (liger-kernel, diffusers, fla-core; benchmarks/README.md says which and how to fetch
# them) are installed from .whl/ when it exists. Every step writes OUT_DIR/<step>.log and its exit status to
# OUT_DIR/status; a failed step does not stop the next. The limits keep each group, with the build, under 10
# minutes. OUT_DIR/results/<device>.md is the table for the README.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [check] [tests] [bench] [scoring]}
shift
phases=("${@:-check tests bench scoring}")
mkdir -p "$out/results"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log it, record the exit status
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$out/status"
}

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; git rev-parse HEAD 2>/dev/null
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } >"$out/env.log" 2>&1
ZR_KERNELS_CUDA=1 step build 120 python3 -m pip install --no-build-isolation --no-deps --no-index -e .

for phase in ${phases[@]}; do
  case $phase in
    check)
      step check 240 python3 -m zr_kernels.check ;;
    tests)
      workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
      step tests 300 python3 -m pytest -q -rs $workers tests
      step sanitizer 150 bash csrc/run_sanitizer.sh ;;
    bench)
      step bench_overhead 90 python3 -m benchmarks --ops overhead --out "$out/results"
      step bench_ops 360 python3 -m benchmarks --ops score_distribution pairwise_gap group_advantages slice_kl \
        linear_score student_scoring --out "$out/results" ;;
    scoring)
      for size in 128 512; do
        step "student_scoring_${size}px" 80 python3 -m benchmarks.bench_student_scoring --shape 9b --batch 8 \
          --size "$size" --reps 3
      done
      step refl 120 python3 -m benchmarks.bench_refl --out "$out/results"
      step demo 180 python3 -m zreward.cli demo --device cuda --output-dir "$out/demo" ;;
    *) echo "unknown step group: $phase (check, tests, bench, scoring)" >&2; exit 2 ;;
  esac
done
cat "$out/status"
