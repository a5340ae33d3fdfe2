// CUDA twin of sketch_add (hps_ops.cpp contract): a thread per key, atomic adds - the counts equal the CPU twin's.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "cuda/cache_cuda_common.cuh"
#include "sketch.h"

namespace hps {
namespace cuda {
namespace {

// keys[i] for i < n (and < *count when count is given) whose skip entry is false.
template <typename key_t>
__global__ void __launch_bounds__(kThreads) sketch_add_kernel(int32_t* __restrict__ sketch, int64_t width,
                                                              const key_t* __restrict__ keys,
                                                              const bool* __restrict__ skip, int64_t n,
                                                              const int64_t* __restrict__ count) {
  if (count != nullptr && *count < n) n = *count;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    if (skip != nullptr && skip[i]) continue;
    const uint64_t h = mix64(key_bits(static_cast<int64_t>(keys[i])));
    for (int64_t d = 0; d < kSketchDepth; ++d) atomicAdd(sketch + d * width + sketch_index(h, d, width), 1);
  }
}

void sketch_add_cuda(at::Tensor& sketch, const at::Tensor& keys, const std::optional<at::Tensor>& skip) {
  HPS_CHECK_CUDA(sketch);
  check_sketch_add(sketch, keys, skip);
  const int64_t n = keys.size(0);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(sketch.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool* sp = skip ? skip->data_ptr<bool>() : nullptr;
  AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "sketch_add_cuda", [&] {
    sketch_add_kernel<index_t><<<thread_grid(n), kThreads, 0, stream>>>(
        sketch.data_ptr<int32_t>(), sketch.size(0) / kSketchDepth, keys.data_ptr<index_t>(), sp, n, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

void launch_sketch_add(int32_t* sketch, int64_t width, const int64_t* keys, int64_t n, const int64_t* count,
                       cudaStream_t stream) {
  if (n == 0) return;
  sketch_add_kernel<int64_t><<<thread_grid(n), kThreads, 0, stream>>>(sketch, width, keys, nullptr, n, count);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(hps, CUDA, m) { m.impl("sketch_add", &sketch_add_cuda); }

}  // namespace cuda
}  // namespace hps
