// CUDA twins of the lookup-pipeline ops: compact_misses, scatter_rows, bag_reduce (hps_ops.cpp contract; results
// identical to cpu/pipeline_cpu.cpp, bit for bit). None of them synchronises with the host: data-dependent sizes
// stay on the device (the counts tensor) and every kernel reads them from there.
//
// compact_misses (5 launches + a sort):
//   1. inclusive scan of the miss flags (at::cumsum) -> each miss's output position;
//   2. one thread per key scatters the miss positions (in order) and the miss keys (widened to int64) into a
//      capacity-n buffer pre-filled with INT64_MAX, and writes counts[0];
//   3. a STABLE sort of that buffer (at::sort): the misses come first, ascending, because every fill entry sits at
//      an index past every miss and INT64_MAX is the largest key (a missed INT64_MAX key still sorts before them);
//   4. one thread per sorted position flags the first of each run of equal keys; a scan of the flags numbers the
//      unique keys; one thread per sorted position writes its unique key (run heads) and the inverse index of its
//      miss (through the sort permutation), thread 0 writes counts[1].
//   The sort covers the whole capacity n, not only the misses: its size must not depend on device data.
// scatter_rows: one warp per miss (up to counts[0], read on the device), 16-byte row copies when aligned. Indices
//   outside out/rows are skipped (the CPU twin raises; checking here would need a host sync).
// bag_reduce: one warp per bag; each lane owns 4 columns (16-byte loads) or 1 column and walks the bag's elements
//   in order, accumulating in float32 with separately rounded products and sums (__fmul_rn/__fadd_rn, never an
//   FMA), then divides with __fdiv_rn by the sum of weights (mean) or __fsqrt_rn of the sum of squared weights
//   (sqrtn) - the CPU twin's exact operation sequence. Offsets are clamped to [0, n] instead of validated (no
//   host sync); the CPU twin raises on bad offsets.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <limits>
#include <optional>

#include "cuda/cache_cuda_common.cuh"
#include "pipeline_checks.h"

namespace hps {
namespace {

using namespace hps::cuda;

// ---------------------------------------------------------------------------------------------- compact_misses

template <typename key_t>
__global__ void gather_misses_kernel(const key_t* __restrict__ keys, const bool* __restrict__ found,
                                     const int64_t* __restrict__ miss_scan, int64_t n,
                                     int64_t* __restrict__ positions, int64_t* __restrict__ miss_keys,
                                     int64_t* __restrict__ counts) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    if (i == n - 1) counts[0] = miss_scan[n - 1];
    if (found[i]) continue;
    const int64_t j = miss_scan[i] - 1;
    positions[j] = i;
    miss_keys[j] = static_cast<int64_t>(keys[i]);
  }
}

__global__ void run_heads_kernel(const int64_t* __restrict__ sorted_keys, const int64_t* __restrict__ counts,
                                 int64_t n, int64_t* __restrict__ heads) {
  const int64_t misses = counts[0];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < n; s += stride) {
    heads[s] = (s < misses && (s == 0 || sorted_keys[s] != sorted_keys[s - 1])) ? 1 : 0;
  }
}

