// CPU twins of cache_erase, cache_clear and cache_decay (hps_ops.cpp contract).
//
// erase: probes run in parallel (read-only), slots are freed in one sequential pass so a key given twice is
// erased once and counted once. A freed slot gets digest 0 and score 0; its key and row are left as they are
// (slot_keys and values are not mutable in this op's schema, and an empty slot's key/row mean nothing).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu/cache_cpu_common.h"

namespace hps {
namespace {

at::Tensor cache_erase_cpu(const at::Tensor& slot_keys,  // (S,) int64
                           at::Tensor& digests,          // (S,) uint8, freed slots -> 0
                           at::Tensor& scores,           // (S,) int32, freed slots -> 0
                           const at::Tensor& keys)       // (n,) int32|int64
{
  const int64_t num_buckets = cpu::check_cpu_keys_digests(slot_keys, digests);
  check_scores(scores, digests);
  check_query_keys(keys, slot_keys);
  at::Tensor count = at::zeros({}, slot_keys.options());  // 0-d: slots freed
  const int64_t n = keys.size(0);
  if (n == 0) return count;

  const int64_t* sk = slot_keys.data_ptr<int64_t>();
  uint8_t* dg = digests.data_ptr<uint8_t>();
  int32_t* sc = scores.data_ptr<int32_t>();
  std::vector<int64_t> slot(static_cast<size_t>(n));
  AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "cache_erase_cpu", [&] {
    const index_t* kp = keys.data_ptr<index_t>();
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        slot[i] = cpu::probe(sk, dg, cpu::hash_key(static_cast<int64_t>(kp[i]), num_buckets));
      }
    });
  });
  int64_t erased = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = slot[i];
    if (s < 0 || dg[s] == kEmptyDigest) continue;  // a miss, or a duplicate whose slot is already freed
    dg[s] = kEmptyDigest;
    sc[s] = 0;
    ++erased;
  }
  count.fill_(erased);
  return count;
}

// clear: every slot empty, scores and clock zero; keys and rows are left (meaningless once the digest is empty).
void cache_clear_cpu(at::Tensor& digests, at::Tensor& scores, at::Tensor& clock) {
  cpu::check_cpu_digests(digests);
  check_scores(scores, digests);
  check_clock(clock, scores);
  digests.zero_();
  scores.zero_();
  clock.zero_();
}

// decay: scores >>= 1 (an arithmetic shift: floor(score / 2), also for a negative hand-written score); for LRU the
// clock is halved as well, so new touches still outrank every halved score and the recency order is kept (ties
// may appear between neighbours). LFU leaves the clock alone: LFU scores never read it.
void cache_decay_cpu(at::Tensor& scores, at::Tensor& clock, int64_t policy) {
  HPS_CHECK_CPU(scores);
  HPS_CHECK_DTYPE(scores, at::kInt);
  HPS_CHECK_DIM(scores, 1);
  HPS_CHECK_CONTIGUOUS(scores);
  check_clock(clock, scores);
  check_policy(policy);
  int32_t* sc = scores.data_ptr<int32_t>();
  at::parallel_for(0, scores.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) sc[i] >>= 1;
  });
  if (policy == kPolicyLRU) clock.data_ptr<int64_t>()[0] >>= 1;
}

}  // namespace

TORCH_LIBRARY_IMPL(hps, CPU, m) {
  m.impl("cache_erase", &cache_erase_cpu);
  m.impl("cache_clear", &cache_clear_cpu);
  m.impl("cache_decay", &cache_decay_cpu);
}

}  // namespace hps
