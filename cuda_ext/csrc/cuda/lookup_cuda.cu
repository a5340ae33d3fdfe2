// The lookup pipeline's CUDA kernels (CPU twins in cpu/lookup_cpu.cpp, identical results) and the ops that expose
// them for tests: cache_find_misses, resident_find.
//
// find: the cache's find (cache_find_cuda.cu: G lanes per key, digests first, 16-byte row copies) or the resident
//   index's probe (primary bucket, then the secondary one when the primary is marked spilled), and in the same pass:
//   - a miss gets the table's default row, and its (position, key) is appended to the miss list: per warp one
//     ballot of the missing groups, one atomicAdd on the control block, each missing group's leader writes its
//     entry (the list is in no particular order; the host plan sorts what it needs);
//   - the last block to finish (a ticket counter in the control block) resets the per-call counters for the next
//     call, adds the call to the cumulative counters, bumps the LRU clock (every block read it at its start and
//     has finished), and publishes the miss count and the call's sequence number to pinned host memory.
//   So a lookup is one launch - no memset, no clock kernel - and a CUDA graph can replay it.
// second level (a dynamic cache over a host-mapped table that holds every key): after the find, one launch probes
//   the table's index for each miss (the resident find's probe) and stages (row id, cache bucket, key, position);
//   the staged rows are sorted by row id on the device and gathered from pinned host memory into the output in
//   that order; the staged entries sorted by (bucket, key) feed the insert walk (cache_insert_run.cuh) - nothing
//   comes back to the host.
// apply: one launch with three block roles: scatter (a group of 8 lanes per miss position copies its row into the
//   output), cache insert (cache_insert_run.cuh: a warp per bucket run, keys grouped by bucket on the host), and
//   the resident writes (rows to their new row ids, whole index buckets copied from the host's index). The roles
//   touch disjoint memory, so they need no ordering among themselves; no find runs concurrently (the pipeline
//   orders every call on the table).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <type_traits>

#include "cuda/cache_insert_run.cuh"
#include "cuda/stored_row_copy.cuh"
#include "cuda/lookup_cuda.h"
#include "lookup_layout.h"
#include "lookup_ops.h"

