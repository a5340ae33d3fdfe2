// Shared by the CPU and CUDA twins of the cache ops: the slot layout, the key hash and the score rules.
// Everything that decides *where* a key lives or *which* slot is evicted is defined here once, so the
// two devices cannot drift apart.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define HPS_HD __host__ __device__ __forceinline__
#else
#define HPS_HD inline
#endif

namespace hps {

// One bucket = 32 slots: on the GPU one warp compares a whole bucket in one step (a lane per slot).
constexpr int64_t kBucketSize = 32;

// Occupancy lives in a separate uint8 digest per slot (0 = empty, 1..255 = a hash byte of the key),
// so every int64 key value - including INT64_MAX and INT64_MIN - is a valid key.
constexpr uint8_t kEmptyDigest = 0;

// Score policies: LRU scores are a logical clock (bumped once per find call); LFU scores count hits.
constexpr int64_t kPolicyLRU = 0;
constexpr int64_t kPolicyLFU = 1;

// The engine halves LRU scores (and the clock) before the clock reaches this, so int32 scores never wrap.
constexpr int64_t kClockLimit = int64_t(1) << 30;

// splitmix64 finalizer: a full-avalanche mix of the key's 64 bits.
HPS_HD uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

// Bucket from the high 32 bits (multiply-shift range reduction, no modulo), digest from the low 8 bits.
HPS_HD int64_t bucket_of(uint64_t h, int64_t num_buckets) {
  return static_cast<int64_t>(((h >> 32) * static_cast<uint64_t>(num_buckets)) >> 32);
}

HPS_HD uint8_t digest_of(uint64_t h) {
  const uint8_t d = static_cast<uint8_t>(h & 0xFFu);
  return d == kEmptyDigest ? uint8_t(1) : d;
}

// Keys of either dtype are widened to int64 by sign extension: int32 key -5 and int64 key -5 are one key.
HPS_HD uint64_t key_bits(int64_t key) { return static_cast<uint64_t>(key); }

// Admission (LFU caches with a frequency sketch, TinyLFU-style): a count-min sketch of kSketchDepth rows of `width`
// int32 counters (width a power of two; the sketch tensor is (kSketchDepth * width,), row d at d * width) counts how
// often each key was looked up while it was not cached. An insert that must evict admits the key only if its
// estimate (the minimum of its kSketchDepth counters) is above the victim's LFU score - so a key seen once cannot
// push out a hot one - and gives an admitted key its estimate as its score (its history so far).
constexpr int64_t kSketchDepth = 4;

// Sketch width for a cache of `slots` slots: the next power of two >= 4 x slots, and at least 2^16 - a small cache
// still sees many distinct keys between two ageings (100 x slots lookups), and a narrow sketch lets their collisions
// pass for frequency (measured on a 1,024-slot cache, Zipf 0.8: 4 x slots lost to plain LFU).
HPS_HD int64_t sketch_width_for(int64_t slots) {
  int64_t width = int64_t(1) << 16;
  while (width < 4 * slots) width <<= 1;
  return width;
}

// Counter of key hash h (h = mix64(key_bits(key))) in sketch row d: an independent mix per row.
HPS_HD int64_t sketch_index(uint64_t h, int64_t d, int64_t width) {
  return static_cast<int64_t>(mix64(h + static_cast<uint64_t>(d + 1) * 0x9E3779B97F4A7C15ull) &
                              static_cast<uint64_t>(width - 1));
}

}  // namespace hps
