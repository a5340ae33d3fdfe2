// Helpers shared by the CUDA cache kernels (cache_*_cuda.cu) and the pipeline kernels: input checks that mirror
// the CPU twins' (cpu/cache_cpu_common.h, same messages), the warp-wide bucket probe, warp row copies and the
// score rules. Header only; the hash, bucket and digest come from cache_layout.h, shared with the CPU.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <limits>

#include "cache_layout.h"
#include "cache_state.h"
#include "checks.h"

namespace hps {
namespace cuda {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr int kThreads = 256;  // 8 warps per block for the warp-per-item kernels
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr int32_t kScoreMax = std::numeric_limits<int32_t>::max();
constexpr int32_t kScoreMin = std::numeric_limits<int32_t>::min();

static_assert(kBucketSize == kWarp, "the CUDA kernels map one bucket slot to one lane of a warp");

// ----------------------------------------------------------------------------------------------------------------
// Input checks (host side): cache_state.h's, plus "on CUDA".

inline int64_t check_cuda_state(const at::Tensor& slot_keys, const at::Tensor& digests, const at::Tensor& scores,
                                const at::Tensor& values, const at::Tensor& clock) {
  HPS_CHECK_CUDA(slot_keys);
  return check_cache_state(slot_keys, digests, scores, values, clock);
}

inline int64_t check_cuda_digests(const at::Tensor& digests) {
  HPS_CHECK_CUDA(digests);
  return check_digests(digests);
}

inline int64_t check_cuda_keys_digests(const at::Tensor& slot_keys, const at::Tensor& digests) {
  HPS_CHECK_CUDA(slot_keys);
  return check_keys_digests(slot_keys, digests);
}

// Blocks for a warp-per-item kernel over `items` (> 0) items. The kernels loop grid-stride, so the cap only
// bounds the launch; 64 warps per SM keep every SM full.
inline unsigned warp_grid(int64_t items) {
  const int64_t want = (items + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t cap = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8 * 64;
  return static_cast<unsigned>(want < cap ? want : cap);
}

// Blocks for a thread-per-item kernel.
inline unsigned thread_grid(int64_t items, int threads = kThreads) {
  const int64_t want = (items + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 64;
  return static_cast<unsigned>(want < cap ? want : cap);
}

// Rows can be moved with 16-byte accesses iff the dim is a multiple of 4 floats and every base pointer is 16-byte
// aligned (then every row start is too, since a row is dim * 4 bytes).
inline bool rows_vec4(int64_t dim, std::initializer_list<const void*> ptrs) {
  if (dim % 4 != 0) return false;
  for (const void* p : ptrs) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

// ----------------------------------------------------------------------------------------------------------------
// Device helpers.

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) & (kWarp - 1); }

__device__ __forceinline__ int64_t global_warp_id() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
}

__device__ __forceinline__ int64_t total_warps() { return static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp; }

// LRU score of a touch at `clock`, saturated to the int32 score range (as cpu::score_from_clock).
__device__ __forceinline__ int32_t score_from_clock(int64_t clock) {
  if (clock > kScoreMax) return kScoreMax;
  if (clock < kScoreMin) return kScoreMin;
  return static_cast<int32_t>(clock);
}

// LFU hit: +1 saturating at INT32_MAX. CAS loop, so duplicates served by different warps give min(old + hits, MAX)
// in any interleaving, the same final score as the CPU twin.
__device__ __forceinline__ void lfu_bump_atomic(int32_t* score) {
  int32_t cur = *reinterpret_cast<volatile int32_t*>(score);
  while (cur != kScoreMax) {
    const int32_t prev = atomicCAS(score, cur, cur + 1);
    if (prev == cur) break;
    cur = prev;
  }
}

// Loads of a bucket's 32 digests by a group of G lanes: each lane reads 32 / G consecutive digests in one access.
template <int G>
struct DigestWord;
template <>
struct DigestWord<32> {
  using type = uint8_t;
};
template <>
struct DigestWord<16> {
  using type = uint16_t;
};
template <>
struct DigestWord<8> {
  using type = uint32_t;
};
template <>
struct DigestWord<4> {
  using type = unsigned long long;
};

// Digest alignment a group of G lanes needs (each lane's 32 / G digests are one naturally aligned access).
inline bool digests_aligned_for(int group, const void* digests) {
  return reinterpret_cast<uintptr_t>(digests) % static_cast<uintptr_t>(kWarp / group) == 0;
}

// Lanes per key, measured on an H200 (16.8 M slots at 0.6 load, all hits; G keys/s by lanes per key 4/8/16/32):
//   dim 128: 3.4 M keys 2.89/2.86/2.63/2.01, 26 K keys 0.98/1.49/1.18/1.42;
//   dim 16:  3.4 M keys 7.02/6.51/4.81/2.84, 26 K keys 1.23/1.73/1.21/1.55.
// Eight lanes keep several keys' loads in flight per warp; four win only on large batches of narrow rows. Digests
// not aligned for the group's wide load (a sliced state tensor) fall back to the whole warp.
inline int find_group(int64_t n, int64_t dim, const void* digests) {
  const int group = (dim < 64 && n >= (int64_t(1) << 17)) ? 4 : 8;
  return digests_aligned_for(group, digests) ? group : kWarp;
}

// Probe of one bucket by a group of G consecutive lanes (G = 32: the whole warp). The group's lanes read the
// bucket's 32 digests in one coalesced access (one 32-byte sector), OR their match bits together with G-wide
// shuffles, and only the digest matches (about 1 + 31/255 of them) cost a read of the slot's key. Returns the slot
// index in the bucket (lowest match, as the CPU) or -1, the same in every lane of the group. All 32 lanes of the
// warp must call it (the shuffles); a lane with valid == false only takes part in them.
template <int G>
__device__ __forceinline__ uint32_t group_digest_matches(const uint8_t* __restrict__ digests, int64_t base,
                                                         uint8_t digest, int glane, bool valid) {
  constexpr int kPer = kWarp / G;  // digests per lane
  using word_t = typename DigestWord<G>::type;
  uint32_t bits = 0;
  if (valid) {
    const word_t w = reinterpret_cast<const word_t*>(digests + base)[glane];
#pragma unroll
    for (int b = 0; b < kPer; ++b) {  // little-endian: byte b of the word is slot glane * kPer + b
      if (static_cast<uint8_t>(static_cast<unsigned long long>(w) >> (8 * b)) == digest) {
        bits |= 1u << (glane * kPer + b);
      }
    }
  }
#pragma unroll
  for (int off = G / 2; off > 0; off >>= 1) bits |= __shfl_xor_sync(kFullMask, bits, off, G);
  return bits;
}

template <int G>
__device__ __forceinline__ int group_probe(const int64_t* __restrict__ slot_keys, const uint8_t* __restrict__ digests,
                                           int64_t base, int64_t key, uint8_t digest, int glane, bool valid) {
  uint32_t bits = group_digest_matches<G>(digests, base, digest, glane, valid);
  if (!valid) return -1;
  while (bits) {
    const int j = __ffs(bits) - 1;
    if (slot_keys[base + j] == key) return j;
    bits &= bits - 1;
  }
  return -1;
}

template <int kUnit>
struct UnitWord;
template <>
struct UnitWord<16> {
  using type = uint4;
};
template <>
struct UnitWord<4> {
  using type = uint32_t;
};
template <>
struct UnitWord<2> {
  using type = uint16_t;
};

// One row of row_bytes (a multiple of kUnit) copied as it is by a group of G lanes, kUnit bytes per lane access. Up
// to 4 loads per lane are issued before their stores, so several accesses are in flight per lane.
template <int G, int kUnit>
__device__ __forceinline__ void group_copy_bytes(void* __restrict__ dst, const void* __restrict__ src,
                                                 int64_t row_bytes, int glane) {
  using W = typename UnitWord<kUnit>::type;
  constexpr int kUnroll = 4;
  const W* s = static_cast<const W*>(src);
  W* d = static_cast<W*>(dst);
  const int64_t n = row_bytes / kUnit;
  for (int64_t c = glane; c < n; c += kUnroll * G) {
    W r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (c + u * G < n) r[u] = s[c + u * G];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (c + u * G < n) d[c + u * G] = r[u];
    }
  }
}

// A row of `dim` floats: 16-byte accesses with kVec4 (callers pick it with rows_vec4()), else 4-byte ones - the
// same walk as group_copy_bytes, kept apart on purpose: written as group_copy_bytes<G, 16>(dst, src, dim * 4) the
// LFU find kernels spilled 12 bytes per thread (ptxas, sm_90), this form none.
template <int G, bool kVec4>
__device__ __forceinline__ void group_copy_row(float* __restrict__ dst, const float* __restrict__ src, int64_t dim,
                                               int glane) {
  constexpr int kUnroll = 4;
  if (kVec4) {
    const float4* s = reinterpret_cast<const float4*>(src);
    float4* d = reinterpret_cast<float4*>(dst);
    const int64_t n4 = dim >> 2;
    for (int64_t c = glane; c < n4; c += kUnroll * G) {
      float4 r[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (c + u * G < n4) r[u] = s[c + u * G];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (c + u * G < n4) d[c + u * G] = r[u];
      }
    }
  } else {
    for (int64_t c = glane; c < dim; c += kUnroll * G) {
      float r[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (c + u * G < dim) r[u] = src[c + u * G];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (c + u * G < dim) dst[c + u * G] = r[u];
      }
    }
  }
}

template <int G, bool kVec4>
__device__ __forceinline__ void group_zero_row(float* __restrict__ dst, int64_t dim, int glane) {
  if (kVec4) {
    float4* d = reinterpret_cast<float4*>(dst);
    const int64_t n4 = dim >> 2;
    for (int64_t c = glane; c < n4; c += G) d[c] = make_float4(0.f, 0.f, 0.f, 0.f);
  } else {
    for (int64_t c = glane; c < dim; c += G) dst[c] = 0.f;
  }
}

// Whole-warp forms (G = 32), used by the kernels that give a warp one key or one row.
template <bool kVec4>
__device__ __forceinline__ void warp_copy_row(float* __restrict__ dst, const float* __restrict__ src, int64_t dim,
                                              int lane) {
  group_copy_row<kWarp, kVec4>(dst, src, dim, lane);
}

// Warp minimum of a 64-bit value (all lanes get it).
__device__ __forceinline__ uint64_t warp_min_u64(uint64_t v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const uint64_t o = __shfl_xor_sync(kFullMask, v, off);
    v = o < v ? o : v;
  }
  return v;
}

