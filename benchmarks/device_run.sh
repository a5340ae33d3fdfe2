#!/usr/bin/env bash
# One call on the GPU machine (the `device` tool): build the CUDA variant, run the CUDA tests, run the GPU
# benchmarks, leave logs and results under $OUT. Carry `.whl` (omegaconf, hydra-core, antlr4, rocksdict for
# Python 3.12 - see benchmarks/README or the issue notes) so the engine imports there.
#   usage (from the repo root on the device): bash benchmarks/device_run.sh [pytest|bench|all] [bench_gpu args...]
set -uo pipefail
what=${1:-all}
shift || true
OUT=${OUT:-/tmp/hps_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 HPS_WITH_CUDA=1
# NOTE: the image's default CC (the /opt/gcc wrapper) builds an extension that segfaults when an op formats an
# error message; the system gcc does not.
export CC=/usr/bin/gcc CXX=/usr/bin/g++
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  git rev-parse --short HEAD 2>/dev/null || true
} 2>&1 | tee "$OUT/env.txt"
start=$(date +%s)
python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1
rc=$?
echo "[device] build rc=$rc after $(( $(date +%s) - start )) s" | tee -a "$OUT/env.txt"
if [ $rc -ne 0 ]; then tail -60 "$OUT/build.log"; exit $rc; fi
python3 -c "import hps_core; print(hps_core.build_info())" | tee -a "$OUT/env.txt"
if [ "$what" = pytest ] || [ "$what" = all ]; then
  python3 -m pytest -m cuda -q -p no:cacheprovider tests/ops tests/engine --timeout 600 2>&1 | tee "$OUT/pytest_cuda.log" | tail -40
  echo "[device] pytest done after $(( $(date +%s) - start )) s"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 -m benchmarks.bench_gpu --out "$OUT/gpu_results.json" "$@" 2>&1 | tee "$OUT/bench.log" | cut -c1-400
  echo "[device] bench done after $(( $(date +%s) - start )) s"
fi
