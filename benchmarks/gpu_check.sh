#!/usr/bin/env bash
# One run on a lent GPU machine (no internet; torch, pybind11, scikit-build-core, cmake and ninja preinstalled):
# build and install decomp with its CUDA kernels, run the op tests on CUDA (same test matrix and references as on
# the CPU, plus CPU-versus-CUDA equality for one seed), then benchmark every kernel on the GPU and write
# benchmarks/results/<gpu name>.md and .json (and copies under $OUT when the device tool provides it).
#
#     bash benchmarks/gpu_check.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
DECOMP_CUDA=ON python -m pip install --quiet --no-build-isolation --no-deps . 2>&1 | tail -20
python - <<'PY'
import json, torch, decomp
info = decomp.build_info()
print(json.dumps(info), torch.__version__, torch.cuda.get_device_name())
assert info["cuda_compiled"], "decomp was built without CUDA"
PY

# The op tests import decomp from the installed package; run them from outside the source tree's python/ dir.
HF_HUB_OFFLINE=1 python -m pytest -q -p no:cacheprovider tests/test_fisher_ops.py tests/test_sketch_ops.py

python benchmarks/kernels.py --device cuda "$@"
if [ -n "${OUT:-}" ]; then
  cp benchmarks/results/*.md benchmarks/results/*.json "$OUT"/ 2>/dev/null || true
fi
