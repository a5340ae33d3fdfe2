// CUDA twins of the read-only cache ops: cache_contains, cache_size, cache_export_batch (hps_ops.cpp contract;
// results identical to cpu/cache_query_cpu.cpp).
//
// contains: four lanes per key (eight keys per warp), the find probe (group_probe: digests in one access, then the
// key of digest matches) without scores.
// size: grid-stride count of non-empty digests; per warp a ballot popcount, per block one global atomic.
// export_batch: slot order is kept without a host sync: an inclusive scan (at::cumsum) of the occupancy flags of
// [start, end) gives each occupied slot its output position; one warp per slot then moves key and stored row (its
// bytes as they are, kUnit per lane access). The count is the scan's last element, written on the device. Tails
// past count are zero, as on the CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cuda/cache_cuda_common.cuh"
#include "cuda/stored_row_copy.cuh"

namespace hps {
namespace {

using namespace hps::cuda;

template <typename key_t, int G>
__global__ void __launch_bounds__(kThreads)
    cache_contains_kernel(const int64_t* __restrict__ slot_keys, const uint8_t* __restrict__ digests,
                          const key_t* __restrict__ keys, int64_t n, int64_t num_buckets,
                          bool* __restrict__ found) {
  constexpr int kKeysPerWarp = kWarp / G;
  const int lane = lane_id();
  const int64_t stride = total_warps() * kKeysPerWarp;
  for (int64_t i0 = global_warp_id() * kKeysPerWarp; i0 < n; i0 += stride) {  // warp-uniform (shuffles)
    const int64_t i = i0 + lane / G;
    const bool valid = i < n;
    int64_t key = 0;
    int64_t base = 0;
    uint8_t digest = 0;
    if (valid) {
      key = static_cast<int64_t>(keys[i]);
      const uint64_t h = mix64(key_bits(key));
      base = bucket_of(h, num_buckets) * kBucketSize;
      digest = digest_of(h);
    }
    const int j = group_probe<G>(slot_keys, digests, base, key, digest, lane % G, valid);
    if (valid && lane % G == 0) found[i] = j >= 0;
  }
}

at::Tensor cache_contains_cuda(const at::Tensor& slot_keys, const at::Tensor& digests,
                               const at::Tensor& keys) {  // (n,) int32|int64 -> (n,) bool
  const int64_t num_buckets = check_cuda_keys_digests(slot_keys, digests);
  check_query_keys(keys, slot_keys);
  const c10::cuda::CUDAGuard guard(slot_keys.device());
  const int64_t n = keys.size(0);
  at::Tensor found = at::empty({n}, keys.options().dtype(at::kBool));  // every entry written
  if (n == 0) return found;
  auto stream = at::cuda::getCurrentCUDAStream();
  // Four lanes per key (8 digests each) when the digests allow 8-byte loads, else the whole warp.
  const bool grouped = digests_aligned_for(4, digests.data_ptr());
  AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "cache_contains_cuda", [&] {
    if (grouped) {
      cache_contains_kernel<index_t, 4><<<warp_grid((n + 7) / 8), kThreads, 0, stream>>>(
          slot_keys.data_ptr<int64_t>(), digests.data_ptr<uint8_t>(), keys.data_ptr<index_t>(), n, num_buckets,
          found.data_ptr<bool>());
    } else {
      cache_contains_kernel<index_t, kWarp><<<warp_grid(n), kThreads, 0, stream>>>(
          slot_keys.data_ptr<int64_t>(), digests.data_ptr<uint8_t>(), keys.data_ptr<index_t>(), n, num_buckets,
          found.data_ptr<bool>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return found;
}

__global__ void __launch_bounds__(kThreads)
    cache_size_kernel(const uint8_t* __restrict__ digests, int64_t slots, int64_t* __restrict__ out) {
  __shared__ unsigned long long block_count;
  if (threadIdx.x == 0) block_count = 0;
  __syncthreads();
  const int lane = lane_id();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  unsigned long long local = 0;
  // slots is a multiple of 32, so whole warps stay in the loop together and the ballot is safe.
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < slots; i += stride) {
    local += __popc(__ballot_sync(kFullMask, digests[i] != kEmptyDigest));
  }
  if (lane == 0 && local) atomicAdd(&block_count, local);
  __syncthreads();
  if (threadIdx.x == 0 && block_count) atomic_add_i64(out, static_cast<int64_t>(block_count));
}

// size: occupied slots (digest != 0), 0-d int64 on the cache's device.
at::Tensor cache_size_cuda(const at::Tensor& digests) {
  check_cuda_digests(digests);
  const c10::cuda::CUDAGuard guard(digests.device());
  const int64_t slots = digests.size(0);  // > 0, a multiple of 32 (checked)
  at::Tensor out = at::zeros({}, digests.options().dtype(at::kLong));
  auto stream = at::cuda::getCurrentCUDAStream();
  cache_size_kernel<<<thread_grid(slots), kThreads, 0, stream>>>(digests.data_ptr<uint8_t>(), slots,
                                                                  out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

template <int kUnit>
__global__ void __launch_bounds__(kThreads)
    cache_export_kernel(const int64_t* __restrict__ slot_keys, const uint8_t* __restrict__ digests,
                        const uint8_t* __restrict__ values, const int64_t* __restrict__ scan, int64_t start,
                        int64_t cap, int64_t row_bytes, int64_t* __restrict__ out_keys,
                        uint8_t* __restrict__ out_values, int64_t* __restrict__ count) {
  const int lane = lane_id();
  const int64_t stride = total_warps();
  if (global_warp_id() == 0 && lane == 0) *count = scan[cap - 1];
  for (int64_t j = global_warp_id(); j < cap; j += stride) {
    const int64_t s = start + j;
    if (digests[s] == kEmptyDigest) continue;  // warp-uniform: the whole warp works on slot s
    const int64_t pos = scan[j] - 1;
    if (lane == 0) out_keys[pos] = slot_keys[s];
    group_copy_bytes<kWarp, kUnit>(out_values + pos * row_bytes, values + s * row_bytes, row_bytes, lane);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cache_export_batch_cuda(const at::Tensor& slot_keys,  // (S,) int64
                                                                       const at::Tensor& digests,    // (S,) uint8
                                                                       const at::Tensor& values,     // (S, W) stored
                                                                       int64_t start, int64_t end) {
  check_cuda_keys_digests(slot_keys, digests);
  check_values(values, slot_keys);
  const int64_t slots = slot_keys.size(0);
  TORCH_CHECK_VALUE(0 <= start && start <= end && end <= slots, "export_batch needs 0 <= start <= end <= slots (",
                    slots, "), found start=", start, ", end=", end);
  const c10::cuda::CUDAGuard guard(slot_keys.device());
  const int64_t cap = end - start;
  at::Tensor out_keys = at::zeros({cap}, slot_keys.options());                 // (end - start,) int64
  at::Tensor out_values = at::zeros({cap, values.size(1)}, values.options());  // (end - start, W) stored
  at::Tensor count = at::zeros({}, slot_keys.options());                       // 0-d int64
  if (cap == 0) return {out_keys, out_values, count};
  // Inclusive scan of the occupancy flags: output position + 1 of each occupied slot (no host sync).
  const at::Tensor scan = at::cumsum(digests.narrow(0, start, cap).ne(0), 0, at::kLong);
  const int64_t row_bytes = stored_row_bytes_of(values);
  auto stream = at::cuda::getCurrentCUDAStream();
  with_copy_unit(copy_unit(row_bytes, {values.data_ptr(), out_values.data_ptr()}), [&](auto unit_c) {
    cache_export_kernel<decltype(unit_c)::value><<<warp_grid(cap), kThreads, 0, stream>>>(
        slot_keys.data_ptr<int64_t>(), digests.data_ptr<uint8_t>(), static_cast<const uint8_t*>(values.data_ptr()),
        scan.data_ptr<int64_t>(), start, cap, row_bytes, out_keys.data_ptr<int64_t>(),
        static_cast<uint8_t*>(out_values.data_ptr()), count.data_ptr<int64_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out_keys, out_values, count};
}

}  // namespace

TORCH_LIBRARY_IMPL(hps, CUDA, m) {
  m.impl("cache_contains", &cache_contains_cuda);
  m.impl("cache_size", &cache_size_cuda);
  m.impl("cache_export_batch", &cache_export_batch_cuda);
}

}  // namespace hps