namespace hps {
namespace cuda {
namespace {

// The resident index's probe: as group_probe, but a digest match reads the slot's key and its row id together, so
// the row copy waits on one dependent load after the digests instead of two (measured on an H100 at 3.4 M keys x
// dim 128: the serial row-id read kept the find at 0.92x the cache's). Returns the row id, or -1 when absent.
template <int G>
__device__ __forceinline__ int32_t resident_probe(const FindArgs& a, int64_t base, int64_t key, uint8_t digest,
                                                  int glane, bool valid) {
  uint32_t bits = group_digest_matches<G>(a.digests, base, digest, glane, valid);
  if (!valid) return -1;
  while (bits) {
    const int j = __ffs(bits) - 1;
    const int64_t k = a.slot_keys[base + j];
    const int32_t r = a.slot_rows[base + j];
    if (k == key) return r;
    bits &= bits - 1;
  }
  return -1;
}

// The resident index's lookup of one key per group: its primary bucket, then - only where the primary lacks the key
// and is marked spilled - its secondary bucket. Every lane of the warp must call it (the probes' shuffles). Returns
// the key's row id, or -1. (The row is returned, not written through a reference: ptxas kept a referenced row on
// the stack - 24 bytes of local memory per thread in the find - and the resident find lost 4% on an H100.)
template <int G>
__device__ __forceinline__ int32_t resident_lookup(const FindArgs& a, uint64_t h, int64_t primary, int64_t key,
                                                   uint8_t digest, int glane, bool valid) {
  int32_t row = resident_probe<G>(a, primary * kBucketSize, key, digest, glane, valid);
  const bool second = valid && row < 0 && a.spill[primary] != 0;
  if (__any_sync(kFullMask, second)) {
    const int64_t b2 = second ? secondary_bucket_of(h, a.num_buckets, primary) : 0;
    const int32_t r2 = resident_probe<G>(a, b2 * kBucketSize, key, digest, glane, second);
    if (second) row = r2;
  }
  return row;
}

// A stored row into the output: float32 rows with the vector width fixed at compile time (the common case, kept
// as lean as before storage dtypes), compact rows with it chosen at run time (half the instantiations).
template <int G, bool kVec4, int32_t S, typename OutT>
__device__ __forceinline__ void group_out_row(OutT* dst, const void* src, int64_t dim, int glane, bool vec4) {
  if constexpr (S == kStoreFloat32) {
    group_decode_row<G, kVec4, S, OutT>(dst, src, dim, glane);
  } else if (vec4) {
    group_decode_row<G, true, S, OutT>(dst, src, dim, glane);
  } else {
    group_decode_row<G, false, S, OutT>(dst, src, dim, glane);
  }
}

template <typename key_t, int G, bool kVec4, int kMode, int32_t S, typename OutT>
__global__ void __launch_bounds__(kThreads, 4) find_kernel(const FindArgs a) {
  constexpr int kKeysPerWarp = kWarp / G;
  const int lane = lane_id();
  const int glane = lane % G;
  const key_t* __restrict__ keys = static_cast<const key_t*>(a.keys);
  // The clock is bumped by the last block; every hit of this call gets the bumped value.
  const int32_t lru_score = kMode == kFindCacheLRU ? score_from_clock(a.clock[0] + 1) : 0;
  const int64_t dim = a.dim;
  constexpr int64_t kElem = storage_elem_bytes(S);
  const int64_t row_bytes = stored_width(S, dim) * kElem;
  const uint8_t* __restrict__ values = static_cast<const uint8_t*>(a.values);
  const int64_t stride = total_warps() * kKeysPerWarp;
  // Warp-uniform loop: every lane reaches the shuffles and ballots; groups past n only take part in them.
  for (int64_t i0 = global_warp_id() * kKeysPerWarp; i0 < a.n; i0 += stride) {
    const int64_t i = i0 + lane / G;
    const bool valid = i < a.n;
    int64_t key = 0;
    uint64_t h = 0;
    int64_t b1 = 0;
    uint8_t digest = 0;
    if (valid) {
      key = static_cast<int64_t>(keys[i]);
      h = mix64(key_bits(key));
      b1 = bucket_of(h, a.num_buckets);
      digest = digest_of(h);
    }
    int64_t slot = -1;
    int64_t row = -1;
    if (kMode == kFindResident) {
      row = resident_lookup<G>(a, h, b1, key, digest, glane, valid);
      slot = row;  // only its sign is used below
    } else {
      const int j = group_probe<G>(a.slot_keys, a.digests, b1 * kBucketSize, key, digest, glane, valid);
      slot = j >= 0 ? b1 * kBucketSize + j : -1;
      row = slot;
    }
    const bool miss = valid && slot < 0;
    const unsigned leaders = __ballot_sync(kFullMask, miss && glane == 0);
    if (leaders != 0) {
      unsigned long long first = 0;
      if (lane == 0) {
        first = atomicAdd(reinterpret_cast<unsigned long long*>(a.ctrl + kCtrlMissCount),
                          static_cast<unsigned long long>(__popc(leaders)));
      }
      first = __shfl_sync(kFullMask, first, 0);
      if (miss && glane == 0 && a.miss_pos != nullptr) {
        const int64_t r = static_cast<int64_t>(first) + __popc(leaders & ((1u << lane) - 1u));
        a.miss_pos[r] = static_cast<int32_t>(i);
        a.miss_keys[r] = key;
      }
    }
    if (!valid) continue;
    OutT* dst = static_cast<OutT*>(a.out) + i * dim;
    if (miss) {
      if (kVec4 || a.vec4) {
        group_fill_row<G, true, OutT>(dst, a.default_value, dim, glane);
      } else {
        group_fill_row<G, false, OutT>(dst, a.default_value, dim, glane);
      }
      continue;
    }
    if (kMode != kFindResident && glane == 0) {
      if (kMode == kFindCacheLRU) {
        a.scores[slot] = lru_score;
      } else {
        lfu_bump_atomic(a.scores + slot);
      }
    }
    group_out_row<G, kVec4, S, OutT>(dst, values + row * row_bytes, dim, glane, a.vec4);
  }

  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();  // this block's miss entries (possibly in host memory) before its ticket
    const unsigned long long ticket =
        atomicAdd(reinterpret_cast<unsigned long long*>(a.ctrl + kCtrlBlocksDone), 1ull);
    if (ticket == gridDim.x - 1) {  // the last block: every other block has finished
      __threadfence();
      volatile int64_t* ctrl = a.ctrl;
      const int64_t misses = ctrl[kCtrlMissCount];
      ctrl[kCtrlPending] = misses;  // for a kernel that follows on the stream (the GPU-direct second level)
      ctrl[kCtrlMissCount] = 0;
      ctrl[kCtrlBlocksDone] = 0;
      ctrl[kCtrlLookups] = ctrl[kCtrlLookups] + 1;
      ctrl[kCtrlKeys] = ctrl[kCtrlKeys] + a.n;
      ctrl[kCtrlMisses] = ctrl[kCtrlMisses] + misses;
      if (kMode != kFindResident) a.clock[0] += 1;
      if (a.host_flag != nullptr) {
        volatile int64_t* flag = a.host_flag;
        flag[kFlagMisses] = misses;
        __threadfence_system();
        flag[kFlagSeq] = a.seq;
      }
    }
  }
}

template <typename key_t, int G, bool kVec4, int32_t S, typename OutT>
void launch_find_mode(const FindArgs& a, FindMode mode, cudaStream_t stream) {
  const unsigned grid = warp_grid((a.n + kWarp / G - 1) / (kWarp / G));
  switch (mode) {
    case kFindCacheLRU:
      find_kernel<key_t, G, kVec4, kFindCacheLRU, S, OutT><<<grid, kThreads, 0, stream>>>(a);
      break;
    case kFindCacheLFU:
      find_kernel<key_t, G, kVec4, kFindCacheLFU, S, OutT><<<grid, kThreads, 0, stream>>>(a);
      break;
    default:
      find_kernel<key_t, G, kVec4, kFindResident, S, OutT><<<grid, kThreads, 0, stream>>>(a);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// float32 rows: 4, 8 or 32 lanes per key and the vector width as template arguments; compact rows (a quarter to a
// half of the bytes per row): 8 lanes (32 where the digests are not aligned for 8), vector width at run time.
template <typename key_t, bool kVec4, int32_t S, typename OutT>
void launch_find_group(int group, const FindArgs& a, FindMode mode, cudaStream_t stream) {
  if constexpr (S == kStoreFloat32) {
    if (group == 4) return launch_find_mode<key_t, 4, kVec4, S, OutT>(a, mode, stream);
  }
  if (group == 32) return launch_find_mode<key_t, 32, kVec4, S, OutT>(a, mode, stream);
  return launch_find_mode<key_t, 8, kVec4, S, OutT>(a, mode, stream);
}

// ------------------------------------------------------------------------------------------ second level
// Probe: one group of G lanes per entry of the miss list (capacity n; entries past ctrl[kCtrlPending] only stage a
// sentinel): probe the second level's index as the resident find does and stage (row id, cache bucket, key,
// position) of every miss - row kNoRow for a key the second level lacks (it keeps the default row the find wrote;
// the host path caches those too, as HPS does). The rows are read by the gather below, in row-id order.
template <int G>
__global__ void __launch_bounds__(kThreads) second_level_probe_kernel(const SecondLevelArgs a) {
  constexpr int kKeysPerWarp = kWarp / G;
  const int lane = lane_id();
  const int glane = lane % G;
  const int64_t pending = a.ctrl[kCtrlPending];
  const int64_t m = pending < a.n ? pending : a.n;
  const int64_t stride = total_warps() * kKeysPerWarp;
  for (int64_t i0 = global_warp_id() * kKeysPerWarp; i0 < a.n; i0 += stride) {
    const int64_t j = i0 + lane / G;
    const bool valid = j < m;
    int64_t key = 0;
    uint64_t h = 0;
    int64_t b1 = 0;
    uint8_t digest = 0;
    if (valid) {
      key = a.miss_keys[j];
      h = mix64(key_bits(key));
      b1 = bucket_of(h, a.index.num_buckets);
      digest = digest_of(h);
    }
    // Every lane calls the lookup (its shuffles take the full warp); `valid` masks the result.
    const int64_t row = resident_lookup<G>(a.index, h, b1, key, digest, glane, valid);
    const bool hit = valid && row >= 0;
    const unsigned leaders = __ballot_sync(kFullMask, hit && glane == 0);
    if (lane == 0 && leaders != 0) {
      atomicAdd(reinterpret_cast<unsigned long long*>(a.ctrl + kCtrlSecondLevelHits),
                static_cast<unsigned long long>(__popc(leaders)));
    }
    if (j >= a.n || glane != 0) continue;
    a.stage_row[j] = hit ? row : kNoRow;
    a.stage_bucket[j] = valid ? bucket_of(h, a.cache_buckets) : a.cache_buckets;
    a.stage_key[j] = valid ? key : 0;
    a.stage_pos[j] = valid ? static_cast<int64_t>(a.miss_pos[j]) : 0;
  }
}

// Gather: the staged rows in ascending row id (sorted_row, order into the staged entries), a group of
// kGatherGroup lanes per row - so neighbouring warps read neighbouring host memory, which the bus serves at
// close to copy speed (gather_rows_cuda.cu measured 51 GB/s for consecutive ids, 20 GB/s for random ones).
constexpr int kGatherGroup = 8;
static_assert(kNoRow == kFillRow, "a staged entry without a row is inserted as the default row");

template <bool kVec4, int32_t S, typename OutT>
__global__ void __launch_bounds__(kThreads) second_level_gather_kernel(const SecondLevelArgs a) {
  constexpr int kRowsPerWarp = kWarp / kGatherGroup;
  const int glane = lane_id() % kGatherGroup;
  const int64_t dim = a.index.dim;
  const int64_t row_bytes = stored_row_bytes(S, dim);
  const uint8_t* values = static_cast<const uint8_t*>(a.index.values);
  const int64_t stride = total_warps() * kRowsPerWarp;
  for (int64_t q = global_warp_id() * kRowsPerWarp + lane_id() / kGatherGroup; q < a.n; q += stride) {
    const int64_t row = a.sorted_row[q];
    if (row == kNoRow) continue;  // sorted last: a key the second level lacks, or an entry past the misses
    const int64_t pos = a.stage_pos[a.order[q]];
    group_out_row<kGatherGroup, kVec4, S, OutT>(static_cast<OutT*>(a.out) + pos * dim, values + row * row_bytes, dim,
                                                glane, a.index.vec4);
  }
}

// ------------------------------------------------------------------------------------------------------- apply

constexpr int kApplyGroup = 8;  // lanes per row copied by the scatter and resident-write roles

// kUnit: bytes per lane access of the stored-row copies (insert, resident writes); vec4: the scatter's decode
// moves 4 elements per access.
template <int32_t S, typename OutT, int kUnit>
__global__ void __launch_bounds__(kThreads) apply_kernel(const ApplyArgs a, bool vec4, int64_t scatter_blocks,
                                                         int64_t insert_blocks, int64_t resident_blocks) {
  constexpr int kGroupsPerBlock = kThreads / kApplyGroup;
  const int glane = static_cast<int>(threadIdx.x) % kApplyGroup;
  const int64_t row_bytes = stored_row_bytes(S, a.dim);
  const uint8_t* rows = static_cast<const uint8_t*>(a.rows);
  int64_t block = blockIdx.x;
  if (block < scatter_blocks) {
    const int64_t stride = scatter_blocks * kGroupsPerBlock;
    for (int64_t j = block * kGroupsPerBlock + threadIdx.x / kApplyGroup; j < a.m; j += stride) {
      OutT* dst = static_cast<OutT*>(a.out) + static_cast<int64_t>(a.pos[j]) * a.dim;
      const uint8_t* src = rows + static_cast<int64_t>(a.inv[j]) * row_bytes;
      if (vec4) {
        group_decode_row<kApplyGroup, true, S, OutT>(dst, src, a.dim, glane);
      } else {
        group_decode_row<kApplyGroup, false, S, OutT>(dst, src, a.dim, glane);
      }
    }
    return;
  }
  block -= scatter_blocks;
  if (block < insert_blocks) {
    __shared__ unsigned long long block_counts[4];
    if (threadIdx.x < 4) block_counts[threadIdx.x] = 0;
    __syncthreads();
    insert_runs<int64_t, kUnit>(a.slot_keys, a.digests, a.scores, a.values, a.clock, a.ukeys, a.rows, nullptr,
                                nullptr, a.u, row_bytes, a.lru, a.num_buckets,
                                (block * kThreads + threadIdx.x) / kWarp, insert_blocks * kWarpsPerBlock,
                                block_counts, nullptr, nullptr, a.sketch, a.sketch_width);
    __syncthreads();
    if (threadIdx.x < 4 && block_counts[threadIdx.x]) {
      atomic_add_i64(a.counts + threadIdx.x, static_cast<int64_t>(block_counts[threadIdx.x]));
    }
    return;
  }
  block -= insert_blocks;
  if (block < resident_blocks) {
    const int64_t stride = resident_blocks * kGroupsPerBlock;
    const int64_t items = (a.row_ids != nullptr ? a.u : 0) + a.num_push;
    const int64_t writes = a.row_ids != nullptr ? a.u : 0;
    for (int64_t k = block * kGroupsPerBlock + threadIdx.x / kApplyGroup; k < items; k += stride) {
      if (k < writes) {
        const int32_t r = a.row_ids[k];
        if (r >= 0) {
          group_copy_bytes<kApplyGroup, kUnit>(static_cast<uint8_t*>(a.table_rows) + static_cast<int64_t>(r) * row_bytes,
                                               rows + k * row_bytes, row_bytes, glane);
        }
        continue;
      }
      const int64_t p = k - writes;
      const int64_t base = a.push_buckets[p] * kBucketSize;
      for (int s = glane; s < kBucketSize; s += kApplyGroup) {
        a.index_keys[base + s] = a.push_keys[p * kBucketSize + s];
        a.index_rows[base + s] = a.push_rows[p * kBucketSize + s];
        a.index_digests[base + s] = a.push_digests[p * kBucketSize + s];
      }
      if (glane == 0) a.index_spill[a.push_buckets[p]] = a.push_spill[p];
    }
  }
}

int64_t blocks_for_groups(int64_t items) {
  constexpr int64_t kGroupsPerBlock = kThreads / kApplyGroup;
  const int64_t want = (items + kGroupsPerBlock - 1) / kGroupsPerBlock;
  const int64_t cap = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
  return want < cap ? want : cap;
}

}  // namespace

void launch_second_level_probe(const SecondLevelArgs& a, cudaStream_t stream) {
  if (a.n == 0) return;
  const int group = find_group(a.n, a.index.dim, a.index.digests);
  const unsigned grid = warp_grid((a.n + kWarp / group - 1) / (kWarp / group));
  switch (group) {
    case 4:
      second_level_probe_kernel<4><<<grid, kThreads, 0, stream>>>(a);
      break;
    case 8:
      second_level_probe_kernel<8><<<grid, kThreads, 0, stream>>>(a);
      break;
    default:
      second_level_probe_kernel<32><<<grid, kThreads, 0, stream>>>(a);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_second_level_gather(const SecondLevelArgs& a, cudaStream_t stream) {
  if (a.n == 0) return;
  const unsigned grid = warp_grid((a.n + kWarp / kGatherGroup - 1) / (kWarp / kGatherGroup));
  SecondLevelArgs args = a;
  args.index.vec4 = stored_vec4(a.index.storage, a.index.dim, {a.index.values}, a.out, a.out_dtype);
  with_storage(a.index.storage, [&](auto st) {
    constexpr int32_t S = decltype(st)::value;
    with_out_type(a.out_dtype, [&](auto t) {
      using OutT = decltype(t);
      auto kernel = S == kStoreFloat32 && args.index.vec4 ? second_level_gather_kernel<true, S, OutT>
                                                          : second_level_gather_kernel<false, S, OutT>;
      kernel<<<grid, kThreads, 0, stream>>>(args);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_insert_sorted(const InsertSortedArgs& a, cudaStream_t stream) {
  if (a.n == 0) return;
  const unsigned grid = warp_grid(a.n);
  const int unit = copy_unit(a.row_bytes, {a.values, a.rows, a.fill_row});
  with_copy_unit(unit, [&](auto u) {
    constexpr int kUnit = decltype(u)::value;
    const auto go = [&](auto kernel, const auto* keys) {
      kernel<<<grid, kThreads, 0, stream>>>(a.slot_keys, a.digests, a.scores, a.values, a.clock, keys, a.rows,
                                            a.sorted_bucket, a.perm, a.n, a.row_bytes, a.lru, a.counts,
                                            a.num_buckets, a.row_of, a.fill_row, a.sketch, a.sketch_width);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (a.key_is_int64) {
      go(insert_runs_kernel<int64_t, kUnit>, static_cast<const int64_t*>(a.keys));
    } else {
      go(insert_runs_kernel<int32_t, kUnit>, static_cast<const int32_t*>(a.keys));
    }
  });
}

void launch_find(const FindArgs& a, FindMode mode, cudaStream_t stream) {
  FindArgs args = a;
  args.vec4 = stored_vec4(a.storage, a.dim, {a.values}, a.out, a.out_dtype);
  const int group = find_group(a.n, a.dim, a.digests);
  with_storage(a.storage, [&](auto st) {
    constexpr int32_t S = decltype(st)::value;
    with_out_type(a.out_dtype, [&](auto t) {
      using OutT = decltype(t);
      // Compact rows take the vector width from args.vec4 at run time (kVec4 false: one instantiation).
      const bool vec4 = S == kStoreFloat32 && args.vec4;
      if (a.key_is_int64) {
        if (vec4) {
          launch_find_group<int64_t, true, S, OutT>(group, args, mode, stream);
        } else {
          launch_find_group<int64_t, false, S, OutT>(group, args, mode, stream);
        }
      } else {
        if (vec4) {
          launch_find_group<int32_t, true, S, OutT>(group, args, mode, stream);
        } else {
          launch_find_group<int32_t, false, S, OutT>(group, args, mode, stream);
        }
      }
    });
  });
}

void launch_apply(const ApplyArgs& a, cudaStream_t stream) {
  const int64_t scatter_blocks = a.m > 0 ? blocks_for_groups(a.m) : 0;
  const int64_t insert_blocks = a.ukeys != nullptr && a.u > 0 ? static_cast<int64_t>(warp_grid(a.u)) : 0;
  const int64_t resident_items = (a.row_ids != nullptr ? a.u : 0) + a.num_push;
  const int64_t resident_blocks = resident_items > 0 ? blocks_for_groups(resident_items) : 0;
  const int64_t grid = scatter_blocks + insert_blocks + resident_blocks;
  if (grid == 0) return;
  const bool vec4 = stored_vec4(a.storage, a.dim, {a.rows}, a.out, a.out_dtype);
  const int unit = copy_unit(stored_row_bytes(a.storage, a.dim), {a.rows, a.values, a.table_rows});
  with_storage(a.storage, [&](auto st) {
    constexpr int32_t S = decltype(st)::value;
    with_out_type(a.out_dtype, [&](auto t) {
      using OutT = decltype(t);
      with_row_unit<S>(unit, [&](auto u) {
        constexpr int kUnit = decltype(u)::value;
        apply_kernel<S, OutT, kUnit><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
            a, vec4, scatter_blocks, insert_blocks, resident_blocks);
      });
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------------------------------------------- ops

namespace {

FindOutputs cache_find_misses_cuda(const at::Tensor& slot_keys, const at::Tensor& digests, at::Tensor& scores,
                                   const at::Tensor& values, at::Tensor& clock, const at::Tensor& keys,
                                   int64_t policy, double default_value) {
  HPS_CHECK_CUDA(slot_keys);
  FindArgs a = cache_find_args(slot_keys, digests, scores, values, clock, keys, policy, default_value);
  const c10::cuda::CUDAGuard guard(slot_keys.device());
  const FindMode mode = policy == kPolicyLRU ? kFindCacheLRU : kFindCacheLFU;
  return run_find_op(a, keys,
                     [&](const FindArgs& args) { launch_find(args, mode, at::cuda::getCurrentCUDAStream()); });
}

FindOutputs resident_find_cuda(const at::Tensor& index_keys, const at::Tensor& index_digests,
                               const at::Tensor& index_rows, const at::Tensor& index_spill, const at::Tensor& rows,
                               const at::Tensor& keys, double default_value) {
  HPS_CHECK_CUDA(index_keys);
  FindArgs a = resident_find_args(index_keys, index_digests, index_rows, index_spill, rows, keys, default_value);
  const c10::cuda::CUDAGuard guard(index_keys.device());
  return run_find_op(a, keys, [&](const FindArgs& args) {
    launch_find(args, kFindResident, at::cuda::getCurrentCUDAStream());
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(hps, CUDA, m) {
  m.impl("cache_find_misses", &cache_find_misses_cuda);
  m.impl("resident_find", &resident_find_cuda);
}

}  // namespace cuda
}  // namespace hps
