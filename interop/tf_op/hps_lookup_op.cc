// The TensorFlow op `HpsLookup`: embedding lookup served by the HPS engine (a Python/torch object) from inside a
// TF graph, so a SavedModel holding it needs nothing but this op and its attributes.
//
// The kernel knows nothing about tables: it wraps the ids in a DLPack tensor (zero-copy, TF's own buffer) and calls
// one C callback that `interop.tf_op.serve` registers (`hps_tf_register_lookup_callback`; `interop.tf_plugin`
// attaches it at import). The callback returns the embeddings as a DLPack tensor that the kernel adopts as its
// output without copying (a TensorBuffer whose destructor calls the DLPack deleter). Errors come back as a TF error
// code + message and are raised as TF errors; nothing here aborts the process.
//
// Serving without Python (Triton's TensorFlow backend, TF Serving, a C++ loader): when the first lookup finds no
// callback, the library starts the interpreter it was built with (embedded_python.h) and imports
// `interop.tf_op.serve`, which registers the callback; the server then starts from the graph's ps_config_file.
// One lookup path in both cases: the engine, its tiers and its checks are the Python ones.
//
// Built by interop/tf_op/build.py with g++ and tf.sysconfig's flags against the installed TensorFlow.

#include "embedded_python.h"  // first: Python.h must precede the standard headers

#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "dlpack/dlpack.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor.h"

extern "C" int hps_tf_op_abi_version();

namespace {

using tensorflow::DataType;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;

// Bumped whenever the callback signature changes; the Python side checks it before registering.
constexpr int kAbiVersion = 2;
// TF's Eigen kernels need this alignment (EIGEN_MAX_ALIGN_BYTES) on every buffer they read.
constexpr uintptr_t kAlignment = 64;
constexpr int64_t kErrorCapacity = 4096;

// Returns 0 on success, else a TF error code (absl::StatusCode numbering) with a NUL-terminated message in `err`.
// `keys` is owned by the callee (torch.from_dlpack takes it). On success `*result` holds a float32 tensor of shape
// keys.shape + [emb_vec_size] whose ownership passes to the caller.
typedef int (*HpsLookupCallback)(const char* model_name, int64_t table_id, int64_t emb_vec_size,
                                 const char* ps_config_file, int64_t global_batch_size, DLManagedTensor* keys,
                                 DLManagedTensor** result, char* err, int64_t err_capacity);

std::atomic<HpsLookupCallback> g_callback{nullptr};

// The native route (no Python per call): `route` names the engine's CPU lookup pipeline of an op's table (a handle
// >= 0, or -1: no route - the table has no cache, or the op's arguments fail a check the callback will report), and
// `lookup` runs it on the op's ids into the op's output buffer (hps_native_lookup in the engine's extension:
// 0, kNativeStale when the handle is gone - route again - or an absl status code with a message).
typedef int64_t (*HpsRouteCallback)(const char* model_name, int64_t table_id, int64_t emb_vec_size,
                                    const char* ps_config_file, int64_t global_batch_size, int key_is_int64);
typedef int (*HpsNativeLookup)(int64_t handle, const void* keys, int64_t n, int key_is_int64, float* out, char* err,
                               int64_t err_capacity);
std::atomic<HpsRouteCallback> g_route{nullptr};
std::atomic<HpsNativeLookup> g_native_lookup{nullptr};
constexpr int kNativeStale = -1;
constexpr int64_t kRouteUnknown = -2;

// ---------------------------------------------------------------------------------------------- keys -> DLPack

// Keeps the input Tensor (a reference on its buffer) and the shape array alive as long as the DLPack consumer does.
struct KeysContext {
  Tensor tensor;
  std::vector<int64_t> shape;
  DLManagedTensor managed;
};

void DeleteKeys(DLManagedTensor* self) { delete static_cast<KeysContext*>(self->manager_ctx); }

DLManagedTensor* KeysToDLPack(const Tensor& ids) {
  auto* ctx = new KeysContext;
  ctx->tensor = ids;  // shares the buffer: no copy
  const int rank = ids.dims();
  ctx->shape.resize(rank);
  for (int d = 0; d < rank; ++d) ctx->shape[d] = ids.dim_size(d);
  DLTensor& t = ctx->managed.dl_tensor;
  t.data = const_cast<char*>(ids.tensor_data().data());
  t.device = DLDevice{kDLCPU, 0};
  t.ndim = rank;
  t.dtype = DLDataType{kDLInt, static_cast<uint8_t>(ids.dtype() == tensorflow::DT_INT64 ? 64 : 32), 1};
  t.shape = rank ? ctx->shape.data() : nullptr;
  t.strides = nullptr;  // compact row-major
  t.byte_offset = 0;
  ctx->managed.manager_ctx = ctx;
  ctx->managed.deleter = DeleteKeys;
  return &ctx->managed;
}

// ---------------------------------------------------------------------------------------------- DLPack -> output

// A TF buffer over memory owned by a DLPack producer (torch); releasing the last TF reference calls its deleter.
class DLPackBuffer : public tensorflow::TensorBuffer {
 public:
  DLPackBuffer(DLManagedTensor* managed, size_t bytes)
      : tensorflow::TensorBuffer(static_cast<char*>(managed->dl_tensor.data) + managed->dl_tensor.byte_offset),
        managed_(managed),
        bytes_(bytes) {}
  ~DLPackBuffer() override {
    if (managed_->deleter != nullptr) managed_->deleter(managed_);
  }
  size_t size() const override { return bytes_; }
  TensorBuffer* root_buffer() override { return this; }
  void FillAllocationDescription(tensorflow::AllocationDescription* proto) const override {
    proto->set_requested_bytes(static_cast<int64_t>(bytes_));
    proto->set_allocator_name("hps_dlpack");
  }
  // NOTE: false keeps TF from forwarding this buffer to a later op as its (in-place) output: the memory belongs to
  // torch, and TF must only read it.
  bool OwnsMemory() const override { return false; }

