// The insert walk of the CUDA cache (cache_insert_or_assign, cache_insert_grouped, and the lookup pipeline's
// apply kernel): one warp per run of keys of one bucket, in input order - the CPU's sequential contract.
//
// Parallel decomposition: the keys' buckets are grouped (stably sorted, or planned so on the host), so the keys of
// one bucket form a run in input order. Warp p starts work only if sorted position p begins a run; it then walks
// the run's keys one by one, exactly as the CPU's sequential contract does:
//   lane j holds slot j of the bucket (digest, key, score) in registers; for each key a ballot answers "present?",
//   another "lowest free slot", and a warp min over (score, lane) of the slots not yet written by this call (a
//   32-bit mask the warp holds) picks the eviction victim, ties to the lowest slot index. The warp copies each row
//   as stored bytes (the cache's storage, never re-encoded), kUnit bytes per lane access (copy_unit: 16 when
//   every row allows it). Buckets are independent, so runs need no ordering between them.
// At the end of a run the rows are already written; a fence then publishes the slot keys/scores and finally the
// digests, so a concurrent find never sees a new key before its row (an evicted slot is hidden - digest 0 - before
// its row is overwritten).
#pragma once

#include "cuda/cache_cuda_common.cuh"
#include "cuda/stored_row_copy.cuh"

