// CPU twin of cache_find: hits copied out, found mask, LRU/LFU score of each hit touched (hps_ops.cpp contract).
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

namespace hps {
namespace {

std::tuple<at::Tensor, at::Tensor> cache_find_cpu(const at::Tensor& slot_keys, const at::Tensor& digests,
                                                  at::Tensor& scores,             // (S,) int32, touched
                                                  const at::Tensor& values,       // (S, D) float32
                                                  at::Tensor& clock,              // (1,) int64, bumped if n > 0
                                                  const at::Tensor& keys,         // (n,) int32|int64
                                                  int64_t policy) {
  const int64_t num_buckets = cpu::check_cpu_state(slot_keys, digests, scores, values, clock);
  check_policy(policy);
  check_query_keys(keys, slot_keys);
  const int64_t n = keys.size(0);
  const int64_t dim = values.size(1);
  // Every entry of both outputs is written below (rows of misses zeroed there), so no zero-fill pass first.
  at::Tensor out = at::empty({n, dim}, values.options());              // (n, D)
  at::Tensor found = at::empty({n}, keys.options().dtype(at::kBool));  // (n,)
  if (n == 0) return {out, found};  // an empty call does not bump the clock

  int64_t* clk = clock.data_ptr<int64_t>();
  *clk += 1;
  const int32_t lru_score = cpu::score_from_clock(*clk);
  const bool lru = policy == kPolicyLRU;

  const int64_t* sk = slot_keys.data_ptr<int64_t>();
  const uint8_t* dg = digests.data_ptr<uint8_t>();
  int32_t* sc = scores.data_ptr<int32_t>();
  const float* val = values.data_ptr<float>();
  float* o = out.data_ptr<float>();
  bool* f = found.data_ptr<bool>();
  const size_t row_bytes = static_cast<size_t>(dim) * sizeof(float);

  AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "cache_find_cpu", [&] {
    const index_t* kp = keys.data_ptr<index_t>();
    at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const cpu::KeyHash k = cpu::hash_key(static_cast<int64_t>(kp[i]), num_buckets);
        const int64_t s = cpu::probe(sk, dg, k);
        f[i] = s >= 0;
        if (s < 0) {
          std::memset(o + i * dim, 0, row_bytes);
          continue;
        }
        std::memcpy(o + i * dim, val + s * dim, row_bytes);
        if (lru) {
          __atomic_store_n(sc + s, lru_score, __ATOMIC_RELAXED);
        } else {
          cpu::lfu_bump_atomic(sc + s);
        }
      }
    });
  });
  return {out, found};
}

}  // namespace

TORCH_LIBRARY_IMPL(hps, CPU, m) {
  m.impl("cache_find", &cache_find_cpu);
}

}  // namespace hps