__device__ __forceinline__ void atomic_add_i64(int64_t* p, int64_t v) {
  atomicAdd(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v));
}

}  // namespace cuda
}  // namespace hps

namespace hps {
namespace cuda {

// ----------------------------------------------------------------------------------------------------------------
// Sequential-contract support for the writing ops (insert_or_assign, assign, erase): keys are grouped by bucket
// with a STABLE sort, so one warp can walk each bucket's keys in input order and reproduce the CPU's one-at-a-time
// result exactly. Buckets are independent, so different runs need no ordering between them.

template <typename key_t>
__global__ void bucket_of_keys_kernel(const key_t* __restrict__ keys, int64_t n, int64_t num_buckets,
                                      int64_t* __restrict__ bucket) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    bucket[i] = bucket_of(mix64(key_bits(static_cast<int64_t>(keys[i]))), num_buckets);
  }
}

// (n,) keys (n > 0) -> (sorted bucket (n,) int64, perm (n,) int64): perm[p] is the input index of the p-th key in
// bucket order, input order within a bucket (stable sort, no host sync).
inline std::tuple<at::Tensor, at::Tensor> sort_keys_by_bucket(const at::Tensor& keys, int64_t num_buckets) {
  const int64_t n = keys.numel();
  at::Tensor bucket = at::empty({n}, keys.options().dtype(at::kLong));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "hps_bucket_of_keys", [&] {
    bucket_of_keys_kernel<index_t><<<thread_grid(n), kThreads, 0, stream>>>(keys.data_ptr<index_t>(), n,
                                                                            num_buckets, bucket.data_ptr<int64_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return at::sort(bucket, /*stable=*/true, /*dim=*/0, /*descending=*/false);
}

// True for the warp whose sorted position p starts a run of equal buckets (warp-uniform).
__device__ __forceinline__ bool starts_run(const int64_t* __restrict__ sorted_bucket, int64_t p) {
  return p == 0 || sorted_bucket[p - 1] != sorted_bucket[p];
}

}  // namespace cuda
}  // namespace hps
