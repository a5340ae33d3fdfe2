// CPU twin of gather_rows: out[i] = table[rows[i]], zero rows for ids outside the table.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "checks.h"

namespace hps {
namespace {

at::Tensor gather_rows_cpu(const at::Tensor& table, const at::Tensor& rows, int64_t strategy) {
  TORCH_CHECK_VALUE(strategy >= 0 && strategy <= 2, "strategy must be 0 (auto), 1 (zero-copy) or 2 (staged), found ",
                    strategy);  // the CPU has one way: all three give the same rows
  HPS_CHECK_CPU(table);
  HPS_CHECK_CPU(rows);
  HPS_CHECK_DTYPE(table, at::kFloat);
  HPS_CHECK_DIM(table, 2);
  HPS_CHECK_CONTIGUOUS(table);
  HPS_CHECK_DTYPE(rows, at::kLong);
  HPS_CHECK_DIM(rows, 1);
  const at::Tensor r = rows.contiguous();
  const int64_t n = r.size(0), num_rows = table.size(0), dim = table.size(1);
  at::Tensor out = at::empty({n, dim}, table.options());
  if (n == 0 || dim == 0) return out;
  const float* src = table.data_ptr<float>();
  const int64_t* idx = r.data_ptr<int64_t>();
  float* dst = out.data_ptr<float>();
  const size_t row_bytes = static_cast<size_t>(dim) * sizeof(float);
  at::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = idx[i];
      if (row >= 0 && row < num_rows) {
        std::memcpy(dst + i * dim, src + row * dim, row_bytes);
      } else {
        std::memset(dst + i * dim, 0, row_bytes);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hps, CPU, m) { m.impl("gather_rows", &gather_rows_cpu); }

}  // namespace hps
