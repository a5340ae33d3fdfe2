// CPU twin of cache_find: hits decoded out (float32; a float32 cache's rows copied), found mask, LRU/LFU score of
// each hit touched (hps_ops.cpp contract).
//
// Parallel decomposition: at::parallel_for over the query keys; each key probes its bucket on its own. Scores are
// the only shared writes: an LRU hit stores the one clock value of this call (every writer stores the same value),
// an LFU hit adds one with a saturating CAS, so duplicates in a batch give the same result in any interleaving.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "cpu/cache_cpu_common.h"
#include "cpu/stored_row_copy.h"

namespace hps {
namespace {

constexpr int64_t kAhead = cpu::kFindAhead;
constexpr int64_t kRing = cpu::kFindRing;
constexpr int64_t kGrain = cpu::kFindGrain;

// One key between pipeline stages.
struct Pending {
  int64_t key;
  int64_t base;   // first slot of its bucket
  uint32_t mask;  // digest matches in the bucket (stage 2)
  uint8_t digest;
};

std::tuple<at::Tensor, at::Tensor> cache_find_cpu(const at::Tensor& slot_keys, const at::Tensor& digests,
                                                  at::Tensor& scores,             // (S,) int32, touched
                                                  const at::Tensor& values,       // (S, W) stored rows
                                                  at::Tensor& clock,              // (1,) int64, bumped if n > 0
                                                  const at::Tensor& keys,         // (n,) int32|int64
                                                  int64_t policy) {
  const int64_t num_buckets = cpu::check_cpu_state(slot_keys, digests, scores, values, clock);
  check_policy(policy);
  check_query_keys(keys, slot_keys);
  const int32_t storage = storage_of(values, "values");
  const int64_t n = keys.size(0);
  const int64_t dim = dim_of_width(storage, values.size(1));
  // Every entry of both outputs is written below (rows of misses zeroed there), so no zero-fill pass first.
  at::Tensor out = at::empty({n, dim}, values.options().dtype(at::kFloat));  // (n, D)
  at::Tensor found = at::empty({n}, keys.options().dtype(at::kBool));        // (n,)
  if (n == 0) return {out, found};  // an empty call does not bump the clock

  int64_t* clk = clock.data_ptr<int64_t>();
  *clk += 1;
  const int32_t lru_score = cpu::score_from_clock(*clk);
  const bool lru = policy == kPolicyLRU;

  const int64_t* sk = slot_keys.data_ptr<int64_t>();
  const uint8_t* dg = digests.data_ptr<uint8_t>();
  int32_t* sc = scores.data_ptr<int32_t>();
  const uint8_t* val = static_cast<const uint8_t*>(values.data_ptr());
  float* o = out.data_ptr<float>();
  bool* f = found.data_ptr<bool>();
  const size_t row_bytes = static_cast<size_t>(stored_row_bytes(storage, dim));
  const size_t out_row_bytes = static_cast<size_t>(dim) * sizeof(float);
  const bool streaming = cpu::use_streaming_stores(o, n, dim);  // a large output: skip read-for-ownership

  with_storage(storage, [&](auto storage_c) {
    constexpr int32_t S = decltype(storage_c)::value;
    AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "cache_find_cpu", [&] {
      const index_t* kp = keys.data_ptr<index_t>();
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
        // Three-stage software pipeline over the keys of this chunk, kAhead keys apart, so that ~2*kAhead
        // independent cache misses are in flight instead of one chain of dependent misses per key:
        //   stage 1 (key i):            hash, prefetch the bucket's digest line;
        //   stage 2 (key i - kAhead):   compare the 32 digests, prefetch the first candidate's key, row and score;
        //   stage 3 (key i - 2*kAhead): confirm the key, decode (or zero) the row, touch the score.
        Pending ring[kRing];
        for (int64_t i = begin; i < end + 2 * kAhead; ++i) {
          if (i < end) {
            const cpu::KeyHash k = cpu::hash_key(static_cast<int64_t>(kp[i]), num_buckets);
            Pending& p = ring[i & (kRing - 1)];
            p.key = k.key;
            p.base = k.base;
            p.digest = k.digest;
            __builtin_prefetch(dg + k.base, 0, 3);
          }
          const int64_t j = i - kAhead;
          if (j >= begin && j < end) {
            Pending& p = ring[j & (kRing - 1)];
            p.mask = cpu::digest_mask(dg + p.base, p.digest);
            if (p.mask != 0) {
              // The first digest match is the key's slot unless a false digest match (1/255 per occupied slot)
              // precedes it; prefetching only that one is right almost always and costs nothing when wrong.
              const int64_t s = p.base + __builtin_ctz(p.mask);
              __builtin_prefetch(sk + s, 0, 3);
              const char* row = reinterpret_cast<const char*>(val + s * row_bytes);
              for (size_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(row + off, 0, 3);
              __builtin_prefetch(row + row_bytes - 1, 0, 3);
              __builtin_prefetch(sc + s, 1, 3);
            }
          }
          const int64_t m = i - 2 * kAhead;
          if (m >= begin) {
            const Pending& p = ring[m & (kRing - 1)];
            const int64_t s = cpu::confirm(sk, p.base, p.mask, p.key);
            f[m] = s >= 0;
            if (s < 0) {
              std::memset(o + m * dim, 0, out_row_bytes);
              continue;
            }
            cpu::decode_row<S>(o + m * dim, val + s * row_bytes, dim, streaming);
            if (lru) {
              __atomic_store_n(sc + s, lru_score, __ATOMIC_RELAXED);
            } else {
              cpu::lfu_bump_atomic(sc + s);
            }
          }
        }
        if (streaming) cpu::streaming_fence();  // this task's streamed rows visible before the join
      });
    });
  });
  return {out, found};
}

}  // namespace

TORCH_LIBRARY_IMPL(hps, CPU, m) {
  m.impl("cache_find", &cache_find_cpu);
}

}  // namespace hps
