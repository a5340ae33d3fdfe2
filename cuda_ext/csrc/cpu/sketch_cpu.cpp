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

void sketch_add_cpu(at::Tensor& sketch, const at::Tensor& keys, const std::optional<at::Tensor>& skip) {
  HPS_CHECK_CPU(sketch);
  check_sketch(sketch, sketch);
  check_query_keys(keys, sketch);
  if (skip) {
    HPS_CHECK_DTYPE(*skip, at::kBool);
    HPS_CHECK_CONTIGUOUS(*skip);
    HPS_CHECK_SAME_DEVICE(*skip, keys);
    TORCH_CHECK_VALUE(skip->dim() == 1 && skip->size(0) == keys.size(0), "skip must have shape (", keys.size(0),
                      ",), found ", skip->sizes());
  }
  const int64_t n = keys.size(0);
  const int64_t width = sketch.size(0) / kSketchDepth;
  int32_t* sk = sketch.data_ptr<int32_t>();
  const bool* sp = skip ? skip->data_ptr<bool>() : nullptr;
  AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "sketch_add_cpu", [&] {
    const index_t* kp = keys.data_ptr<index_t>();
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (sp != nullptr && sp[i]) continue;
        const uint64_t h = mix64(key_bits(static_cast<int64_t>(kp[i])));
        for (int64_t d = 0; d < kSketchDepth; ++d) {
          __atomic_fetch_add(sk + d * width + sketch_index(h, d, width), 1, __ATOMIC_RELAXED);
        }
      }
    });
  });
}

}  // namespace

namespace cpu {
void sketch_add_keys(int32_t* sketch, int64_t width, const int64_t* keys, int64_t n) {
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint64_t h = mix64(key_bits(keys[i]));
      for (int64_t d = 0; d < kSketchDepth; ++d) {
        __atomic_fetch_add(sketch + d * width + sketch_index(h, d, width), 1, __ATOMIC_RELAXED);
      }
    }
  });
}
}  // namespace cpu

TORCH_LIBRARY_IMPL(hps, CPU, m) { m.impl("sketch_add", &sketch_add_cpu); }

}  // namespace hps
