// CUDA twins of cache_insert_or_assign, cache_insert_grouped and cache_assign (hps_ops.cpp contract; results
// identical to cpu/cache_insert_cpu.cpp). The insert walk itself - one warp per run of one bucket's keys, in input
// order - is in cache_insert_run.cuh (shared with the lookup pipeline's apply kernel); insert_or_assign and assign
// first group the keys by bucket with a STABLE sort (at::sort, no host sync).
// Rows are the cache's stored rows (cache_state.h): new_values already hold its storage and are copied as bytes,
// kUnit bytes per lane access (copy_unit), never re-encoded.
// Counts: per block in shared memory, one global atomicAdd per block and counter.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cuda/cache_insert_run.cuh"

namespace hps {
namespace {

using namespace hps::cuda;

// assign: the same run walk without any slot changes; rows are copied in input order so the last duplicate wins.
template <typename key_t, int kUnit>
__global__ void __launch_bounds__(kThreads)
    cache_assign_kernel(const int64_t* __restrict__ slot_keys, const uint8_t* __restrict__ digests,
                        uint8_t* __restrict__ values, const key_t* __restrict__ keys,
                        const uint8_t* __restrict__ new_values, const int64_t* __restrict__ sorted_bucket,
                        const int64_t* __restrict__ perm, int64_t n, int64_t row_bytes, int64_t* __restrict__ count) {
  __shared__ unsigned long long block_count;
  if (threadIdx.x == 0) block_count = 0;
  __syncthreads();

  const int lane = lane_id();
  const int64_t stride = total_warps();
  for (int64_t p = global_warp_id(); p < n; p += stride) {
    if (!starts_run(sorted_bucket, p)) continue;
    const int64_t bucket = sorted_bucket[p];
    const int64_t base = bucket * kBucketSize;
    const uint8_t my_digest = digests[base + lane];
    const int64_t my_key = my_digest == kEmptyDigest ? 0 : slot_keys[base + lane];
    unsigned long long assigned = 0;
    for (int64_t q = p; q < n && sorted_bucket[q] == bucket; ++q) {
      const int64_t i = perm[q];
      const int64_t key = static_cast<int64_t>(keys[i]);
      const uint8_t digest = digest_of(mix64(key_bits(key)));
      const unsigned present = __ballot_sync(kFullMask, my_digest == digest && my_key == key);
      if (!present) continue;
      const int slot = __ffs(present) - 1;
      group_copy_bytes<kWarp, kUnit>(values + (base + slot) * row_bytes, new_values + i * row_bytes, row_bytes, lane);
      ++assigned;
    }
    if (lane == 0 && assigned) atomicAdd(&block_count, assigned);
  }

  __syncthreads();
  if (threadIdx.x == 0 && block_count) atomic_add_i64(count, static_cast<int64_t>(block_count));
}

at::Tensor cache_insert_or_assign_cuda(at::Tensor& slot_keys,         // (S,) int64
                                       at::Tensor& digests,           // (S,) uint8
                                       at::Tensor& scores,            // (S,) int32
                                       at::Tensor& values,            // (S, W) stored rows
                                       const at::Tensor& clock,       // (1,) int64, read only
                                       const at::Tensor& keys,        // (n,) int32|int64
                                       const at::Tensor& new_values,  // (n, W) stored rows, values' dtype
                                       int64_t policy, const std::optional<at::Tensor>& sketch) {
  const int64_t num_buckets = check_cuda_state(slot_keys, digests, scores, values, clock);
  check_policy(policy);
  check_query_keys(keys, slot_keys);
  check_new_values(new_values, keys, values);
  check_admission(sketch, slot_keys, policy);
  const int32_t* sketch_p = sketch ? sketch->data_ptr<int32_t>() : nullptr;
  const int64_t sketch_width = sketch ? sketch->size(0) / kSketchDepth : 0;
  const c10::cuda::CUDAGuard guard(slot_keys.device());
  at::Tensor counts = at::zeros({4}, slot_keys.options());  // [inserted, assigned, evicted, refused]
  const int64_t n = keys.size(0);
  if (n == 0) return counts;

  at::Tensor sorted_bucket, perm;  // (n,) int64 each
  std::tie(sorted_bucket, perm) = sort_keys_by_bucket(keys, num_buckets);
  const int64_t row_bytes = stored_row_bytes_of(values);
  const int unit = copy_unit(row_bytes, {values.data_ptr(), new_values.data_ptr()});
  const bool lru = policy == kPolicyLRU;
  const unsigned grid = warp_grid(n);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "cache_insert_or_assign_cuda", [&] {
    with_copy_unit(unit, [&](auto unit_c) {
      insert_runs_kernel<index_t, decltype(unit_c)::value><<<grid, kThreads, 0, stream>>>(
          slot_keys.data_ptr<int64_t>(), digests.data_ptr<uint8_t>(), scores.data_ptr<int32_t>(), values.data_ptr(),
          clock.data_ptr<int64_t>(), keys.data_ptr<index_t>(), new_values.data_ptr(),
          sorted_bucket.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), n, row_bytes, lru, counts.data_ptr<int64_t>(),
          num_buckets, nullptr, nullptr, sketch_p, sketch_width);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return counts;
}

// Keys already grouped by bucket (the miss path plans them so on the host): one launch, no sort, and the counts
// added to the caller's accumulator instead of a fresh tensor. The grouping is not checked here (that would
// need the keys on the host); keys outside their group still land in their own bucket, never outside the cache.
void cache_insert_grouped_cuda(at::Tensor& slot_keys, at::Tensor& digests, at::Tensor& scores, at::Tensor& values,
                               const at::Tensor& clock, const at::Tensor& keys, const at::Tensor& new_values,
                               at::Tensor& counts, int64_t policy, const std::optional<at::Tensor>& sketch) {
  const int64_t num_buckets = check_cuda_state(slot_keys, digests, scores, values, clock);
  check_policy(policy);
  check_query_keys(keys, slot_keys);
  check_new_values(new_values, keys, values);
  check_admission(sketch, slot_keys, policy);
  const int32_t* sketch_p = sketch ? sketch->data_ptr<int32_t>() : nullptr;
  const int64_t sketch_width = sketch ? sketch->size(0) / kSketchDepth : 0;
  HPS_CHECK_DTYPE(counts, at::kLong);
  TORCH_CHECK_VALUE(counts.dim() == 1 && counts.size(0) == 4 && counts.is_contiguous(),
                    "counts must be a contiguous (4,) tensor, found shape ", counts.sizes());
  HPS_CHECK_SAME_DEVICE(counts, slot_keys);
  const c10::cuda::CUDAGuard guard(slot_keys.device());
  const int64_t n = keys.size(0);
  if (n == 0) return;
  const int64_t row_bytes = stored_row_bytes_of(values);
  const int unit = copy_unit(row_bytes, {values.data_ptr(), new_values.data_ptr()});
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "cache_insert_grouped_cuda", [&] {
    with_copy_unit(unit, [&](auto unit_c) {
      insert_runs_kernel<index_t, decltype(unit_c)::value><<<warp_grid(n), kThreads, 0, stream>>>(
          slot_keys.data_ptr<int64_t>(), digests.data_ptr<uint8_t>(), scores.data_ptr<int32_t>(), values.data_ptr(),
          clock.data_ptr<int64_t>(), keys.data_ptr<index_t>(), new_values.data_ptr(), nullptr, nullptr, n, row_bytes,
          policy == kPolicyLRU, counts.data_ptr<int64_t>(), num_buckets, nullptr, nullptr, sketch_p, sketch_width);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor cache_assign_cuda(const at::Tensor& slot_keys,   // (S,) int64
                             const at::Tensor& digests,     // (S,) uint8
                             at::Tensor& values,            // (S, W) stored rows
                             const at::Tensor& keys,        // (n,) int32|int64
                             const at::Tensor& new_values)  // (n, W) stored rows, values' dtype
{
  const int64_t num_buckets = check_cuda_keys_digests(slot_keys, digests);
  check_values(values, slot_keys);
  check_query_keys(keys, slot_keys);
  check_new_values(new_values, keys, values);
  const c10::cuda::CUDAGuard guard(slot_keys.device());
  at::Tensor count = at::zeros({}, slot_keys.options());  // 0-d: keys (occurrences) that were present
  const int64_t n = keys.size(0);
  if (n == 0) return count;

  at::Tensor sorted_bucket, perm;  // (n,) int64 each
  std::tie(sorted_bucket, perm) = sort_keys_by_bucket(keys, num_buckets);
  const int64_t row_bytes = stored_row_bytes_of(values);
  const int unit = copy_unit(row_bytes, {values.data_ptr(), new_values.data_ptr()});
  const unsigned grid = warp_grid(n);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "cache_assign_cuda", [&] {
    with_copy_unit(unit, [&](auto unit_c) {
      cache_assign_kernel<index_t, decltype(unit_c)::value><<<grid, kThreads, 0, stream>>>(
          slot_keys.data_ptr<int64_t>(), digests.data_ptr<uint8_t>(), static_cast<uint8_t*>(values.data_ptr()),
          keys.data_ptr<index_t>(), static_cast<const uint8_t*>(new_values.data_ptr()),
          sorted_bucket.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), n, row_bytes, count.data_ptr<int64_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return count;
}

}  // namespace

TORCH_LIBRARY_IMPL(hps, CUDA, m) {
  m.impl("cache_insert_or_assign", &cache_insert_or_assign_cuda);
  m.impl("cache_insert_grouped", &cache_insert_grouped_cuda);
  m.impl("cache_assign", &cache_assign_cuda);
}

}  // namespace hps
