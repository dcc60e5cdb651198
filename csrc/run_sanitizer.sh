#!/usr/bin/env bash
# compute-sanitizer memcheck, racecheck and synccheck over csrc/sanitize_driver.py (the zr_kernels._C launchers).
# Needs a CUDA GPU and the built extension (pip install -e .). Usage: csrc/run_sanitizer.sh [tool ...]
set -euo pipefail
cd "$(dirname "$0")/.."
sanitizer=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
# Only our kernels are instrumented (PyTorch's own kernels are not this repo's to check).
kernels='kns=forward_kernel|grad_logits_kernel|grad_hidden_kernel|weight_partials_kernel|grad_bias_kernel'
tools=("${@:-memcheck racecheck synccheck}")
for tool in ${tools[@]}; do
  echo "== compute-sanitizer --tool $tool"
  "$sanitizer" --tool "$tool" --error-exitcode 1 --kernel-regex "$kernels" python csrc/sanitize_driver.py
done
echo "== all sanitizer runs clean"
