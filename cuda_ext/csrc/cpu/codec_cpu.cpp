// CPU twin of the row codec ops (cuda/codec_cuda.cu): encode_rows, decode_rows - row_codec.h's functions over a
// tensor, a task per block of rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "codec_ops.h"

namespace hps {
namespace {

at::Tensor encode_rows_cpu(const at::Tensor& rows, int64_t storage) {
  HPS_CHECK_CPU(rows);
  at::Tensor out = encoded_output(rows, storage);
  const int64_t n = rows.size(0), dim = rows.size(1);
  if (n == 0) return out;
  encode_rows_into(static_cast<int32_t>(storage), rows.data_ptr<float>(), n, dim, out.data_ptr());
  return out;
}

at::Tensor decode_rows_cpu(const at::Tensor& stored, std::optional<at::ScalarType> dtype) {
  HPS_CHECK_CPU(stored);
  const int64_t dim = check_stored(stored, "stored");
  const int32_t out_code = out_dtype_code(dtype);
  const int64_t n = stored.size(0);
  at::Tensor out = at::empty({n, dim}, stored.options().dtype(dtype.value_or(at::kFloat)));
  if (n == 0 || dim == 0) return out;
  const uint8_t* src = static_cast<const uint8_t*>(stored.data_ptr());
  void* dst = out.data_ptr();
  with_storage(storage_of(stored, "stored"), [&](auto s) {
    constexpr int32_t S = decltype(s)::value;
    with_out_code(out_code, [&](auto o) {
      constexpr int32_t O = decltype(o)::value;
      const int64_t row_bytes = stored_row_bytes(S, dim);
      at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const uint8_t* row = src + i * row_bytes;
          const float scale = storage_tail_bytes(S) > 0 ? row_tail_float(row, dim, 0) : 0.f;
          const float bias = S == kStoreInt8 ? row_tail_float(row, dim, 1) : 0.f;
          for (int64_t c = 0; c < dim; ++c) put_out<O>(dst, i * dim + c, decode_elem<S>(row, c, scale, bias));
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hps, CPU, m) {
  m.impl("encode_rows", &encode_rows_cpu);
  m.impl("decode_rows", &decode_rows_cpu);
}

}  // namespace hps
