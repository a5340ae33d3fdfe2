// CUDA twins of cache_erase, cache_clear and cache_decay (hps_ops.cpp contract; results identical to
// cpu/cache_erase_cpu.cpp).
//
// erase: keys are stably grouped by bucket (as insert_or_assign) and one warp walks each bucket's run: lane j holds
// slot j's digest; a ballot finds the key, its lane frees the slot in registers (digest 0, score 0), so a key given
// twice is erased and counted once, as on the CPU. Freed slots are written back at the end of the run. Keys and
// rows are left as they are (not mutable in the schema; meaningless once the digest is empty).
// clear: three memsets on the current stream. decay: one thread per score (arithmetic shift), thread 0 halves the
// LRU clock.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cuda/cache_cuda_common.cuh"

namespace hps {
namespace {

using namespace hps::cuda;

template <typename key_t>
__global__ void __launch_bounds__(kThreads)
    cache_erase_kernel(const int64_t* __restrict__ slot_keys, uint8_t* __restrict__ digests,
                       int32_t* __restrict__ scores, const key_t* __restrict__ keys,
                       const int64_t* __restrict__ sorted_bucket, const int64_t* __restrict__ perm, int64_t n,
                       int64_t* __restrict__ count) {
  __shared__ unsigned long long block_count;
  if (threadIdx.x == 0) block_count = 0;
  __syncthreads();

  const int lane = lane_id();
  const int64_t stride = total_warps();
  for (int64_t p = global_warp_id(); p < n; p += stride) {
    if (!starts_run(sorted_bucket, p)) continue;
    const int64_t bucket = sorted_bucket[p];
    const int64_t base = bucket * kBucketSize;
    uint8_t my_digest = digests[base + lane];
    const int64_t my_key = my_digest == kEmptyDigest ? 0 : slot_keys[base + lane];
    bool freed = false;
    unsigned long long erased = 0;
    for (int64_t q = p; q < n && sorted_bucket[q] == bucket; ++q) {
      const int64_t key = static_cast<int64_t>(keys[perm[q]]);
      const uint8_t digest = digest_of(mix64(key_bits(key)));
      const unsigned present = __ballot_sync(kFullMask, my_digest == digest && my_key == key);
      if (!present) continue;  // a miss, or a duplicate whose slot is already freed
      if (lane == __ffs(present) - 1) {
        my_digest = kEmptyDigest;
        freed = true;
      }
      ++erased;
    }
    if (freed) {
      digests[base + lane] = kEmptyDigest;
      scores[base + lane] = 0;
    }
    if (lane == 0 && erased) atomicAdd(&block_count, erased);
  }

  __syncthreads();
  if (threadIdx.x == 0 && block_count) atomic_add_i64(count, static_cast<int64_t>(block_count));
}

at::Tensor cache_erase_cuda(const at::Tensor& slot_keys,  // (S,) int64
                            at::Tensor& digests,          // (S,) uint8, freed slots -> 0
                            at::Tensor& scores,           // (S,) int32, freed slots -> 0
                            const at::Tensor& keys)       // (n,) int32|int64
{
  const int64_t num_buckets = check_cuda_keys_digests(slot_keys, digests);
  check_scores(scores, digests);
  check_query_keys(keys, slot_keys);
  const c10::cuda::CUDAGuard guard(slot_keys.device());
  at::Tensor count = at::zeros({}, slot_keys.options());  // 0-d: slots freed
  const int64_t n = keys.size(0);
  if (n == 0) return count;

  at::Tensor sorted_bucket, perm;  // (n,) int64 each
  std::tie(sorted_bucket, perm) = sort_keys_by_bucket(keys, num_buckets);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "cache_erase_cuda", [&] {
    cache_erase_kernel<index_t><<<warp_grid(n), kThreads, 0, stream>>>(
        slot_keys.data_ptr<int64_t>(), digests.data_ptr<uint8_t>(), scores.data_ptr<int32_t>(),
        keys.data_ptr<index_t>(), sorted_bucket.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), n,
        count.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return count;
}

// clear: every slot empty, scores and clock zero; keys and rows are left (meaningless once the digest is empty).
void cache_clear_cuda(at::Tensor& digests, at::Tensor& scores, at::Tensor& clock) {
  check_cuda_digests(digests);
  check_scores(scores, digests);
  check_clock(clock, scores);
  const c10::cuda::CUDAGuard guard(digests.device());
  digests.zero_();  // memsets on the current stream
  scores.zero_();
  clock.zero_();
}

__global__ void cache_decay_kernel(int32_t* __restrict__ scores, int64_t slots, int64_t* __restrict__ clock,
                                   bool halve_clock) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < slots; i += stride) {
    scores[i] >>= 1;  // arithmetic shift: floor(score / 2), as the CPU twin
  }
  if (halve_clock && blockIdx.x == 0 && threadIdx.x == 0) clock[0] >>= 1;
}

// decay: scores halved; for LRU the clock too (keeps the recency order); LFU leaves the clock alone.
void cache_decay_cuda(at::Tensor& scores, at::Tensor& clock, int64_t policy) {
  HPS_CHECK_CUDA(scores);
  HPS_CHECK_DTYPE(scores, at::kInt);
  HPS_CHECK_DIM(scores, 1);
  HPS_CHECK_CONTIGUOUS(scores);
  check_clock(clock, scores);
  check_policy(policy);
  const c10::cuda::CUDAGuard guard(scores.device());
  const int64_t slots = scores.numel();
  const bool lru = policy == kPolicyLRU;
  if (slots == 0 && !lru) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned grid = slots > 0 ? thread_grid(slots) : 1u;
  cache_decay_kernel<<<grid, kThreads, 0, stream>>>(scores.data_ptr<int32_t>(), slots, clock.data_ptr<int64_t>(),
                                                    lru);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(hps, CUDA, m) {
  m.impl("cache_erase", &cache_erase_cuda);
  m.impl("cache_clear", &cache_clear_cuda);
  m.impl("cache_decay", &cache_decay_cuda);
}

}  // namespace hps
