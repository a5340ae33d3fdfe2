// CPU twin of hash_keys: bucket and digest of each key (cache_layout.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cache_layout.h"
#include "checks.h"

namespace hps {
namespace {

std::tuple<at::Tensor, at::Tensor> hash_keys_cpu(const at::Tensor& keys, int64_t num_buckets) {
  HPS_CHECK_CPU(keys);
  HPS_CHECK_KEY_DTYPE(keys);
  HPS_CHECK_DIM(keys, 1);
  TORCH_CHECK_VALUE(num_buckets > 0 && num_buckets < (int64_t(1) << 32),
                    "num_buckets must be in [1, 2^32), found ", num_buckets);
  const at::Tensor k = keys.contiguous();
  const int64_t n = k.numel();
  at::Tensor bucket = at::empty({n}, k.options().dtype(at::kLong));
  at::Tensor digest = at::empty({n}, k.options().dtype(at::kByte));
  int64_t* b = bucket.data_ptr<int64_t>();
  uint8_t* d = digest.data_ptr<uint8_t>();
  AT_DISPATCH_INDEX_TYPES(k.scalar_type(), "hash_keys_cpu", [&] {
    const index_t* kp = k.data_ptr<index_t>();
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const uint64_t h = mix64(key_bits(static_cast<int64_t>(kp[i])));
        b[i] = bucket_of(h, num_buckets);
        d[i] = digest_of(h);
      }
    });
  });
  return {bucket, digest};
}

}  // namespace

TORCH_LIBRARY_IMPL(hps, CPU, m) { m.impl("hash_keys", &hash_keys_cpu); }

}  // namespace hps
