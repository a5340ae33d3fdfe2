// CPU twin of the row codec ops (cuda/codec_cuda.cu): encode_rows, decode_rows - row_codec.h's functions over a
// tensor, a task per block of rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "codec_ops.h"
#include "cpu/stored_row_copy.h"

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
  at::Tensor out = decoded_output(stored, dtype);
  const int64_t n = out.size(0), dim = out.size(1);
  if (n == 0 || dim == 0) return out;
  const uint8_t* src = static_cast<const uint8_t*>(stored.data_ptr());
  with_storage(storage_of(stored, "stored"), [&](auto s) {
    constexpr int32_t S = decltype(s)::value;
    cpu::with_out_type(out_dtype_of(out.scalar_type()), [&](auto t) {
      using OutT = decltype(t);
      OutT* dst = static_cast<OutT*>(out.data_ptr());
      const int64_t row_bytes = stored_row_bytes(S, dim);
      at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) cpu::decode_row<S>(dst + i * dim, src + i * row_bytes, dim, false);
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
