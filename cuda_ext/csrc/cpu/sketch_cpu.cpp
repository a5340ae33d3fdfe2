// CPU twin of sketch_add (hps_ops.cpp contract): atomic adds, so the counts are the same in any interleaving and
// equal the CUDA twin's.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>

#include "cpu/cache_cpu_common.h"
#include "sketch.h"

namespace hps {
namespace {

// +1 on the kSketchDepth counters of key i for every i in [0, n) that `counted(i)` accepts, in parallel.
template <typename key_t, typename Pred>
void add_keys(int32_t* sketch, int64_t width, const key_t* keys, int64_t n, Pred counted) {
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (!counted(i)) continue;
      const uint64_t h = mix64(key_bits(static_cast<int64_t>(keys[i])));
      for (int64_t d = 0; d < kSketchDepth; ++d) {
        __atomic_fetch_add(sketch + d * width + sketch_index(h, d, width), 1, __ATOMIC_RELAXED);
      }
    }
  });
}

void sketch_add_cpu(at::Tensor& sketch, const at::Tensor& keys, const std::optional<at::Tensor>& skip) {
  HPS_CHECK_CPU(sketch);
  check_sketch_add(sketch, keys, skip);
  const bool* sp = skip ? skip->data_ptr<bool>() : nullptr;
  AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "sketch_add_cpu", [&] {
    add_keys(sketch.data_ptr<int32_t>(), sketch.size(0) / kSketchDepth, keys.data_ptr<index_t>(), keys.size(0),
             [&](int64_t i) { return sp == nullptr || !sp[i]; });
  });
}

}  // namespace

namespace cpu {
void sketch_add_keys(int32_t* sketch, int64_t width, const int64_t* keys, int64_t n) {
  add_keys(sketch, width, keys, n, [](int64_t) { return true; });
}
}  // namespace cpu

TORCH_LIBRARY_IMPL(hps, CPU, m) { m.impl("sketch_add", &sketch_add_cpu); }

}  // namespace hps
