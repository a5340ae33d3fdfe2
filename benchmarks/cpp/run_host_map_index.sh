#!/usr/bin/env bash
# Build and run the host map index benchmark (issue 19 item 5): cuda_ext/csrc/cpu/host_map_index.h against
# absl::flat_hash_map. Needs g++ and Abseil (apt-get install -y libabsl-dev). Single-threaded.
# usage: benchmarks/cpp/run_host_map_index.sh [runs_1m] [runs_16m] [sizes...]   (defaults: 7 5 1048576 16777216)
# Output: the markdown tables on stdout (per-run lines start with '#'); binary in build/bench_cpp/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="$root/build/bench_cpp"
mkdir -p "$out"
if ! pkg-config --exists absl_flat_hash_map; then
  echo "Abseil not found: apt-get install -y libabsl-dev" >&2
  exit 1
fi
g++ -O3 -march=native -std=c++17 -DNDEBUG -Wall -Wextra \
  -I "$root/cuda_ext/csrc" \
  "$root/benchmarks/cpp/host_map_index_bench.cpp" -o "$out/host_map_index_bench" \
  $(pkg-config --cflags --libs absl_flat_hash_map absl_hash)
echo "# $(g++ --version | head -1); abseil $(pkg-config --modversion absl_flat_hash_map);" \
  "commit $(git -C "$root" rev-parse --short HEAD); $(date -u +%Y-%m-%dT%H:%MZ)"
echo "# cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cpus; THP $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null)"
exec "$out/host_map_index_bench" "$@"
