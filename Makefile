# One entry point for people and CI. `make demo` and `make test` work on a fresh machine (they install
# what they need: apt redis-server, a venv with the pinned requirements, the extension).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CUDA_VENV ?= .venv-cuda
CUDA_HOME ?= /usr/local/cuda-13.0
PYTEST_ARGS ?=

.PHONY: setup system-deps build test demo cuda-build-check sanitize-check tsan-check bench-cpu clean

# redis-server for the cluster-tier tests (Debian package; needs root, skipped when already there).
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else echo "redis-server missing: install it (apt-get install redis-server) for the Redis tier tests"; fi; }

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.installed

# Incremental rebuild of hps_core._C (ninja keeps build/ between runs), then the TF plugin's HpsLookup op
# (g++ against the installed TF; cached per TF version and source hash, so a no-op when up to date).
build: setup
	$(PY) setup.py -q build_ext --inplace
	$(PY) -m interop.tf_op.build

test: system-deps build
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

demo: build
	$(PY) -m hps_core.demo

# Compile + link the CUDA variant against a CUDA build of torch (no GPU needed): CUDA code that does not
# compile cannot land. torch 2.14.1 (CUDA 13.0) comes from this machine's local wheel cache.
$(CUDA_VENV)/.installed:
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q --upgrade pip
	$(CUDA_VENV)/bin/python -m pip install -q torch==2.14.1 numpy setuptools wheel ninja
	touch $@

cuda-build-check: $(CUDA_VENV)/.installed
	rm -rf build/cuda-check
	CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST=9.0 HPS_WITH_CUDA=1 MAX_JOBS=2 \
	  $(CUDA_VENV)/bin/python setup.py -q build_ext --build-lib build/cuda-check/lib --build-temp build/cuda-check/tmp
	@ls build/cuda-check/lib/hps_core/_C*.so && cat build/cuda-check/lib/hps_core/_build_info.py

# The host map, the lookup pipeline and the engine's concurrency / reliability tests against an AddressSanitizer
# build of the extension (built beside the normal one, loaded through HPS_EXTENSION_PATH). libasan and libstdc++ are
# preloaded: Python is not instrumented, and ASan must see the real __cxa_throw before torch loads libstdc++.
SANITIZE_TESTS ?= tests/tiers/test_host_memory.py tests/engine/test_reliability.py tests/engine/test_pipeline.py \
	tests/engine/test_engine.py tests/ops/test_lookup_ops.py tests/engine/test_second_level.py \
	tests/ops/test_codec.py tests/ops/test_cache_storage.py tests/engine/test_storage.py tests/engine/test_storage_tiers.py
sanitize-check: setup
	HPS_SANITIZE=address HPS_WITH_CUDA=0 MAX_JOBS=2 $(PY) setup.py -q build_ext \
	  --build-lib build/sanitize-address/lib --build-temp build/sanitize-address/tmp
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:verify_asan_link_order=0 \
	  HPS_EXTENSION_PATH=$$(ls $(CURDIR)/build/sanitize-address/lib/hps_core/_C*.so) \
	  $(PY) -m pytest -q -p no:cacheprovider $(SANITIZE_TESTS)

# The same concurrency tests against a ThreadSanitizer build (data races and lock-order inversions in our C++; Python,
# libtorch and libgomp are not instrumented, so TSan checks our code and the pthread/malloc calls it intercepts).
# OMP_NUM_THREADS=1: an uninstrumented OpenMP barrier hides the ordering TSan needs, so intra-op parallel_for runs
# inline and the races checked are those between Python threads calling into the extension. Reports go to
# build/sanitize-thread/reports and fail the target: under pytest's capture a passing test's report would be lost,
# leaving only TSan's exit code 66. tests/tsan.supp holds the third-party false positives (each one explained). If
# TSan ever dies with "unexpected memory mapping" (high ASLR entropy), run pytest under `setarch "$(uname -m)" -R`.
TSAN_TESTS ?= tests/engine/test_reliability.py tests/tiers/test_host_memory.py tests/engine/test_pipeline.py \
	tests/engine/test_engine.py tests/engine/test_second_level.py
TSAN_REPORTS := build/sanitize-thread/reports
tsan-check: setup
	HPS_SANITIZE=thread HPS_WITH_CUDA=0 MAX_JOBS=2 $(PY) setup.py -q build_ext \
	  --build-lib build/sanitize-thread/lib --build-temp build/sanitize-thread/tmp
	rm -rf $(TSAN_REPORTS) && mkdir -p $(TSAN_REPORTS)
	LD_PRELOAD="$$(gcc -print-file-name=libtsan.so) $$(gcc -print-file-name=libstdc++.so)" OMP_NUM_THREADS=1 \
	  TSAN_OPTIONS=suppressions=$(CURDIR)/tests/tsan.supp:log_path=$(CURDIR)/$(TSAN_REPORTS)/tsan \
	  HPS_EXTENSION_PATH=$$(ls $(CURDIR)/build/sanitize-thread/lib/hps_core/_C*.so) \
	  $(PY) -m pytest -q -p no:cacheprovider $(TSAN_TESTS); rc=$$?; \
	if ls $(TSAN_REPORTS)/tsan.* >/dev/null 2>&1; then \
	  cat $(TSAN_REPORTS)/tsan.*; echo "[tsan] ThreadSanitizer reports above ($(TSAN_REPORTS))"; exit 1; fi; \
	exit $$rc

# The benchmark suite at CPU size, recorded into benchmarks/results/suite_cpu/<bench>/ (a few minutes on 2 cores;
# index: benchmarks/results/README.md).
bench-cpu: build
	for b in lookup_cpu hit_rate tiers dlrm_cpu; do \
	  $(PY) -m benchmarks.run bench=$$b out_dir=benchmarks/results/suite_cpu/$${b%_cpu} || exit 1; done

clean:
	rm -rf build hps_core/_C*.so hps_core/_build_info.py