__global__ void unique_inverse_kernel(const int64_t* __restrict__ sorted_keys, const int64_t* __restrict__ perm,
                                      const int64_t* __restrict__ heads, const int64_t* __restrict__ unique_scan,
                                      int64_t n, int64_t* __restrict__ unique_keys, int64_t* __restrict__ inverse,
                                      int64_t* __restrict__ counts) {
  const int64_t misses = counts[0];  // counts[1] is written below, counts[0] only read
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (first == 0) counts[1] = unique_scan[n - 1];  // heads past the misses are 0
  for (int64_t s = first; s < misses; s += stride) {
    const int64_t u = unique_scan[s] - 1;
    if (heads[s]) unique_keys[u] = sorted_keys[s];
    inverse[perm[s]] = u;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> compact_misses_cuda(
    const at::Tensor& keys,     // (n,) int32|int64
    const at::Tensor& found) {  // (n,) bool
  HPS_CHECK_CUDA(keys);
  check_keys_found(keys, found);
  const c10::cuda::CUDAGuard guard(keys.device());
  const int64_t n = keys.size(0);
  const auto opts = keys.options().dtype(at::kLong);
  at::Tensor unique_keys = at::zeros({n}, opts);  // (n,) int64, first counts[1] valid, tail zero
  at::Tensor positions = at::zeros({n}, opts);    // (n,) int64, first counts[0] valid, tail zero
  at::Tensor inverse = at::zeros({n}, opts);      // (n,) int64, first counts[0] valid, tail zero
  at::Tensor counts = at::zeros({2}, opts);       // [misses, unique]
  if (n == 0) return {unique_keys, positions, inverse, counts};

  const at::Tensor k = keys.contiguous();
  const at::Tensor f = found.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned grid = thread_grid(n);

  const at::Tensor miss_scan = at::cumsum(f.logical_not(), 0, at::kLong);  // (n,) inclusive
  at::Tensor miss_keys = at::full({n}, std::numeric_limits<int64_t>::max(), opts);
  AT_DISPATCH_INDEX_TYPES(k.scalar_type(), "compact_misses_cuda", [&] {
    gather_misses_kernel<index_t><<<grid, kThreads, 0, stream>>>(
        k.data_ptr<index_t>(), f.data_ptr<bool>(), miss_scan.data_ptr<int64_t>(), n, positions.data_ptr<int64_t>(),
        miss_keys.data_ptr<int64_t>(), counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  at::Tensor sorted_keys, perm;  // (n,) int64 each
  std::tie(sorted_keys, perm) = at::sort(miss_keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);

  at::Tensor heads = at::empty({n}, opts);
  run_heads_kernel<<<grid, kThreads, 0, stream>>>(sorted_keys.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), n,
                                                  heads.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor unique_scan = at::cumsum(heads, 0);  // (n,) int64 inclusive
  unique_inverse_kernel<<<grid, kThreads, 0, stream>>>(
      sorted_keys.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), heads.data_ptr<int64_t>(),
      unique_scan.data_ptr<int64_t>(), n, unique_keys.data_ptr<int64_t>(), inverse.data_ptr<int64_t>(),
      counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {unique_keys, positions, inverse, counts};
}

// ------------------------------------------------------------------------------------------------ scatter_rows

template <bool kVec4>
__global__ void __launch_bounds__(kThreads)
    scatter_rows_kernel(float* __restrict__ out, const int64_t* __restrict__ positions,
                        const int64_t* __restrict__ inverse, const float* __restrict__ rows,
                        const int64_t* __restrict__ counts, int64_t cap, int64_t n_out, int64_t u, int64_t dim) {
  const int lane = lane_id();
  const int64_t misses = counts[0] < cap ? counts[0] : cap;
  const int64_t stride = total_warps();
  for (int64_t i = global_warp_id(); i < misses; i += stride) {
    const int64_t pos = positions[i];
    const int64_t r = inverse[i];
    if (pos < 0 || pos >= n_out || r < 0 || r >= u) continue;  // bad index: skipped (the CPU twin raises)
    warp_copy_row<kVec4>(out + pos * dim, rows + r * dim, dim, lane);
  }
}

void scatter_rows_cuda(at::Tensor& out,              // (n, D) float32, rows at positions overwritten
                       const at::Tensor& positions,  // (cap,) int64
                       const at::Tensor& inverse,    // (cap,) int64
                       const at::Tensor& rows,       // (u, D) float32
                       const at::Tensor& counts) {   // (2,) int64: [misses, unique]
  HPS_CHECK_CUDA(out);
  check_scatter_rows_args(out, positions, inverse, rows, counts);
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t cap = positions.size(0);
  const int64_t dim = out.size(1);
  if (cap == 0 || dim == 0 || out.size(0) == 0 || rows.size(0) == 0) return;
  const at::Tensor p = positions.contiguous();
  const at::Tensor inv = inverse.contiguous();
  const at::Tensor r = rows.contiguous();
  const at::Tensor c = counts.contiguous();
  const bool vec4 = rows_vec4(dim, {out.data_ptr(), r.data_ptr()});
  auto stream = at::cuda::getCurrentCUDAStream();
  auto kernel = vec4 ? scatter_rows_kernel<true> : scatter_rows_kernel<false>;
  kernel<<<warp_grid(cap), kThreads, 0, stream>>>(out.data_ptr<float>(), p.data_ptr<int64_t>(),
                                                 inv.data_ptr<int64_t>(), r.data_ptr<float>(),
                                                 c.data_ptr<int64_t>(), cap, out.size(0), r.size(0), dim);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// -------------------------------------------------------------------------------------------------- bag_reduce

// acc + w * v, the product and the sum rounded separately (as the CPU twin, which never contracts to an FMA).
__device__ __forceinline__ float mul_add_rn(float acc, float w, float v) { return __fadd_rn(acc, __fmul_rn(w, v)); }

template <bool kVec4>
__global__ void __launch_bounds__(kThreads)
    bag_reduce_kernel(const float* __restrict__ values, const int64_t* __restrict__ offsets,
                      const float* __restrict__ weights, int64_t n, int64_t bags, int64_t dim, int mode,
                      float* __restrict__ out) {
  const int lane = lane_id();
  const int64_t stride = total_warps();
  for (int64_t b = global_warp_id(); b < bags; b += stride) {
    int64_t begin = offsets[b];
    int64_t end = offsets[b + 1];
    begin = begin < 0 ? 0 : (begin > n ? n : begin);
    end = end < begin ? begin : (end > n ? n : end);
    // Divisor: every lane computes the same sequential sums (broadcast loads).
    float divisor = 1.f;
    bool zero = false;
    if (mode != 0) {
      float sw = 0.f;
      float sw2 = 0.f;
      for (int64_t i = begin; i < end; ++i) {
        const float w = weights ? weights[i] : 1.f;
        sw = __fadd_rn(sw, w);
        sw2 = mul_add_rn(sw2, w, w);
      }
      divisor = mode == 1 ? sw : __fsqrt_rn(sw2);
      zero = divisor == 0.f || begin == end;
    }
    float* dst = out + b * dim;
    if (kVec4) {
      const int64_t d4 = dim >> 2;
      for (int64_t c = lane; c < d4; c += kWarp) {
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        if (!zero) {
          for (int64_t i = begin; i < end; ++i) {
            const float w = weights ? weights[i] : 1.f;
            const float4 v = reinterpret_cast<const float4*>(values + i * dim)[c];
            acc.x = mul_add_rn(acc.x, w, v.x);
            acc.y = mul_add_rn(acc.y, w, v.y);
            acc.z = mul_add_rn(acc.z, w, v.z);
            acc.w = mul_add_rn(acc.w, w, v.w);
          }
          if (mode != 0) {
            acc.x = __fdiv_rn(acc.x, divisor);
            acc.y = __fdiv_rn(acc.y, divisor);
            acc.z = __fdiv_rn(acc.z, divisor);
            acc.w = __fdiv_rn(acc.w, divisor);
          }
        }
        reinterpret_cast<float4*>(dst)[c] = acc;
      }
    } else {
      for (int64_t c = lane; c < dim; c += kWarp) {
        float acc = 0.f;
        if (!zero) {
          for (int64_t i = begin; i < end; ++i) {
            const float w = weights ? weights[i] : 1.f;
            acc = mul_add_rn(acc, w, values[i * dim + c]);
          }
          if (mode != 0) acc = __fdiv_rn(acc, divisor);
        }
        dst[c] = acc;
      }
    }
  }
}

at::Tensor bag_reduce_cuda(const at::Tensor& values,                  // (n, D) float32
                           const at::Tensor& offsets,                 // (B + 1,) int64
                           const std::optional<at::Tensor>& weights_opt,  // (n,) float32 or None
                           int64_t mode) {                            // 0 sum, 1 mean, 2 sqrtn
  HPS_CHECK_CUDA(values);
  const bool has_w = check_bag_reduce_args(values, offsets, weights_opt, mode);
  const int64_t n = values.size(0);
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t bags = offsets.size(0) - 1;
  const int64_t dim = values.size(1);
  at::Tensor out = at::empty({bags, dim}, values.options());  // (B, D), every element written
  if (bags == 0 || dim == 0) return out;
  const at::Tensor v = values.contiguous();
  const at::Tensor off = offsets.contiguous();
  const at::Tensor w = has_w ? weights_opt->contiguous() : at::Tensor();
  const bool vec4 = rows_vec4(dim, {v.data_ptr(), out.data_ptr()});
  auto stream = at::cuda::getCurrentCUDAStream();
  auto kernel = vec4 ? bag_reduce_kernel<true> : bag_reduce_kernel<false>;
  kernel<<<warp_grid(bags), kThreads, 0, stream>>>(v.data_ptr<float>(), off.data_ptr<int64_t>(),
                                                   has_w ? w.data_ptr<float>() : nullptr, n, bags, dim,
                                                   static_cast<int>(mode), out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hps, CUDA, m) {
  m.impl("compact_misses", &compact_misses_cuda);
  m.impl("scatter_rows", &scatter_rows_cuda);
  m.impl("bag_reduce", &bag_reduce_cuda);
}

}  // namespace hps