 private:
  DLManagedTensor* managed_;
  size_t bytes_;
};

bool IsCompactRowMajor(const DLTensor& t) {
  if (t.strides == nullptr) return true;
  int64_t expected = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    if (t.shape[d] != 1 && t.strides[d] != expected) return false;
    expected *= t.shape[d];
  }
  return true;
}

// ---------------------------------------------------------------------------------------------- the op

REGISTER_OP("HpsLookup")
    .Input("ids: Tids")
    .Output("emb_vector: float")
    .Attr("Tids: {int32, int64}")
    .Attr("model_name: string")
    .Attr("table_id: int >= 0")
    .Attr("emb_vec_size: int >= 1")
    .Attr("ps_config_file: string = ''")
    .Attr("global_batch_size: int >= 1 = 1")
    // Stateful: the values can change between calls (table updates), so TF must neither constant-fold nor
    // de-duplicate two calls.
    .SetIsStateful()
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      int64_t dim;
      TF_RETURN_IF_ERROR(c->GetAttr("emb_vec_size", &dim));
      tensorflow::shape_inference::ShapeHandle out;
      TF_RETURN_IF_ERROR(c->Concatenate(c->input(0), c->Vector(dim), &out));
      c->set_output(0, out);
      return absl::OkStatus();
    })
    .Doc(R"doc(
Embeddings of `ids` from the hierarchical parameter server (model `model_name`, table `table_id`).

ids: int32 or int64 keys of any shape (int32 iff the deployment's key type is int32).
emb_vector: float32, shape ids.shape + [emb_vec_size].
ps_config_file: when non-empty and the server is not started yet, it is started from this file (implicit init).
)doc");

class HpsLookupOp : public OpKernel {
 public:
  explicit HpsLookupOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("model_name", &model_name_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("table_id", &table_id_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("emb_vec_size", &emb_vec_size_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("ps_config_file", &ps_config_file_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("global_batch_size", &global_batch_size_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& ids = ctx->input(0);
    TensorShape out_shape = ids.shape();
    out_shape.AddDim(emb_vec_size_);
    if (NativeLookup(ctx, ids, out_shape)) return;

    HpsLookupCallback callback = g_callback.load(std::memory_order_acquire);
    if (callback == nullptr) {
      // No Python module attached one: start (or enter) the interpreter and let interop.tf_op.serve attach.
      const std::string problem = hps::EnsureServeModule(reinterpret_cast<const void*>(&hps_tf_op_abi_version));
      callback = g_callback.load(std::memory_order_acquire);
      OP_REQUIRES(ctx, callback != nullptr,
                  tensorflow::errors::FailedPrecondition(
                      "HpsLookup: no lookup callback in this process and the op library could not start one: ",
                      problem.empty() ? std::string("interop.tf_op.serve attached none") : problem));
    }

    DLManagedTensor* keys = KeysToDLPack(ids);
    DLManagedTensor* result = nullptr;
    std::string err(kErrorCapacity, '\0');
    const int code = callback(model_name_.c_str(), table_id_, emb_vec_size_, ps_config_file_.c_str(),
                              global_batch_size_, keys, &result, err.data(), kErrorCapacity);
    if (code != 0) {
      if (result != nullptr && result->deleter != nullptr) result->deleter(result);
      Fail(ctx, code, err);
      return;
    }
    OP_REQUIRES(ctx, result != nullptr,
                tensorflow::errors::Internal("HpsLookup: the lookup callback returned no tensor"));
    AdoptResult(ctx, result, out_shape);
  }

 private:
  // A failed lookup's status: its code and the message the engine wrote into `err` (NUL-terminated).
  void Fail(OpKernelContext* ctx, int code, const std::string& err) const {
    ctx->SetStatus(absl::Status(static_cast<absl::StatusCode>(code), "HpsLookup(" + model_name_ + ", table " +
                                                                        std::to_string(table_id_) +
                                                                        "): " + err.c_str()));
  }

  // The lookup through the engine's native call, when the table has a route: true when it ran (the output or the
  // error is set), false to take the callback (no route yet or any more, or no native entry registered).
  bool NativeLookup(OpKernelContext* ctx, const Tensor& ids, const TensorShape& out_shape) {
    HpsNativeLookup native = g_native_lookup.load(std::memory_order_acquire);
    if (native == nullptr) return false;
    const int key_is_int64 = ids.dtype() == tensorflow::DT_INT64 ? 1 : 0;
    int64_t handle = route_.load(std::memory_order_acquire);
    if (handle == kRouteUnknown) {
      HpsRouteCallback route = g_route.load(std::memory_order_acquire);
      if (route == nullptr) return false;
      handle = route(model_name_.c_str(), table_id_, emb_vec_size_, ps_config_file_.c_str(), global_batch_size_,
                     key_is_int64);
      // No route (-1) is not cached: the callback reports why, and a later Init may give one.
      if (handle < 0) return false;
      route_.store(handle, std::memory_order_release);
    }
    // A temporary that becomes the output (no copy) only when the lookup ran: a stale route leaves the output
    // unset for the callback.
    Tensor out;
    const tensorflow::Status allocated = ctx->allocate_temp(tensorflow::DT_FLOAT, out_shape, &out);
    if (!allocated.ok()) {
      ctx->SetStatus(allocated);
      return true;
    }
    std::string err(kErrorCapacity, '\0');
    const int code = native(handle, ids.tensor_data().data(), ids.NumElements(), key_is_int64,
                            out.flat<float>().data(), err.data(), kErrorCapacity);
    if (code == kNativeStale) {  // the server was closed or replaced: route again through Python
      route_.store(kRouteUnknown, std::memory_order_release);
      return false;
    }
    if (code != 0) {
      Fail(ctx, code, err);
      return true;
    }
    ctx->set_output(0, out);
    return true;
  }

  // Takes ownership of `result`: becomes the output without a copy when it is a compact, aligned float32 CPU tensor
  // of the right shape; a strided or misaligned one is copied; anything else is an Internal error.
  void AdoptResult(OpKernelContext* ctx, DLManagedTensor* result, const TensorShape& out_shape) {
    const DLTensor& t = result->dl_tensor;
    std::string problem;
    if (t.device.device_type != kDLCPU) {
      problem = "is not a CPU tensor";
    } else if (t.dtype.code != kDLFloat || t.dtype.bits != 32 || t.dtype.lanes != 1) {
      problem = "is not float32";
    } else if (t.ndim != out_shape.dims()) {
      problem = "has rank " + std::to_string(t.ndim) + ", expected " + std::to_string(out_shape.dims());
    } else {
      for (int d = 0; d < t.ndim; ++d) {
        if (t.shape[d] != out_shape.dim_size(d)) {
          problem = "has shape mismatch at dim " + std::to_string(d) + ": " + std::to_string(t.shape[d]) +
                    " != " + std::to_string(out_shape.dim_size(d));
          break;
        }
      }
    }
    if (!problem.empty()) {
      if (result->deleter != nullptr) result->deleter(result);
      ctx->SetStatus(tensorflow::errors::Internal("HpsLookup: the lookup callback's result ", problem));
      return;
    }
    const int64_t n = out_shape.num_elements();
    const char* data = static_cast<const char*>(t.data) + t.byte_offset;
    const bool aligned = n == 0 || reinterpret_cast<uintptr_t>(data) % kAlignment == 0;
    if (n > 0 && aligned && IsCompactRowMajor(t)) {
      auto* buffer = new DLPackBuffer(result, static_cast<size_t>(n) * sizeof(float));
      Tensor out(tensorflow::DT_FLOAT, out_shape, buffer);
      buffer->Unref();  // `out` holds the one reference now
      ctx->set_output(0, out);
      return;
    }
    Tensor* out = nullptr;
    tensorflow::Status st = ctx->allocate_output(0, out_shape, &out);
    if (!st.ok()) {
      if (result->deleter != nullptr) result->deleter(result);
      ctx->SetStatus(st);
      return;
    }
    if (n > 0) {
      float* dst = out->flat<float>().data();
      if (IsCompactRowMajor(t)) {
        std::memcpy(dst, data, static_cast<size_t>(n) * sizeof(float));
      } else {  // general strided gather, element by element (rare: the plugin hands over contiguous tensors)
        const float* src = reinterpret_cast<const float*>(data);
        std::vector<int64_t> index(t.ndim, 0);
        for (int64_t i = 0; i < n; ++i) {
          int64_t offset = 0;
          for (int d = 0; d < t.ndim; ++d) offset += index[d] * t.strides[d];
          dst[i] = src[offset];
          for (int d = t.ndim - 1; d >= 0; --d) {
            if (++index[d] < t.shape[d]) break;
            index[d] = 0;
          }
        }
      }
    }
    if (result->deleter != nullptr) result->deleter(result);
  }

  std::atomic<int64_t> route_{kRouteUnknown};  // the engine pipeline handle of this op's table
  std::string model_name_;
  int64_t table_id_;
  int64_t emb_vec_size_;
  std::string ps_config_file_;
  int64_t global_batch_size_;
};

// IsExpensive defaults to true for kernels that do not override it: TF will not inline this kernel into a cheap
// op's thread, which is what a lookup that may reach storage tiers wants.
REGISTER_KERNEL_BUILDER(Name("HpsLookup").Device(tensorflow::DEVICE_CPU), HpsLookupOp);

}  // namespace

// ---------------------------------------------------------------------------------------------- C entry points

extern "C" {

int hps_tf_op_abi_version() { return kAbiVersion; }

// Registers (or with nullptr, clears) the process-wide lookup callback. Safe to call from any thread.
void hps_tf_register_lookup_callback(HpsLookupCallback callback) {
  g_callback.store(callback, std::memory_order_release);
}

// Registers (or with nullptrs, clears) the native route: the engine's lookup entry and the Python router.
void hps_tf_register_native(HpsNativeLookup lookup, HpsRouteCallback route) {
  g_route.store(route, std::memory_order_release);
  g_native_lookup.store(lookup, std::memory_order_release);
}

// Frees a DLManagedTensor whose consumer could not take it (e.g. the callback failed before torch.from_dlpack).
void hps_tf_delete_dlpack(DLManagedTensor* managed) {
  if (managed != nullptr && managed->deleter != nullptr) managed->deleter(managed);
}

}  // extern "C"
