// Helpers shared by the CPU cache kernels (cache_*_cpu.cpp): the bucket probe and the score rules.
// Header only, included by the CPU kernel files; the CUDA twins use cache_layout.h directly.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "cache_layout.h"
#include "cache_state.h"
#include "checks.h"

namespace hps {
namespace cpu {

constexpr int32_t kScoreMax = std::numeric_limits<int32_t>::max();
constexpr int32_t kScoreMin = std::numeric_limits<int32_t>::min();

// Hash of one key, computed once and used for both the bucket and the digest.
struct KeyHash {
  int64_t key;     // the key widened to int64 (sign extension)
  int64_t base;    // first slot of its bucket
  uint8_t digest;  // never kEmptyDigest
};

inline KeyHash hash_key(int64_t key, int64_t num_buckets) {
  const uint64_t h = mix64(key_bits(key));
  return {key, bucket_of(h, num_buckets) * kBucketSize, digest_of(h)};
}

// Slot holding the key, or -1. A slot matches iff its digest equals the key's digest AND its stored key equals
// the key (the digest is only a filter); the lowest matching slot wins (a bucket never holds a key twice).
// The 32 digests are compared first into a bit mask (a loop without early exit, which the compiler vectorises);
// only the slots whose digest matches have their 8-byte key read.
// Bit j of the result is set iff bucket_digests[j] == digest (the 32 digests of one bucket). SSE2 (baseline on
// x86-64): two 16-byte compares + movemask; elsewhere a loop without early exit that the compiler vectorises.
inline uint32_t digest_mask(const uint8_t* bucket_digests, uint8_t digest) {
  static_assert(kBucketSize == 32, "the probe mask is 32 bits");
#if defined(__SSE2__)
  const __m128i want = _mm_set1_epi8(static_cast<char>(digest));
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bucket_digests));
  const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bucket_digests + 16));
  const uint32_t mlo = static_cast<uint32_t>(_mm_movemask_epi8(_mm_cmpeq_epi8(lo, want)));
  const uint32_t mhi = static_cast<uint32_t>(_mm_movemask_epi8(_mm_cmpeq_epi8(hi, want)));
  return mlo | (mhi << 16);
#else
  uint32_t mask = 0;
  for (int j = 0; j < 32; ++j) mask |= static_cast<uint32_t>(bucket_digests[j] == digest) << j;
  return mask;
#endif
}

// First slot of the candidates in `mask` (digest matches of the bucket at `base`) whose stored key is `key`, or -1.
inline int64_t confirm(const int64_t* slot_keys, int64_t base, uint32_t mask, int64_t key) {
  while (mask != 0) {
    const int j = __builtin_ctz(mask);
    if (slot_keys[base + j] == key) return base + j;
    mask &= mask - 1;
  }
  return -1;
}

inline int64_t probe(const int64_t* slot_keys, const uint8_t* digests, const KeyHash& k) {
  uint32_t mask = digest_mask(digests + k.base, k.digest);
  while (mask != 0) {
    const int j = __builtin_ctz(mask);
    if (slot_keys[k.base + j] == k.key) return k.base + j;
    mask &= mask - 1;
  }
  return -1;
}

// LRU score of a touch at `clock`: the clock, saturated to the int32 score range. The engine halves the clock
// before it reaches kClockLimit (2^30), so saturation only guards state written by hand.
inline int32_t score_from_clock(int64_t clock) {
  if (clock > kScoreMax) return kScoreMax;
  if (clock < kScoreMin) return kScoreMin;
  return static_cast<int32_t>(clock);
}

// LFU hit: +1, saturating at INT32_MAX. Atomic (CAS loop) because duplicate keys in one find batch may be
// served by different threads; the final score is min(old + hits, INT32_MAX) whatever the interleaving.
inline void lfu_bump_atomic(int32_t* score) {
  int32_t cur = __atomic_load_n(score, __ATOMIC_RELAXED);
  while (cur != kScoreMax &&
         !__atomic_compare_exchange_n(score, &cur, cur + 1, /*weak=*/true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
}

// Admission sketch (cache_layout.h): the estimate of a key (hash h) - the minimum of its kSketchDepth counters.
inline int32_t sketch_estimate(const int32_t* sketch, int64_t width, uint64_t h) {
  int32_t m = INT32_MAX;
  for (int64_t d = 0; d < kSketchDepth; ++d) {
    const int32_t c = __atomic_load_n(sketch + d * width + sketch_index(h, d, width), __ATOMIC_RELAXED);
    m = c < m ? c : m;
  }
  return m;
}

// The finds' software pipeline (cache_find_cpu.cpp, lookup_cpu.cpp): keys between stages, the ring of in-flight
// keys (a power of two, > 2 * kFindAhead), and keys per parallel_for task (long enough that the pipeline's fill and
// drain, 2 * kFindAhead keys, are negligible).
constexpr int64_t kFindAhead = 8;
constexpr int64_t kFindRing = 32;
constexpr int64_t kFindGrain = 2048;
static_assert(kFindRing > 2 * kFindAhead && (kFindRing & (kFindRing - 1)) == 0, "ring must hold three stages");

// Every entry point: state checks (cache_state.h) plus "on the CPU". Returns num_buckets.
inline int64_t check_cpu_state(const at::Tensor& slot_keys, const at::Tensor& digests, const at::Tensor& scores,
                               const at::Tensor& values, const at::Tensor& clock) {
  HPS_CHECK_CPU(slot_keys);
  return check_cache_state(slot_keys, digests, scores, values, clock);
}

// The partial-state checks of cache_state.h plus "on the CPU" (for ops that take only part of the state).
inline int64_t check_cpu_digests(const at::Tensor& digests) {
  HPS_CHECK_CPU(digests);
  return check_digests(digests);
}

inline int64_t check_cpu_keys_digests(const at::Tensor& slot_keys, const at::Tensor& digests) {
  HPS_CHECK_CPU(slot_keys);
  return check_keys_digests(slot_keys, digests);
}

}  // namespace cpu
}  // namespace hps
