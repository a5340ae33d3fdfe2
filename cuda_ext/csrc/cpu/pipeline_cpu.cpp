// CPU twins of the lookup-pipeline ops: compact_misses, scatter_rows, bag_reduce (hps_ops.cpp contract; the CUDA
// twins in cuda/pipeline_cuda.cu give identical results, bit for bit, bag_reduce included).
//
// compact_misses: one pass collects the miss positions in order; the miss keys (widened to int64) are sorted
// stably with their miss index, runs of equal keys give the unique keys (ascending) and each miss's inverse index.
// Buffer tails past the counts are zero on both devices (the contract leaves them unspecified; zeros keep the op
// deterministic, which opcheck and the parity tests rely on).
// scatter_rows: validates every index it will use before writing anything, then copies rows in parallel.
// bag_reduce: parallel over bags; inside a bag the elements are accumulated in float32 in input order, each
// product and sum rounded separately (no fused multiply-add), then divided (mean) or divided by a correctly rounded
// square root (sqrtn) - the same operation sequence as the CUDA twin, so both agree bitwise.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "checks.h"
#include "pipeline_checks.h"

// NOTE: bag_reduce must not contract w * v + acc into an FMA (the CUDA twin rounds the product and the sum
// separately). x86-64 builds without -mfma never contract; this keeps it so under -march=native or on aarch64.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace hps {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> compact_misses_cpu(
    const at::Tensor& keys,    // (n,) int32|int64
    const at::Tensor& found) {  // (n,) bool
  HPS_CHECK_CPU(keys);
  check_keys_found(keys, found);
  const int64_t n = keys.size(0);
  const auto opts = keys.options().dtype(at::kLong);
  at::Tensor unique_keys = at::zeros({n}, opts);  // (n,) int64, first counts[1] valid
  at::Tensor positions = at::zeros({n}, opts);    // (n,) int64, first counts[0] valid
  at::Tensor inverse = at::zeros({n}, opts);      // (n,) int64, first counts[0] valid
  at::Tensor counts = at::zeros({2}, opts);       // [misses, unique]
  if (n == 0) return {unique_keys, positions, inverse, counts};

  const at::Tensor k = keys.contiguous();
  const at::Tensor f = found.contiguous();
  const bool* fp = f.data_ptr<bool>();
  int64_t* pos = positions.data_ptr<int64_t>();
  // (key, miss index): sorting the pairs is a stable sort of the keys.
  std::vector<std::pair<int64_t, int64_t>> miss;
  miss.reserve(static_cast<size_t>(n));
  AT_DISPATCH_INDEX_TYPES(k.scalar_type(), "compact_misses_cpu", [&] {
    const index_t* kp = k.data_ptr<index_t>();
    for (int64_t i = 0; i < n; ++i) {
      if (fp[i]) continue;
      pos[miss.size()] = i;
      miss.emplace_back(static_cast<int64_t>(kp[i]), static_cast<int64_t>(miss.size()));
    }
  });
  std::sort(miss.begin(), miss.end());
  int64_t* uk = unique_keys.data_ptr<int64_t>();
  int64_t* inv = inverse.data_ptr<int64_t>();
  int64_t unique = 0;
  for (size_t s = 0; s < miss.size(); ++s) {
    if (s == 0 || miss[s].first != miss[s - 1].first) uk[unique++] = miss[s].first;
    inv[miss[s].second] = unique - 1;
  }
  int64_t* c = counts.data_ptr<int64_t>();
  c[0] = static_cast<int64_t>(miss.size());
  c[1] = unique;
  return {unique_keys, positions, inverse, counts};
}