namespace hps {
namespace cuda {

enum InsertCount { kInserted = 0, kAssigned = 1, kEvicted = 2, kRefused = 3 };

// row_of[i] == kFillRow: entry i's row is fill_row, one stored row (a key the source lacks).
constexpr int64_t kFillRow = INT64_MAX;

// Orders (score, lane) so that an unsigned minimum is "lowest score, then lowest slot index".
__device__ __forceinline__ uint64_t victim_order(int32_t score, int lane) {
  const uint32_t biased = static_cast<uint32_t>(score) ^ 0x80000000u;
  return (static_cast<uint64_t>(biased) << 32) | static_cast<uint32_t>(lane);
}

// The insert of n keys by `num_warps` warps of a launch, this one being number `warp` among them; the
// block's counts are added to block_counts (shared, zeroed by the caller) and later to `counts` by the caller.
// Entry i (= perm[q], or q) is keys[i] -> the stored row at new_values + i * row_bytes, or, with row_of,
// new_values + row_of[i] * row_bytes (kFillRow: fill_row, one stored row in device memory) - the GPU-direct second
// level inserts from the host-mapped table's rows that way. values, new_values and fill_row hold rows of one
// storage, row_bytes each; kUnit is copy_unit(row_bytes, {values, new_values, fill_row}).
template <typename key_t, int kUnit>
__device__ __forceinline__ void insert_runs(int64_t* __restrict__ slot_keys, uint8_t* __restrict__ digests,
                                            int32_t* __restrict__ scores, void* __restrict__ values,
                                            const int64_t* __restrict__ clock, const key_t* __restrict__ keys,
                                            const void* __restrict__ new_values,
                                            const int64_t* __restrict__ sorted_bucket,
                                            const int64_t* __restrict__ perm, int64_t n, int64_t row_bytes, bool lru,
                                            int64_t num_buckets, int64_t warp, int64_t num_warps,
                                            unsigned long long* block_counts, const int64_t* __restrict__ row_of,
                                            const void* __restrict__ fill_row, const int32_t* __restrict__ sketch,
                                            int64_t sketch_width) {
  const int lane = lane_id();
  const int32_t new_score = lru ? score_from_clock(clock[0]) : 1;
  const int64_t stride = num_warps;
  // Without sorted_bucket/perm (cache_insert_grouped) the keys arrive grouped by bucket and each key's bucket is
  // recomputed from the key itself: cheap, and always a bucket of this cache.
  const auto bucket_at = [&](int64_t q) {
    return sorted_bucket != nullptr ? sorted_bucket[q]
                                    : bucket_of(mix64(key_bits(static_cast<int64_t>(keys[q]))), num_buckets);
  };
  for (int64_t p = warp; p < n; p += stride) {
    const int64_t bucket = bucket_at(p);
    if (bucket >= num_buckets) continue;  // staged entries with nothing to insert (sorted last)
    if (p > 0 && bucket_at(p - 1) == bucket) continue;  // not the start of a run
    const int64_t base = bucket * kBucketSize;
    uint8_t my_digest = digests[base + lane];
    int64_t my_key = my_digest == kEmptyDigest ? 0 : slot_keys[base + lane];
    int32_t my_score = scores[base + lane];
    bool dirty = false;    // this lane's slot got a new key
    uint32_t written = 0;  // bit j: slot j was inserted or assigned by this call (warp-uniform)
    unsigned long long c[4] = {0, 0, 0, 0};

    // The run is read 32 entries at a time, one per lane (coalesced, independent loads), and walked from
    // registers: a walk that loaded each entry when it reached it waited on two dependent global loads per key,
    // which dominates when a small cache takes many keys per bucket (262,144 misses into a 7-bucket cache: ~37,000
    // keys per run).
    for (int64_t q0 = p;; q0 += kWarp) {
      const int64_t q = q0 + lane;
      const bool in_run = q < n && bucket_at(q) == bucket;
      const int count = __popc(__ballot_sync(kFullMask, in_run));  // a prefix of the lanes: runs are contiguous
      const int64_t lane_i = in_run ? (perm != nullptr ? perm[q] : q) : 0;
      const int64_t lane_key = in_run ? static_cast<int64_t>(keys[lane_i]) : 0;
      const int64_t lane_row = in_run && row_of != nullptr ? row_of[lane_i] : lane_i;
      // Admission: each lane's key estimate, read before the walk (the sketch does not change during an insert).
      int32_t lane_estimate = 0;
      if (sketch != nullptr && in_run) {
        const uint64_t h = mix64(key_bits(lane_key));
        lane_estimate = INT32_MAX;
        for (int64_t d = 0; d < kSketchDepth; ++d) {
          const int32_t c = sketch[d * sketch_width + sketch_index(h, d, sketch_width)];
          lane_estimate = c < lane_estimate ? c : lane_estimate;
        }
      }
      const uint8_t lane_digest = digest_of(mix64(key_bits(lane_key)));
      for (int t = 0; t < count; ++t) {
        const int64_t r = __shfl_sync(kFullMask, lane_row, t);
        const int64_t key = __shfl_sync(kFullMask, lane_key, t);
        const int32_t estimate = __shfl_sync(kFullMask, lane_estimate, t);
        const uint8_t digest = static_cast<uint8_t>(__shfl_sync(kFullMask, static_cast<int>(lane_digest), t));
        const void* src = r == kFillRow ? fill_row : static_cast<const uint8_t*>(new_values) + r * row_bytes;
        const auto put_row = [&](int slot) {
          group_copy_bytes<kWarp, kUnit>(static_cast<uint8_t*>(values) + (base + slot) * row_bytes, src, row_bytes,
                                         lane);
        };
        const unsigned present = __ballot_sync(kFullMask, my_digest == digest && my_key == key);
        if (present) {  // present before this call or inserted earlier in it: assign, score untouched
          const int slot = __ffs(present) - 1;
          put_row(slot);
          written |= 1u << slot;
          ++c[kAssigned];
          continue;
        }
        if (written == kFullMask) {  // every slot written by this call: no free slot, no victim
          ++c[kRefused];
          continue;
        }
        const unsigned free_slots = __ballot_sync(kFullMask, my_digest == kEmptyDigest);
        int slot;
        if (free_slots) {
          slot = __ffs(free_slots) - 1;
        } else {
          const bool candidate = ((written >> lane) & 1u) == 0u;
          slot = static_cast<int>(warp_min_u64(candidate ? victim_order(my_score, lane) : ~uint64_t(0)) & 31u);
          if (sketch != nullptr && estimate <= __shfl_sync(kFullMask, my_score, slot)) {  // not admitted
            ++c[kRefused];
            continue;
          }
          ++c[kEvicted];
          // Hide the victim before its row changes (a concurrent reader must not pair its key with the new row).
          if (lane == slot) digests[base + slot] = kEmptyDigest;
          __threadfence();
          __syncwarp();
        }
        if (lane == slot) {
          my_digest = digest;
          my_key = key;
          my_score = sketch != nullptr && estimate > new_score ? estimate : new_score;
          dirty = true;
        }
        put_row(slot);
        written |= 1u << slot;
        ++c[kInserted];
      }
      if (count < kWarp) break;
    }

    // Publish: rows first (written above), then keys and scores, then the digests that make the slots visible.
    if (dirty) {
      slot_keys[base + lane] = my_key;
      scores[base + lane] = my_score;
    }
    __threadfence();
    __syncwarp();
    if (dirty) digests[base + lane] = my_digest;
    if (lane == 0) {
      for (int k = 0; k < 4; ++k) {
        if (c[k]) atomicAdd(&block_counts[k], c[k]);
      }
    }
  }
}

// A launch of the walk over n keys (grid: warp_grid(n)); block counts added to counts[kInserted..kRefused].
template <typename key_t, int kUnit>
__global__ void __launch_bounds__(kThreads)
    insert_runs_kernel(int64_t* __restrict__ slot_keys, uint8_t* __restrict__ digests, int32_t* __restrict__ scores,
                       void* __restrict__ values, const int64_t* __restrict__ clock, const key_t* __restrict__ keys,
                       const void* __restrict__ new_values, const int64_t* __restrict__ sorted_bucket,
                       const int64_t* __restrict__ perm, int64_t n, int64_t row_bytes, bool lru,
                       int64_t* __restrict__ counts, int64_t num_buckets, const int64_t* __restrict__ row_of,
                       const void* __restrict__ fill_row, const int32_t* __restrict__ sketch, int64_t sketch_width) {
  __shared__ unsigned long long block_counts[4];
  if (threadIdx.x < 4) block_counts[threadIdx.x] = 0;
  __syncthreads();
  insert_runs<key_t, kUnit>(slot_keys, digests, scores, values, clock, keys, new_values, sorted_bucket, perm, n,
                            row_bytes, lru, num_buckets, global_warp_id(), total_warps(), block_counts, row_of,
                            fill_row, sketch, sketch_width);
  __syncthreads();
  if (threadIdx.x < 4 && block_counts[threadIdx.x]) {
    atomic_add_i64(counts + threadIdx.x, static_cast<int64_t>(block_counts[threadIdx.x]));
  }
}

}  // namespace cuda
}  // namespace hps
