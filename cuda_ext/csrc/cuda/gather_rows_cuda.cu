// CUDA gather_rows: out[i] = table[rows[i]] where the table is in device memory or in pinned host memory
// (read zero-copy over PCIe/NVLink-C2C: HPS's "uvm" table mode).
//
// Decomposition: one warp per group of kRowsPerWarp rows. Each lane moves 16-byte vectors; the warp issues the
// loads of all its rows before any store, so enough requests are in flight to cover the bus latency of host
// memory (a zero-copy read is a PCIe round trip; throughput needs many outstanding 16-byte requests).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "checks.h"

namespace hps {
namespace {

constexpr int kRowsPerWarp = 4;
constexpr int kMaxVecPerLane = 4;  // rows up to 32 lanes x 4 float4 = 512 floats take the register path

template <int VEC_PER_LANE>
__global__ void gather_rows_vec4_kernel(const float4* __restrict__ table, int64_t num_rows, int64_t vecs_per_row,
                                        const int64_t* __restrict__ rows, int64_t n, float4* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t first = warp * kRowsPerWarp;
  if (first >= n) return;
  float4 buf[kRowsPerWarp][VEC_PER_LANE];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = first + r;
    const int64_t row = i < n ? rows[i] : -1;
    const bool valid = row >= 0 && row < num_rows;
#pragma unroll
    for (int v = 0; v < VEC_PER_LANE; ++v) {
      const int64_t c = lane + 32 * v;
      buf[r][v] = (valid && c < vecs_per_row) ? table[row * vecs_per_row + c] : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = first + r;
    if (i >= n) break;
#pragma unroll
    for (int v = 0; v < VEC_PER_LANE; ++v) {
      const int64_t c = lane + 32 * v;
      if (c < vecs_per_row) out[i * vecs_per_row + c] = buf[r][v];
    }
  }
}

// Any dim (or unaligned rows): one warp per row, scalar loads.
__global__ void gather_rows_scalar_kernel(const float* __restrict__ table, int64_t num_rows, int64_t dim,
                                          const int64_t* __restrict__ rows, int64_t n, float* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (i >= n) return;
  const int64_t row = rows[i];
  const bool valid = row >= 0 && row < num_rows;
  for (int64_t c = lane; c < dim; c += 32) out[i * dim + c] = valid ? table[row * dim + c] : 0.f;
}

at::Tensor gather_rows_cuda(const at::Tensor& table, const at::Tensor& rows) {
  HPS_CHECK_CUDA(rows);
  HPS_CHECK_DTYPE(rows, at::kLong);
  HPS_CHECK_DIM(rows, 1);
  HPS_CHECK_DTYPE(table, at::kFloat);
  HPS_CHECK_DIM(table, 2);
  HPS_CHECK_CONTIGUOUS(table);
  TORCH_CHECK_VALUE(table.is_cuda() || table.is_pinned(),
                    "table must be on a CUDA device or in pinned host memory, found a pageable ", table.device(),
                    " tensor (use .pin_memory())");
  if (table.is_cuda()) HPS_CHECK_SAME_DEVICE(table, rows);
  const c10::cuda::CUDAGuard guard(rows.device());
  const at::Tensor r = rows.contiguous();
  const int64_t n = r.size(0), num_rows = table.size(0), dim = table.size(1);
  at::Tensor out = at::empty({n, dim}, rows.options().dtype(at::kFloat));
  if (n == 0 || dim == 0) return out;

  const float* src = table.data_ptr<float>();
  if (!table.is_cuda()) {
    void* device_ptr = nullptr;
    C10_CUDA_CHECK(cudaHostGetDevicePointer(&device_ptr, const_cast<float*>(src), 0));
    src = static_cast<const float*>(device_ptr);
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  const int threads = 256;
  const bool vec4 = dim % 4 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(out.data_ptr<float>()) % 16 == 0 && dim / 4 <= 32 * kMaxVecPerLane;
  if (vec4) {
    const int64_t vecs = dim / 4;
    const int64_t warps = (n + kRowsPerWarp - 1) / kRowsPerWarp;
    const int64_t blocks = (warps * 32 + threads - 1) / threads;
    const auto* t4 = reinterpret_cast<const float4*>(src);
    auto* o4 = reinterpret_cast<float4*>(out.data_ptr<float>());
    const int64_t* idx = r.data_ptr<int64_t>();
    if (vecs <= 32) {
      gather_rows_vec4_kernel<1><<<blocks, threads, 0, stream>>>(t4, num_rows, vecs, idx, n, o4);
    } else if (vecs <= 64) {
      gather_rows_vec4_kernel<2><<<blocks, threads, 0, stream>>>(t4, num_rows, vecs, idx, n, o4);
    } else {
      gather_rows_vec4_kernel<4><<<blocks, threads, 0, stream>>>(t4, num_rows, vecs, idx, n, o4);
    }
  } else {
    const int64_t blocks = (n * 32 + threads - 1) / threads;
    gather_rows_scalar_kernel<<<blocks, threads, 0, stream>>>(src, num_rows, dim, r.data_ptr<int64_t>(), n,
                                                              out.data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hps, CUDA, m) { m.impl("gather_rows", &gather_rows_cuda); }

}  // namespace hps