void scatter_rows_cpu(at::Tensor& out,               // (n, D) float32, rows at positions overwritten
                      const at::Tensor& positions,   // (cap,) int64
                      const at::Tensor& inverse,     // (cap,) int64
                      const at::Tensor& rows,        // (u, D) float32
                      const at::Tensor& counts) {    // (2,) int64: [misses, unique]
  HPS_CHECK_CPU(out);
  check_scatter_rows_args(out, positions, inverse, rows, counts);
  const at::Tensor cnt = counts.contiguous();
  const int64_t m = cnt.data_ptr<int64_t>()[0];
  TORCH_CHECK_VALUE(m >= 0 && m <= positions.size(0), "counts[0] (misses) must be in [0, ", positions.size(0),
                    "], found ", m);
  if (m == 0) return;
  const at::Tensor p = positions.contiguous();
  const at::Tensor inv = inverse.contiguous();
  const at::Tensor r = rows.contiguous();
  const int64_t* pp = p.data_ptr<int64_t>();
  const int64_t* ip = inv.data_ptr<int64_t>();
  const int64_t n_out = out.size(0);
  const int64_t u = r.size(0);
  for (int64_t i = 0; i < m; ++i) {  // validate all before writing anything
    TORCH_CHECK_VALUE(pp[i] >= 0 && pp[i] < n_out, "positions[", i, "] must be in [0, ", n_out, "), found ", pp[i]);
    TORCH_CHECK_VALUE(ip[i] >= 0 && ip[i] < u, "inverse[", i, "] must be in [0, ", u, "), found ", ip[i]);
  }
  const int64_t dim = out.size(1);
  const size_t row_bytes = static_cast<size_t>(dim) * sizeof(float);
  float* o = out.data_ptr<float>();
  const float* rp = r.data_ptr<float>();
  at::parallel_for(0, m, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) std::memcpy(o + pp[i] * dim, rp + ip[i] * dim, row_bytes);
  });
}

at::Tensor bag_reduce_cpu(const at::Tensor& values,                  // (n, D) float32
                          const at::Tensor& offsets,                 // (B + 1,) int64
                          const std::optional<at::Tensor>& weights_opt,  // (n,) float32 or None
                          int64_t mode) {                            // 0 sum, 1 mean, 2 sqrtn
  HPS_CHECK_CPU(values);
  const bool has_w = check_bag_reduce_args(values, offsets, weights_opt, mode);
  const int64_t n = values.size(0);
  const at::Tensor off = offsets.contiguous();
  const int64_t* op = off.data_ptr<int64_t>();
  const int64_t bags = off.size(0) - 1;
  TORCH_CHECK_VALUE(op[0] >= 0, "offsets[0] must be >= 0, found ", op[0]);
  for (int64_t b = 0; b < bags; ++b) {
    TORCH_CHECK_VALUE(op[b] <= op[b + 1], "offsets must be non-decreasing, found offsets[", b, "]=", op[b],
                      " > offsets[", b + 1, "]=", op[b + 1]);
  }
  TORCH_CHECK_VALUE(op[bags] == n, "offsets[B] must equal the number of values ", n, ", found ", op[bags]);

  const int64_t dim = values.size(1);
  at::Tensor out = at::zeros({bags, dim}, values.options());  // (B, D)
  if (bags == 0 || dim == 0) return out;
  const at::Tensor v = values.contiguous();
  const at::Tensor w = has_w ? weights_opt->contiguous() : at::Tensor();
  const float* vp = v.data_ptr<float>();
  const float* wp = has_w ? w.data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  at::parallel_for(0, bags, 64, [&](int64_t b_begin, int64_t b_end) {
    for (int64_t b = b_begin; b < b_end; ++b) {
      float* acc = o + b * dim;  // zero-initialised
      float sw = 0.f;
      float sw2 = 0.f;
      for (int64_t i = op[b]; i < op[b + 1]; ++i) {
        const float wi = wp ? wp[i] : 1.f;
        const float* row = vp + i * dim;
        for (int64_t d = 0; d < dim; ++d) acc[d] += wi * row[d];
        sw += wi;
        sw2 += wi * wi;
      }
      if (mode == 0) continue;
      const float divisor = mode == 1 ? sw : std::sqrt(sw2);
      if (divisor == 0.f || op[b] == op[b + 1]) {  // empty bag or zero divisor: zeros
        std::fill(acc, acc + dim, 0.f);
        continue;
      }
      for (int64_t d = 0; d < dim; ++d) acc[d] = acc[d] / divisor;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hps, CPU, m) {
  m.impl("compact_misses", &compact_misses_cpu);
  m.impl("scatter_rows", &scatter_rows_cpu);
  m.impl("bag_reduce", &bag_reduce_cpu);
}

}  // namespace hps
