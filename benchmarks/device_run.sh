#!/usr/bin/env bash
# One call on the GPU machine (the `device` tool): build the CUDA variant, run the CUDA tests, run the GPU
# benchmarks, leave logs and results under $OUT. Carry `.whl` (omegaconf, hydra-core, antlr4, rocksdict for
# Python 3.12 - see benchmarks/README or the issue notes) so the engine imports there.
#   usage (from the repo root on the device): bash benchmarks/device_run.sh [pytest|bench|all|suite|multi_gpu|py] [args...]
#          bash benchmarks/device_run.sh suite      the Hydra suite at GPU size: bench=lookup then bench=dlrm
#            (results.json/.md + PNGs under $OUT/suite/<bench>/; extra overrides via LOOKUP_ARGS / DLRM_ARGS,
#            default max_wall_s=300 / 240; which benches via SUITE="lookup dlrm" - one bench per call keeps each
#            call well inside 10 minutes; HPS_COMMIT=<hash> records the commit: the copy has no .git)
set -uo pipefail
what=${1:-all}
shift || true
OUT=${OUT:-$(mktemp -d -t hps_out.XXXXXX)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 HPS_WITH_CUDA=1
# NOTE: the image's default CC (a gcc wrapper script) builds an extension that segfaults when an op formats an
# error message; the system gcc does not.
export CC=/usr/bin/gcc CXX=/usr/bin/g++
if ls .whl/*.whl >/dev/null 2>&1; then
  site_dir=$(mktemp -d -t hps_site.XXXXXX)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site_dir" .whl/*.whl \
    && export PYTHONPATH=$site_dir${PYTHONPATH:+:$PYTHONPATH}
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
# `all` runs the benchmarks first (their headline numbers check exactness too) and then the CUDA tests inside what
# is left of CALL_BUDGET_S (default 570 s of the machine's 600 s limit), so a slow test run cannot cost the numbers.
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 -m benchmarks.bench_gpu --out "$OUT/gpu_results.json" "$@" 2>&1 | tee "$OUT/bench.log" | cut -c1-400
  echo "[device] bench done after $(( $(date +%s) - start )) s"
fi
if [ "$what" = pytest ] || [ "$what" = all ]; then
  left=$(( ${CALL_BUDGET_S:-570} - ($(date +%s) - start) ))
  timeout "$left" python3 -m pytest -m cuda -q -p no:cacheprovider --maxfail=${PYTEST_MAXFAIL:-25} \
    ${PYTEST_PATHS:-tests/ops tests/engine tests/benchmarks} --timeout ${PYTEST_TIMEOUT:-300} 2>&1 | tee "$OUT/pytest_cuda.log" | tail -40
  echo "[device] pytest rc=${PIPESTATUS[0]} done after $(( $(date +%s) - start )) s"
fi
if [ "$what" = py ]; then  # any module after the build, e.g. py benchmarks.profile_host_path --out "$OUT/x.json"
  python3 -m "$@" 2>&1 | tee "$OUT/py_$1.log" | cut -c1-400
  echo "[device] py $1 rc=${PIPESTATUS[0]} after $(( $(date +%s) - start )) s"
fi
if [ "$what" = suite ]; then
  export HPS_BENCH_TMP=${HPS_BENCH_TMP:-/tmp}
  for b in ${SUITE:-lookup dlrm}; do
    # max_wall_s: stop starting new cases in time to write the results inside the machine's 10-minute limit
    case $b in lookup) extra=${LOOKUP_ARGS:-max_wall_s=300};; dlrm) extra=${DLRM_ARGS:-max_wall_s=240};;
      *) extra=;; esac
    # shellcheck disable=SC2086  # the overrides are words on purpose
    python3 -m benchmarks.run bench=$b device=cuda out_dir="$OUT/suite/$b" "hydra.run.dir=$OUT/suite/$b/hydra" \
      $extra 2>&1 | tee "$OUT/suite_$b.log" | grep -v '^\[.*INFO\]' | cut -c1-300
    echo "[device] suite $b rc=${PIPESTATUS[0]} after $(( $(date +%s) - start )) s"
  done
fi
if [ "$what" = multi_gpu ]; then
  # issue 8: the multi-device tests (cpu+cuda:0 on one GPU, cuda:0+cuda:1 on two) and the scaling benchmark;
  # pass --gpus 0 (one GPU) or --gpus 0,1 (the nvidia-h200-x2 kind).
  python3 -m pytest -m cuda -q -p no:cacheprovider tests/engine/test_multi_device.py --timeout 600 2>&1 \
    | tee "$OUT/pytest_multi_device.log" | tail -15
  python3 -m benchmarks.bench_multi_gpu --out "$OUT/multi_gpu.json" "$@" 2>&1 | tee "$OUT/multi_gpu.log" | cut -c1-400
  echo "[device] multi_gpu done after $(( $(date +%s) - start )) s"
fi
