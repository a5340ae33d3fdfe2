// CUDA gather_rows: out[i] = table[rows[i]] where the table is in device memory or in host memory (HPS's "uvm"
// table mode): read zero-copy over the bus when pinned, or gathered by the CPU into pinned staging buffers that the
// copy engine moves (a pageable table, or on request).
//
// Decomposition: one warp per group of kRowsPerWarp rows. Each lane moves 16-byte vectors; the warp issues the
// loads of all its rows before any store, so enough requests are in flight to cover the bus latency of host
// memory (a zero-copy read is a PCIe round trip; throughput needs many outstanding 16-byte requests).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/Parallel.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "checks.h"

namespace hps {
namespace {

constexpr int kRowsPerWarp = 4;
// Zero-copy gathers of at least this many rows read the host table in sorted id order.
constexpr int64_t kSortedGatherMinRows = 16384;
// Staged gathers (host tables): buffers of this size, this many in flight.
constexpr int64_t kStagingBytes = int64_t{8} << 20;
constexpr int kStagingBuffers = 3;
constexpr int kMaxVecPerLane = 4;  // rows up to 32 lanes x 4 float4 = 512 floats take the register path

// out_pos (nullable): row i of the work goes to out row out_pos[i] (the sorted-ids gather), else to out row i.
template <int VEC_PER_LANE>
__global__ void gather_rows_vec4_kernel(const float4* __restrict__ table, int64_t num_rows, int64_t vecs_per_row,
                                        const int64_t* __restrict__ rows, int64_t n, float4* __restrict__ out,
                                        const int64_t* __restrict__ out_pos) {
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
    const int64_t o = out_pos != nullptr ? out_pos[i] : i;
#pragma unroll
    for (int v = 0; v < VEC_PER_LANE; ++v) {
      const int64_t c = lane + 32 * v;
      if (c < vecs_per_row) out[o * vecs_per_row + c] = buf[r][v];
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

// Host table, staged: the row ids come to the host, CPU threads gather the rows into pinned staging buffers and
// the copy engine moves each filled buffer while the next is gathered. The idea: the copy engine moves contiguous
// buffers at ~55 GB/s where a zero-copy gather of scattered rows reaches ~21 GB/s. Measured on the H200 machine
// (16 vCPUs of a microVM): the CPU gather of random 512 B rows manages only ~4.3 GB/s, so `auto` keeps zero-copy for
// pinned tables and stages only pageable ones (which zero-copy cannot read). Synchronises the host.
void gather_rows_staged(const at::Tensor& table, const at::Tensor& rows, at::Tensor& out) {
  const int64_t n = rows.size(0), num_rows = table.size(0), dim = table.size(1);
  const at::Tensor ids = rows.to(at::TensorOptions().device(at::kCPU).pinned_memory(true));  // blocking D2H
  const int64_t* idx = ids.data_ptr<int64_t>();
  const float* src = table.data_ptr<float>();
  const size_t row_bytes = static_cast<size_t>(dim) * sizeof(float);
  const int64_t chunk = std::max<int64_t>(1, kStagingBytes / static_cast<int64_t>(row_bytes));
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor staging[kStagingBuffers];
  cudaEvent_t copied[kStagingBuffers];
  for (int b = 0; b < kStagingBuffers; ++b) {
    staging[b] = at::empty({std::min(chunk, n), dim}, at::TensorOptions().dtype(at::kFloat).pinned_memory(true));
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&copied[b], cudaEventDisableTiming));
  }
  float* dst = out.data_ptr<float>();
  for (int64_t c = 0, start = 0; start < n; ++c, start += chunk) {
    const int b = static_cast<int>(c % kStagingBuffers);
    const int64_t count = std::min(chunk, n - start);
    if (c >= kStagingBuffers) C10_CUDA_CHECK(cudaEventSynchronize(copied[b]));  // buffer b's last copy is done
    float* buf = staging[b].data_ptr<float>();
    at::parallel_for(0, count, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t row = idx[start + i];
        if (row >= 0 && row < num_rows) {
          std::memcpy(buf + i * dim, src + row * dim, row_bytes);
        } else {
          std::memset(buf + i * dim, 0, row_bytes);
        }
      }
    });
    C10_CUDA_CHECK(cudaMemcpyAsync(dst + start * dim, buf, count * row_bytes, cudaMemcpyHostToDevice, stream));
    C10_CUDA_CHECK(cudaEventRecord(copied[b], stream));
  }
  // The staging buffers go back to the allocator when this returns: their copies must be done by then.
  for (int b = 0; b < kStagingBuffers; ++b) {
    C10_CUDA_CHECK(cudaEventSynchronize(copied[b]));
    C10_CUDA_CHECK(cudaEventDestroy(copied[b]));
  }
}

at::Tensor gather_rows_cuda(const at::Tensor& table, const at::Tensor& rows, int64_t strategy) {
  HPS_CHECK_CUDA(rows);
  HPS_CHECK_DTYPE(rows, at::kLong);
  HPS_CHECK_DIM(rows, 1);
  HPS_CHECK_DTYPE(table, at::kFloat);
  HPS_CHECK_DIM(table, 2);
  HPS_CHECK_CONTIGUOUS(table);
  TORCH_CHECK_VALUE(strategy >= 0 && strategy <= 2, "strategy must be 0 (auto), 1 (zero-copy) or 2 (staged), found ",
                    strategy);
  if (table.is_cuda()) {
    HPS_CHECK_SAME_DEVICE(table, rows);
  } else if (strategy == 1) {
    TORCH_CHECK_VALUE(table.is_pinned(), "strategy 1 (zero-copy) needs the table in pinned host memory, found a "
                      "pageable ", table.device(), " tensor (use .pin_memory(), or strategy 0/2)");
  }
  const c10::cuda::CUDAGuard guard(rows.device());
  const at::Tensor r = rows.contiguous();
  const int64_t n = r.size(0), num_rows = table.size(0), dim = table.size(1);
  at::Tensor out = at::empty({n, dim}, rows.options().dtype(at::kFloat));
  if (n == 0 || dim == 0) return out;
  if (!table.is_cuda() && (strategy == 2 || !table.is_pinned())) {
    gather_rows_staged(table, r, out);
    return out;
  }

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
    const int64_t* out_pos = nullptr;
    // Host rows read in ascending id order: neighbouring warps then read neighbouring host memory, which the bus
    // serves at copy speed (measured 51 GB/s for consecutive ids vs 20 GB/s for random ones); the rows land in
    // their places through out_pos. The sort costs ~1 ms per 3.4 M ids on the device.
    at::Tensor sorted_ids, order;
    if (!table.is_cuda() && n >= kSortedGatherMinRows) {
      std::tie(sorted_ids, order) = at::sort(r);
      idx = sorted_ids.data_ptr<int64_t>();
      out_pos = order.data_ptr<int64_t>();
    }
    if (vecs <= 32) {
      gather_rows_vec4_kernel<1><<<blocks, threads, 0, stream>>>(t4, num_rows, vecs, idx, n, o4, out_pos);
    } else if (vecs <= 64) {
      gather_rows_vec4_kernel<2><<<blocks, threads, 0, stream>>>(t4, num_rows, vecs, idx, n, o4, out_pos);
    } else {
      gather_rows_vec4_kernel<4><<<blocks, threads, 0, stream>>>(t4, num_rows, vecs, idx, n, o4, out_pos);
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
