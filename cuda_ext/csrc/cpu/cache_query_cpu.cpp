// CPU twins of the read-only cache ops: cache_contains, cache_size, cache_export_batch (hps_ops.cpp contract).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "cpu/cache_cpu_common.h"

namespace hps {
namespace {

// contains: found mask; the find probe without touching scores or the clock. Parallel over keys.
at::Tensor cache_contains_cpu(const at::Tensor& slot_keys, const at::Tensor& digests,
                              const at::Tensor& keys) {  // (n,) int32|int64 -> (n,) bool
  const int64_t num_buckets = cpu::check_cpu_keys_digests(slot_keys, digests);
  check_query_keys(keys, slot_keys);
  const int64_t n = keys.size(0);
  at::Tensor found = at::zeros({n}, keys.options().dtype(at::kBool));
  if (n == 0) return found;
  const int64_t* sk = slot_keys.data_ptr<int64_t>();
  const uint8_t* dg = digests.data_ptr<uint8_t>();
  bool* f = found.data_ptr<bool>();
  AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "cache_contains_cpu", [&] {
    const index_t* kp = keys.data_ptr<index_t>();
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        f[i] = cpu::probe(sk, dg, cpu::hash_key(static_cast<int64_t>(kp[i]), num_buckets)) >= 0;
      }
    });
  });
  return found;
}

// size: occupied slots (digest != 0), 0-d int64.
at::Tensor cache_size_cpu(const at::Tensor& digests) {
  cpu::check_cpu_digests(digests);
  const uint8_t* dg = digests.data_ptr<uint8_t>();
  const int64_t slots = digests.size(0);
  const int64_t occupied = at::parallel_reduce(
      0, slots, 1 << 16, int64_t(0),
      [&](int64_t begin, int64_t end, int64_t acc) {
        for (int64_t i = begin; i < end; ++i) acc += dg[i] != kEmptyDigest;
        return acc;
      },
      [](int64_t a, int64_t b) { return a + b; });
  return at::full({}, occupied, digests.options().dtype(at::kLong));
}

// export_batch: occupied slots of [start, end) in slot order, packed at the front of (end - start)-capacity
// buffers; the tail past `count` is zero. Rows leave as the cache's stored rows (bytes copied, not decoded).
// Sequential scan (slot order is the contract).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cache_export_batch_cpu(const at::Tensor& slot_keys,  // (S,) int64
                                                                      const at::Tensor& digests,    // (S,) uint8
                                                                      const at::Tensor& values,     // (S, W) stored
                                                                      int64_t start, int64_t end) {
  cpu::check_cpu_keys_digests(slot_keys, digests);
  check_values(values, slot_keys);
  const int64_t slots = slot_keys.size(0);
  TORCH_CHECK_VALUE(0 <= start && start <= end && end <= slots, "export_batch needs 0 <= start <= end <= slots (",
                    slots, "), found start=", start, ", end=", end);
  const int64_t cap = end - start;
  at::Tensor out_keys = at::zeros({cap}, slot_keys.options());                 // (end - start,) int64
  at::Tensor out_values = at::zeros({cap, values.size(1)}, values.options());  // (end - start, W) stored
  const int64_t* sk = slot_keys.data_ptr<int64_t>();
  const uint8_t* dg = digests.data_ptr<uint8_t>();
  const uint8_t* val = static_cast<const uint8_t*>(values.data_ptr());
  int64_t* ok = out_keys.data_ptr<int64_t>();
  uint8_t* ov = static_cast<uint8_t*>(out_values.data_ptr());
  const size_t row_bytes = static_cast<size_t>(stored_row_bytes_of(values));
  int64_t count = 0;
  for (int64_t s = start; s < end; ++s) {
    if (dg[s] == kEmptyDigest) continue;
    ok[count] = sk[s];
    std::memcpy(ov + count * row_bytes, val + s * row_bytes, row_bytes);
    ++count;
  }
  return {out_keys, out_values, at::full({}, count, slot_keys.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(hps, CPU, m) {
  m.impl("cache_contains", &cache_contains_cpu);
  m.impl("cache_size", &cache_size_cpu);
  m.impl("cache_export_batch", &cache_export_batch_cpu);
}

}  // namespace hps
