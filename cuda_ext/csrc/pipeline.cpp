// LookupPipeline (pipeline.h): the lookup of one table on one device, from one native call.
//
// Where the time goes on a GPU, and why the code is shaped so: a CUDA runtime call costs microseconds on these
// machines and a stream sync more, so a lookup whose keys all hit makes one launch (and, for a table that can
// miss, spins on a pinned word the launch writes); a lookup with misses adds one more launch (and one copy when
// the plan is large). Buffers are allocated once and grown, never per call. Python is not on the path: the
// lower tiers are reached through a callback only for keys the host-memory map lacks.
#include "pipeline.h"
#include "sketch.h"

#include <Python.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <unordered_map>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "cache_state.h"
#include "checks.h"
#include "cpu/lookup_cpu.h"
#include "cpu/stored_row_copy.h"
#include "lookup_ops.h"
#include "stored_rows.h"

#ifdef HPS_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "cuda/lookup_cuda.h"
#endif

namespace hps {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// Releases the GIL for the scope when this thread holds it (Python callers), so other Python threads run while a
// lookup waits on the GPU, and the lower-tier callback can take it from any thread.
class GilRelease {
 public:
  GilRelease() {
    if (Py_IsInitialized() && PyGILState_Check()) state_ = PyEval_SaveThread();
  }
  ~GilRelease() {
    if (state_ != nullptr) PyEval_RestoreThread(state_);
  }
  GilRelease(const GilRelease&) = delete;
  GilRelease& operator=(const GilRelease&) = delete;

 private:
  PyThreadState* state_ = nullptr;
};

// GPU batches up to this many keys write their miss list straight into pinned host memory (the host reads it
// without a copy); larger ones into device memory (then copied, or planned on the device).
constexpr int64_t kMappedMissMax = int64_t{1} << 16;
// Miss lists longer than this are de-duplicated on the device (a sort) rather than with a host hash table.
constexpr int64_t kHostPlanMax = int64_t{1} << 16;
// Plans up to this size are read by the apply kernel from pinned memory; larger ones are copied first.
constexpr int64_t kZeroCopyPlanBytes = int64_t{1} << 18;
// The LRU clock mirror is re-read from the device every this many host-side finds (CUDA graph replays bump the
// device clock without the host knowing).
constexpr int64_t kClockResyncEvery = int64_t{1} << 16;

int64_t align64(int64_t bytes) { return (bytes + 63) & ~int64_t{63}; }

// The default vector's value as a table of `storage` keeps it (a row of one value encodes to one value): a key no
// tier holds reads the same whether its default row was written by a find or cached and decoded later.
float stored_value(int32_t storage, int64_t dim, float value) {
  if (storage < 0 || storage >= kNumStorages || dim < 1) return value;  // the constructor raises
  std::vector<float> row(static_cast<size_t>(dim), value);
  std::vector<uint8_t> stored(static_cast<size_t>(stored_row_bytes(storage, dim)));
  float out = value;
  with_storage(storage, [&](auto st) {
    constexpr int32_t S = decltype(st)::value;
    encode_row<S>(row.data(), dim, stored.data());
    out = decode_elem<S>(stored.data(), 0, scale_bias_of<S>(stored.data(), dim));
  });
  return out;
}

// hps::cache_insert_or_assign as the dispatcher calls it (the last argument: an admission sketch, none here).
using CacheInsertFn = at::Tensor(at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, int64_t, const std::optional<at::Tensor>&);

// Byte offsets of one plan in a plan buffer: [pos m int32][inv m int32][ukeys u int64][rows: u stored rows]
// [row_ids u int32][push_buckets p int64][push_keys 32p int64][push_rows 32p int32][push_digests 32p][spill p].
struct PlanLayout {
  int64_t pos = 0, inv = 0, ukeys = 0, rows = 0, row_ids = 0, push_buckets = 0, push_keys = 0, push_rows = 0,
          push_digests = 0, push_spill = 0, bytes = 0;

  static PlanLayout make(int64_t m, int64_t u, int64_t row_bytes, int64_t pushes) {
    PlanLayout l;
    int64_t at = 0;
    const auto take = [&](int64_t bytes) {
      const int64_t here = at;
      at += align64(bytes);
      return here;
    };
    l.pos = take(m * 4);
    l.inv = take(m * 4);
    l.ukeys = take(u * 8);
    l.rows = take(u * row_bytes);
    l.row_ids = take(u * 4);
    l.push_buckets = take(pushes * 8);
    l.push_keys = take(pushes * kBucketSize * 8);
    l.push_rows = take(pushes * kBucketSize * 4);
    l.push_digests = take(pushes * kBucketSize);
    l.push_spill = take(pushes);
    l.bytes = at;
    return l;
  }
};

// Distinct keys of a miss list in first-occurrence order: open addressing (capacity a power of two >= 2m),
// linear probing from mix64(key); the arrays are kept between calls.
struct Deduper {
  std::vector<int64_t> keys;
  std::vector<int32_t> index;
  uint64_t mask = 0;

  void reset(int64_t m) {
    uint64_t cap = 16;
    while (cap < static_cast<uint64_t>(m) * 2) cap <<= 1;
    if (keys.size() < cap) keys.resize(cap);
    if (index.size() < cap) index.resize(cap);
    std::fill(index.begin(), index.begin() + cap, -1);
    mask = cap - 1;
  }

  int32_t insert(int64_t key, int32_t next) {
    for (uint64_t s = mix64(key_bits(key)) & mask;; s = (s + 1) & mask) {
      if (index[s] < 0) {
        keys[s] = key;
        index[s] = next;
        return next;
      }
      if (keys[s] == key) return index[s];
    }
  }
};

template <typename Fn>
c10::TypedOperatorHandle<Fn> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// Handle registry (weak: a handle never keeps a pipeline alive).
std::mutex g_registry_mu;
std::unordered_map<int64_t, c10::weak_intrusive_ptr<LookupPipeline>> g_registry;
int64_t g_next_handle = 1;

c10::Device normalise_device(const std::string& name) {
  c10::Device d(name);
#ifdef HPS_WITH_CUDA
  if (d.is_cuda() && !d.has_index()) d = c10::Device(c10::kCUDA, c10::cuda::current_device());
#endif
  return d;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Workspace: what a lookup reuses. On a GPU the host-side buffers are pinned (the kernels read and write them
// through the bus); on the CPU they are plain memory.
struct LookupPipeline::Workspace {
  bool pinned = false;
  at::Tensor flag;                   // kFlagSize int64
  at::Tensor miss_pos_h, miss_keys_h;  // host miss list (capacity = their length)
  at::Tensor miss_pos_d, miss_keys_d;  // device miss list (large GPU batches)
  at::Tensor plan_h;                 // plan bytes on the host
  at::Tensor plan_d;                 // plan bytes on the device (large plans)
  Deduper dedup;
  std::vector<int64_t> first, order, bucket, touched;
  std::vector<int32_t> rank, new_rank, row_ids;
  std::vector<uint8_t> found;

  at::Tensor host_bytes(int64_t bytes) const {
    return at::empty({std::max<int64_t>(bytes, 64)}, at::TensorOptions().dtype(at::kByte).pinned_memory(pinned));
  }
  void ensure_host_misses(int64_t n) {
    if (miss_pos_h.defined() && miss_pos_h.size(0) >= n) return;
    const int64_t cap = std::max<int64_t>(n, 1024);
    miss_pos_h = at::empty({cap}, at::TensorOptions().dtype(at::kInt).pinned_memory(pinned));
    miss_keys_h = at::empty({cap}, at::TensorOptions().dtype(at::kLong).pinned_memory(pinned));
  }
  void ensure_device_misses(int64_t n, const c10::Device& device) {
    if (miss_pos_d.defined() && miss_pos_d.size(0) >= n) return;
    miss_pos_d = at::empty({n}, at::TensorOptions().dtype(at::kInt).device(device));
    miss_keys_d = at::empty({n}, at::TensorOptions().dtype(at::kLong).device(device));
  }
  at::Tensor stage_d;  // (4, n) int64: the GPU-direct second level's staged (row, bucket, key, position)
  void ensure_stage(int64_t n, const c10::Device& device) {
    if (stage_d.defined() && stage_d.size(1) >= n) return;
    stage_d = at::empty({4, n}, at::TensorOptions().dtype(at::kLong).device(device));
  }
  uint8_t* plan(int64_t bytes) {
    if (!plan_h.defined() || plan_h.size(0) < bytes) plan_h = host_bytes(bytes + bytes / 2);
    return plan_h.data_ptr<uint8_t>();
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Construction

LookupPipeline::LookupPipeline(int64_t kind, const std::string& device, int64_t dim, int64_t capacity,
                               int64_t policy, double default_value, int64_t max_keys, bool misses_to_tiers,
                               bool rows_on_host, const std::string& tag, int64_t storage)
    : kind_(kind),
      device_(normalise_device(device)),
      dim_(dim),
      policy_(policy),
      default_value_(stored_value(static_cast<int32_t>(storage), dim, static_cast<float>(default_value))),
      max_keys_(max_keys),
      misses_to_tiers_(kind == kDynamicCache || misses_to_tiers),
      rows_on_host_(rows_on_host),
      tag_(tag),
      storage_(static_cast<int32_t>(storage)),
      row_bytes_(stored_row_bytes(static_cast<int32_t>(storage), dim)),
      capacity_(capacity) {
  TORCH_CHECK_VALUE(kind == kDynamicCache || kind == kResident || kind == kPassThrough,
                    "LookupPipeline: kind must be 0 (dynamic cache), 1 (resident) or 2 (pass-through), found ", kind);
  TORCH_CHECK_VALUE(kind != kPassThrough || (normalise_device(device).is_cpu() && capacity == 0),
                    "LookupPipeline: a pass-through pipeline is a CPU one of capacity 0, found ", device, " and ",
                    capacity);
  TORCH_CHECK_VALUE(device_.is_cpu() || device_.is_cuda(), "LookupPipeline: device must be cpu or cuda, found ",
                    device);
#ifndef HPS_WITH_CUDA
  TORCH_CHECK_VALUE(device_.is_cpu(), "LookupPipeline: ", device, " needs the CUDA build of hps_core._C");
#endif
  TORCH_CHECK_VALUE(dim >= 1, "LookupPipeline: dim must be >= 1, found ", dim);
  check_storage_code(storage);
  check_storage_dim(storage_, dim);
  TORCH_CHECK_VALUE(capacity >= 0, "LookupPipeline: capacity must be >= 0, found ", capacity);
  TORCH_CHECK_VALUE(max_keys >= 0, "LookupPipeline: max_keys must be >= 0, found ", max_keys);
  check_policy(policy);
  TORCH_CHECK_VALUE(!rows_on_host || (kind == kResident && device_.is_cuda()),
                    "LookupPipeline: rows_on_host is for resident tables on a GPU");
  for (auto& s : stats_) s.store(0);
  for (auto& l : latency_) l.assign(kLatencyWindow, 0.0);
  const auto on_device = at::TensorOptions().device(device_);
  ctrl_ = at::zeros({kCtrlSize}, on_device.dtype(at::kLong));
  ws_ = std::make_unique<Workspace>();
  ws_->pinned = device_.is_cuda();
  ws_->flag = at::zeros({kFlagSize}, at::TensorOptions().dtype(at::kLong).pinned_memory(ws_->pinned));
  // The default vector as a stored row (encoded from the configured value, so it decodes to default_value_): what
  // a cache stores, or a pass-through lookup decodes, for a key no tier holds.
  default_row_ = encode(at::full({1, dim}, static_cast<float>(default_value), at::kFloat)).to(device_);
  default_row_host_ = default_row_.cpu();
  if (kind_ == kPassThrough) return;  // no table: the host map and the lower tiers answer every key
  if (kind_ == kDynamicCache) {
    const int64_t buckets = std::max<int64_t>(1, (capacity + kBucketSize - 1) / kBucketSize);
    TORCH_CHECK_VALUE(buckets < (int64_t{1} << 32), "LookupPipeline: capacity ", capacity, " is too large");
    const int64_t slots = buckets * kBucketSize;
    slot_keys_ = at::zeros({slots}, on_device.dtype(at::kLong));
    digests_ = at::zeros({slots}, on_device.dtype(at::kByte));
    scores_ = at::zeros({slots}, on_device.dtype(at::kInt));
    values_ = at::zeros({slots, row_bytes_}, on_device.dtype(at::kByte)).view(storage_dtype(storage_));
    clock_ = at::zeros({1}, on_device.dtype(at::kLong));
    capacity_ = slots;
  } else {
    TORCH_CHECK_VALUE(capacity < (int64_t{1} << 31), "LookupPipeline: at most 2^31 - 1 resident rows, found ",
                      capacity);
    index_ = std::make_unique<ResidentIndex>(capacity);
    const auto rows_options = rows_on_host_ ? at::TensorOptions().pinned_memory(true) : on_device;
    rows_ = at::empty({capacity, stored_width(storage_, dim)}, rows_options.dtype(storage_dtype(storage_)));
    resident_upload_index();
  }
}

// The last strong reference is gone (the weak one of the handle registry may remain): stop the worker and drop
// the handle here, not in the destructor, which runs only once the registry's weak reference is released too.
void LookupPipeline::release_resources() {
  try {
    close();
  } catch (...) {
  }
}

LookupPipeline::~LookupPipeline() {
#ifdef HPS_WITH_CUDA
  if (order_event_ != nullptr) cudaEventDestroy(static_cast<cudaEvent_t>(order_event_));
#endif
}

void LookupPipeline::set_source(int64_t handle) {
  std::lock_guard<std::mutex> lock(mu_);
  source_ = handle >= 0 ? find_host_map(handle) : c10::intrusive_ptr<HostHashMap>();
  if (source_) {
    TORCH_CHECK_VALUE(source_->dim() == dim_, tag_, ": the host-memory map holds rows of dim ", source_->dim(),
                      ", the table has dim ", dim_);
  }
}

void LookupPipeline::set_second_level(const c10::intrusive_ptr<LookupPipeline>& second) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!second) {
    second_level_.reset();
    return;
  }
  TORCH_CHECK_VALUE(kind_ == kDynamicCache, tag_, ": only a dynamic cache takes a second level");
  TORCH_CHECK_VALUE(second.get() != this && second->kind_ == kResident, tag_,
                    ": the second level must be a resident table, found kind ", second->kind_);
  TORCH_CHECK_VALUE(second->dim_ == dim_, tag_, ": the second level holds rows of dim ", second->dim_,
                    ", the table has dim ", dim_);
  TORCH_CHECK_VALUE(second->storage_ == storage_, tag_, ": the second level stores rows as storage ",
                    second->storage_, ", the table as ", storage_, " (rows move between them as they are)");
  TORCH_CHECK_VALUE(second->device_.is_cpu() || second->rows_on_host_, tag_,
                    ": the second level's rows must be readable by the host (a CPU table, or host-mapped rows); ",
                    second->tag_, " on ", second->device_, " keeps them in device memory");
  second_level_ = second;
}

void LookupPipeline::second_level_direct(const at::Tensor& flat, at::Tensor& out, int64_t n, bool capturing) {
#ifdef HPS_WITH_CUDA
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(device_.index()).stream();
  InsertSortedArgs ins;
  set_cache_state(ins, slot_keys_, digests_, scores_, values_, clock_);
  at::Tensor stage = ws_->stage_d.narrow(1, 0, n);
  at::Tensor row = stage.select(0, 0), bucket = stage.select(0, 1), key = stage.select(0, 2), pos = stage.select(0, 3);
  SecondLevelArgs s;
  s.miss_pos = ws_->miss_pos_d.data_ptr<int32_t>();
  s.miss_keys = ws_->miss_keys_d.data_ptr<int64_t>();
  s.ctrl = ctrl_.data_ptr<int64_t>();
  s.n = n;
  s.out = out.data_ptr();
  s.out_dtype = out_dtype_of(out.scalar_type());
  s.cache_buckets = ins.num_buckets;
  s.stage_row = row.data_ptr<int64_t>();
  s.stage_bucket = bucket.data_ptr<int64_t>();
  s.stage_key = key.data_ptr<int64_t>();
  s.stage_pos = pos.data_ptr<int64_t>();
  const void* l2_rows = nullptr;
  {
    // The second level's device index is read under its lock, after its own earlier work (an index upload by
    // update()); its next update waits for this stream's work (order_stream records this stream as its last).
    LookupPipeline& l2 = *second_level_;
    std::lock_guard<std::mutex> lock(l2.mu_);
    l2.check_open();
    l2.sync_index();
    if (!capturing) l2.order_stream();
    s.index = l2.table_args();
    l2_rows = s.index.values;
    cuda::launch_second_level_probe(s, stream);
    // The rows in ascending row id: neighbouring warps read neighbouring host memory (see the gather kernel).
    at::Tensor sorted_row, order;
    std::tie(sorted_row, order) = at::sort(row);
    s.sorted_row = sorted_row.data_ptr<int64_t>();
    s.order = order.data_ptr<int64_t>();
    cuda::launch_second_level_gather(s, stream);
  }
  // The staged entries in (bucket, key) order - the order the host plan inserts in, so the cache ends the same
  // on every device - then the insert walk over them (sentinel entries sort last and are skipped).
  at::Tensor by_key = std::get<1>(at::sort(key, /*stable=*/true, 0, false));
  at::Tensor sorted_bucket, by_bucket;
  std::tie(sorted_bucket, by_bucket) = at::sort(bucket.index_select(0, by_key), /*stable=*/true, 0, false);
  const at::Tensor entries = by_key.index_select(0, by_bucket);
  at::Tensor perm;
  if (out.scalar_type() == at::kFloat && storage_ == kStoreFloat32) {
    // each key's row as the gather (or the find's default) wrote it
    perm = pos.index_select(0, entries);
    ins.keys = flat.data_ptr();
    ins.key_is_int64 = flat.scalar_type() == at::kLong;
    ins.rows = out.data_ptr<float>();
  } else {  // a rounded output or compact rows: the stored rows, read again from the second level
    perm = entries;
    ins.keys = key.data_ptr<int64_t>();
    ins.key_is_int64 = true;
    ins.rows = l2_rows;
    ins.row_of = row.data_ptr<int64_t>();
    ins.fill_row = default_row_.data_ptr();
  }
  ins.sorted_bucket = sorted_bucket.data_ptr<int64_t>();
  ins.perm = perm.data_ptr<int64_t>();
  ins.n = n;
  ins.row_bytes = row_bytes_;
  ins.lru = policy_ == kPolicyLRU;
  ins.counts = ctrl_.data_ptr<int64_t>() + kCtrlInserted;
  if (sketch_.defined()) {
    ins.sketch = sketch_.data_ptr<int32_t>();
    ins.sketch_width = sketch_width();
  }
  cuda::launch_insert_sorted(ins, stream);
#else
  (void)flat;
  (void)out;
  (void)n;
  (void)capturing;
  TORCH_CHECK(false, tag_, ": the GPU-direct second level needs the CUDA build");
#endif
}

int64_t LookupPipeline::read_rows(const int64_t* keys, int64_t u, uint8_t* rows, bool* found) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  TORCH_CHECK(kind_ == kResident && (device_.is_cpu() || rows_on_host_), tag_, ": read_rows needs host-readable rows");
  const uint8_t* src = static_cast<const uint8_t*>(rows_.data_ptr());
  int64_t hits = 0;
  for (int64_t k = 0; k < u; ++k) {
    const int64_t r = index_->row_of(keys[k]);
    if (r < 0) continue;
    std::memcpy(rows + k * row_bytes_, src + r * row_bytes_, row_bytes_);
    found[k] = true;
    ++hits;
  }
  return hits;
}

void LookupPipeline::set_lower_tiers(int64_t fn, int64_t token) {
  std::lock_guard<std::mutex> lock(mu_);
  lower_tiers_ = reinterpret_cast<LowerTierFn>(fn);
  lower_token_ = token;
}

void LookupPipeline::set_async(double threshold, int64_t max_pending) {
  TORCH_CHECK_VALUE(max_pending >= 1, tag_, ": max_pending must be >= 1, found ", max_pending);
  std::lock_guard<std::mutex> lock(mu_);
  async_threshold_ = threshold;
  max_pending_ = max_pending;
  if (kind_ == kDynamicCache && threshold <= 1.0 && !async_thread_.joinable()) {
    async_thread_ = std::thread([this] { async_loop(); });
  }
}

void LookupPipeline::set_admission(int64_t window) {
  TORCH_CHECK_VALUE(window >= 0, tag_, ": the admission window must be >= 0 keys, found ", window);
  std::lock_guard<std::mutex> lock(mu_);
  if (window == 0) {
    sketch_ = at::Tensor();
    sketch_window_ = 0;
    return;
  }
  TORCH_CHECK_VALUE(kind_ == kDynamicCache && policy_ == kPolicyLFU, tag_,
                    ": admission needs a dynamic cache with the LFU policy (it compares frequencies)");
  sketch_ = at::zeros({kSketchDepth * sketch_width_for(slot_keys_.size(0))},
                      at::TensorOptions().device(device_).dtype(at::kInt));
  sketch_window_ = window;
  keys_since_ageing_ = 0;
}

std::optional<at::Tensor> LookupPipeline::sketch_arg() const {
  return sketch_.defined() ? std::optional<at::Tensor>(sketch_) : std::nullopt;
}

// Every sketch_window_ keys looked up: the sketch and the LFU scores halved (counts follow a changing popularity).
// Host-counted, so the CPU and CUDA twins age at the same calls; not while a CUDA graph is captured.
void LookupPipeline::age_before_find(int64_t n, bool capturing) {
  if (!sketch_.defined() || capturing) return;
  if (keys_since_ageing_ >= sketch_window_) {
    sketch_.bitwise_right_shift_(1);
    static auto decay = op<void(at::Tensor&, at::Tensor&, int64_t)>("hps::cache_decay");
    decay.call(scores_, clock_, policy_);
    keys_since_ageing_ = 0;
  }
  keys_since_ageing_ += n;
}

int64_t LookupPipeline::handle(const c10::intrusive_ptr<LookupPipeline>& self) {
  std::lock_guard<std::mutex> lock(g_registry_mu);
  if (handle_ < 0) {
    handle_ = g_next_handle++;
    g_registry.emplace(handle_, c10::weak_intrusive_ptr<LookupPipeline>(self));
  }
  return handle_;
}

// The pipeline of `handle`, or null when none is open under it.
c10::intrusive_ptr<LookupPipeline> pipeline_or_null(int64_t handle) {
  std::lock_guard<std::mutex> lock(g_registry_mu);
  const auto it = g_registry.find(handle);
  return it == g_registry.end() ? nullptr : it->second.lock();
}

c10::intrusive_ptr<LookupPipeline> find_pipeline(int64_t handle) {
  c10::intrusive_ptr<LookupPipeline> p = pipeline_or_null(handle);
  TORCH_CHECK_VALUE(p, "no open lookup pipeline has handle ", handle,
                    " (its server was closed, or the handle never came from LookupPipeline.handle())");
  return p;
}

void LookupPipeline::close() {
  {
    GilRelease nogil;  // the worker may be inside the lower-tier callback, waiting for the GIL
    {
      std::lock_guard<std::mutex> lock(async_mu_);
      async_stop_ = true;
    }
    async_cv_.notify_all();
    if (async_thread_.joinable()) async_thread_.join();
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
    source_.reset();  // the host map may go now, whoever still holds this pipeline
    second_level_.reset();
  }
  std::lock_guard<std::mutex> lock(g_registry_mu);
  if (handle_ >= 0) g_registry.erase(handle_);
}

void LookupPipeline::check_open() const {
  TORCH_CHECK(!closed_, tag_, " on ", device_, ": this lookup pipeline is closed (its server was closed)");
}

void LookupPipeline::check_keys(const at::Tensor& keys) const {
  TORCH_CHECK_TYPE(keys.scalar_type() == at::kLong || keys.scalar_type() == at::kInt,
                   "keys must be int32 or int64, found torch.", c10::getDtypeNames(keys.scalar_type()).first);
  TORCH_CHECK_VALUE(keys.device() == device_, "keys for ", tag_, " must be on ", device_, ", found ",
                    keys.device());
  const int64_t n = keys.numel();
  TORCH_CHECK_VALUE(max_keys_ == 0 || n <= max_keys_, n, " keys for ", tag_,
                    " exceed max_batch_size × max_keys_per_sample = ", max_keys_);
  TORCH_CHECK_VALUE(n < (int64_t{1} << 31), n, " keys for ", tag_, ": at most 2^31 - 1 per call");
}

FindMode LookupPipeline::find_mode() const {
  if (kind_ == kResident) return kFindResident;
  return policy_ == kPolicyLRU ? kFindCacheLRU : kFindCacheLFU;
}

FindArgs LookupPipeline::table_args() const {
  FindArgs a;
  a.dim = dim_;
  a.storage = storage_;
  a.default_value = default_value_;
  a.ctrl = ctrl_.data_ptr<int64_t>();
  if (kind_ == kDynamicCache) {
    set_cache_state(a, slot_keys_, digests_, scores_, values_, clock_);
  } else if (device_.is_cpu()) {
    a.slot_keys = index_->keys();
    a.digests = index_->digests();
    a.slot_rows = index_->rows();
    a.spill = index_->spill();
    a.values = rows_.data_ptr();
    a.num_buckets = index_->num_buckets();
  } else {
    a.slot_keys = dindex_keys_.data_ptr<int64_t>();
    a.digests = dindex_digests_.data_ptr<uint8_t>();
    a.slot_rows = dindex_rows_.data_ptr<int32_t>();
    a.spill = dindex_spill_.data_ptr<uint8_t>();
    a.values = rows_.data_ptr();
    a.num_buckets = dindex_spill_.size(0);
  }
  return a;
}

void LookupPipeline::record_latency(int64_t stage, double seconds) {
  latency_[stage][latency_count_[stage] % kLatencyWindow] = seconds;
  ++latency_count_[stage];
}

// Make the current stream wait for the work the last call launched on another stream (an event recorded now on
// that stream covers all of it: every launch on this table happens under the lock). One stream: no API call.
void LookupPipeline::order_stream() {
#ifdef HPS_WITH_CUDA
  const c10::cuda::CUDAGuard guard(device_);
  cudaStream_t cur = at::cuda::getCurrentCUDAStream(device_.index()).stream();
  if (last_stream_ != nullptr && last_stream_ != static_cast<void*>(cur)) {
    if (order_event_ == nullptr) {
      cudaEvent_t ev;
      C10_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
      order_event_ = ev;
    }
    C10_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(order_event_), static_cast<cudaStream_t>(last_stream_)));
    C10_CUDA_CHECK(cudaStreamWaitEvent(cur, static_cast<cudaEvent_t>(order_event_), 0));
  }
  last_stream_ = cur;
#endif
}

// Order the current stream after the table's earlier work and wait for all of it: for the calls that rewrite the
// workspace's plan buffer outside a lookup (update, the insert worker), whose last reader may still be running.
void LookupPipeline::quiesce() {
  if (!device_.is_cuda()) return;
#ifdef HPS_WITH_CUDA
  order_stream();
  const c10::cuda::CUDAGuard guard(device_);
  C10_CUDA_CHECK(cudaStreamSynchronize(at::cuda::getCurrentCUDAStream(device_.index()).stream()));
#endif
}

// The host index changed by load(): copy it to the device before the table is read there.
void LookupPipeline::sync_index() {
  if (!index_dirty_) return;
  resident_upload_index();
  index_dirty_ = false;
}

// ---------------------------------------------------------------------------------------------------------------
// The lookup

at::Tensor LookupPipeline::lookup(const at::Tensor& keys, std::optional<at::ScalarType> dtype) {
  check_keys(keys);
  const at::ScalarType out_type = dtype.value_or(at::kFloat);
  out_dtype_of(out_type);  // raises for any other dtype
  const at::Tensor flat = keys.reshape({-1}).contiguous();
  std::vector<int64_t> shape(keys.sizes().begin(), keys.sizes().end());
  shape.push_back(dim_);
  at::Tensor out = at::empty({flat.numel(), dim_}, flat.options().dtype(out_type));
  if (flat.numel() > 0) lookup_into(flat, out);
  return out.view(shape);
}

void LookupPipeline::lookup_into(const at::Tensor& flat, at::Tensor& out) {
  const int64_t n = flat.numel();
  const Clock::time_point t0 = Clock::now();
  if (kind_ == kPassThrough) {
    GilRelease nogil;
    std::lock_guard<std::mutex> lock(mu_);
    check_open();
    pass_through(flat, out);
    record_latency(kStageTotal, seconds_since(t0));
    return;
  }
  GilRelease nogil;
  std::unique_lock<std::mutex> lock(mu_);
  check_open();
  sync_index();

  FindArgs a = table_args();
  a.keys = flat.data_ptr();
  a.key_is_int64 = flat.scalar_type() == at::kLong;
  a.n = n;
  a.out = out.data_ptr();
  a.out_dtype = out_dtype_of(out.scalar_type());
  bool want_misses = misses_to_tiers_;
  bool big = false;
  const bool lru = kind_ == kDynamicCache && policy_ == kPolicyLRU;
  const auto before_find = [&] {
    if (!lru) return;
    if (++clock_host_ % kClockResyncEvery == 0) clock_host_ = clock_.cpu().data_ptr<int64_t>()[0];
    if (clock_host_ + 1 >= kClockLimit) {
      static auto decay = op<void(at::Tensor&, at::Tensor&, int64_t)>("hps::cache_decay");
      decay.call(scores_, clock_, policy_);
      clock_host_ >>= 1;
    }
  };
  int64_t misses = 0;
  if (device_.is_cpu()) {
    if (want_misses) {
      ws_->ensure_host_misses(n);
      a.miss_pos = ws_->miss_pos_h.data_ptr<int32_t>();
      a.miss_keys = ws_->miss_keys_h.data_ptr<int64_t>();
    }
    a.host_flag = ws_->flag.data_ptr<int64_t>();
    a.seq = ++seq_;
    before_find();
    age_before_find(n, false);
    cpu::find(a, find_mode());
    misses = a.host_flag[kFlagMisses];
    if (misses > 0 && sketch_.defined() && a.miss_keys != nullptr) {
      cpu::sketch_add_keys(sketch_.data_ptr<int32_t>(), sketch_width(), a.miss_keys, misses);
    }
  } else {
#ifdef HPS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(device_);
    cudaStream_t stream = at::cuda::getCurrentCUDAStream(device_.index()).stream();
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    const bool capturing = capture != cudaStreamCaptureStatusNone;
    if (!capturing) order_stream();
    if (second_level_ && second_level_->device_ == device_ && second_level_->rows_on_host_ &&
        second_level_->answers_all()) {
      // GPU-direct second level: the misses never reach the host, so nothing is waited on (and a graph capture
      // takes the whole lookup).
      ws_->ensure_device_misses(n, device_);
      ws_->ensure_stage(n, device_);
      a.miss_pos = ws_->miss_pos_d.data_ptr<int32_t>();
      a.miss_keys = ws_->miss_keys_d.data_ptr<int64_t>();
      if (!capturing) before_find();
      age_before_find(n, capturing);
      cuda::launch_find(a, find_mode(), stream);
      if (sketch_.defined()) {  // the misses' counts, their number read by the kernel from the control block
        cuda::launch_sketch_add(sketch_.data_ptr<int32_t>(), sketch_width(), a.miss_keys, n,
                                ctrl_.data_ptr<int64_t>() + kCtrlPending, stream);
      }
      second_level_direct(flat, out, n, capturing);
      record_latency(kStageTotal, seconds_since(t0));
      return;
    }
    // While a graph is captured the lookup is the find alone: nothing it captures may point at buffers that
    // later calls reallocate, and a replay cannot come back to the host.
    want_misses = want_misses && !capturing;
    if (want_misses) {
      big = n > kMappedMissMax;
      if (big) {
        ws_->ensure_device_misses(n, device_);
        a.miss_pos = ws_->miss_pos_d.data_ptr<int32_t>();
        a.miss_keys = ws_->miss_keys_d.data_ptr<int64_t>();
      } else {
        ws_->ensure_host_misses(kMappedMissMax);
        a.miss_pos = ws_->miss_pos_h.data_ptr<int32_t>();
        a.miss_keys = ws_->miss_keys_h.data_ptr<int64_t>();
      }
      a.host_flag = ws_->flag.data_ptr<int64_t>();
      a.seq = ++seq_;
    }
    if (!capturing) before_find();
    age_before_find(n, capturing);
    cuda::launch_find(a, find_mode(), stream);
    if (!want_misses) {
      record_latency(kStageTotal, seconds_since(t0));
      return;
    }
    // Spin on the word the find's last block writes; every so often ask the stream whether it failed or
    // finished without writing it (a kernel error would otherwise leave us spinning).
    volatile int64_t* flag = a.host_flag;
    for (int64_t spins = 1; flag[kFlagSeq] != a.seq; ++spins) {
      if ((spins & 4095) == 0) {
        const cudaError_t e = cudaStreamQuery(stream);
        if (e == cudaSuccess) {
          TORCH_CHECK(flag[kFlagSeq] == a.seq, tag_, ": the find finished without publishing its misses");
        } else if (e != cudaErrorNotReady) {
          C10_CUDA_CHECK(e);
        }
      }
#if defined(__SSE2__)
      _mm_pause();
#endif
    }
    std::atomic_thread_fence(std::memory_order_acquire);
    misses = flag[kFlagMisses];
    if (misses > 0 && sketch_.defined()) {  // the list: pinned host memory (small batches) or device memory
      cuda::launch_sketch_add(sketch_.data_ptr<int32_t>(), sketch_width(), a.miss_keys, misses,
                              nullptr, stream);
    }
#endif
  }
  if (!want_misses) {
    record_latency(kStageTotal, seconds_since(t0));
    return;
  }
  record_latency(kStageFind, seconds_since(t0));
  if (misses > 0) resolve_misses(misses, n, OutRows{a.out, a.out_dtype}, big);
  record_latency(kStageTotal, seconds_since(t0));
}

void LookupPipeline::pass_through(const at::Tensor& flat, at::Tensor& out) {
  const int64_t n = flat.numel();
  std::vector<int64_t> widened;
  const int64_t* keys = nullptr;
  if (flat.scalar_type() == at::kLong) {
    keys = flat.data_ptr<int64_t>();
  } else {
    const int32_t* k32 = flat.data_ptr<int32_t>();
    widened.assign(k32, k32 + n);
    keys = widened.data();
  }
  std::unique_ptr<bool[]> found(new bool[n]);
  if (storage_ == kStoreFloat32 && out.scalar_type() == at::kFloat) {
    fetch_rows(keys, n, static_cast<uint8_t*>(out.data_ptr()), found.get());
  } else {  // stored rows from the tiers, decoded (rounded to nearest even) into the output, as the find does
    at::Tensor rows = at::empty({n, stored_width(storage_, dim_)}, storage_dtype(storage_));
    fetch_rows(keys, n, static_cast<uint8_t*>(rows.data_ptr()), found.get());
    out.copy_(decode(rows).view(out.sizes()));
  }
  int64_t defaults = 0;
  for (int64_t i = 0; i < n; ++i) defaults += !found[i];
  // Every position is a miss that was fetched (HPS gpucache false); the counters a cache keeps in its control block.
  stats_[kStatMissesPlanned] += n;
  stats_[kStatDefaultsPlanned] += defaults;
  int64_t* ctrl = ctrl_.data_ptr<int64_t>();
  ctrl[kCtrlLookups] += 1;
  ctrl[kCtrlKeys] += n;
  ctrl[kCtrlMisses] += n;
}

void LookupPipeline::check_has_table(const char* what) const {
  TORCH_CHECK_VALUE(kind_ != kPassThrough, tag_, ": a pass-through pipeline (a table without a cache) has no ", what);
}

// The misses of the call whose find just finished: the list -> a plan (distinct keys, each position's key) ->
// rows -> apply (or queue an asynchronous insert).
void LookupPipeline::resolve_misses(int64_t m, int64_t n, const OutRows& out, bool big) {
  Workspace& w = *ws_;
  const Clock::time_point t_plan = Clock::now();
  const bool cache = kind_ == kDynamicCache;
  bool grouped = cache;  // distinct keys in the cache's bucket order (small plans), or in key order (large)
  int64_t u = 0;
  const int64_t pushes_max = cache ? 0 : 2 * m;
  PlanLayout L;
  uint8_t* plan = nullptr;

  if (big && m > kHostPlanMax) {
#ifdef HPS_WITH_CUDA
    // Large lists: sort the miss keys on the device, bring (sorted key, position) back, number the runs here.
    at::Tensor keys_d = w.miss_keys_d.narrow(0, 0, m);
    at::Tensor sorted, perm;
    std::tie(sorted, perm) = keys_d.sort();
    at::Tensor pos_sorted = w.miss_pos_d.narrow(0, 0, m).index_select(0, perm);
    w.ensure_host_misses(m);
    w.miss_keys_h.narrow(0, 0, m).copy_(sorted, /*non_blocking=*/true);
    w.miss_pos_h.narrow(0, 0, m).copy_(pos_sorted, /*non_blocking=*/false);
    const int64_t* sk = w.miss_keys_h.data_ptr<int64_t>();
    const int32_t* sp = w.miss_pos_h.data_ptr<int32_t>();
    for (int64_t k = 0; k < m; ++k) u += (k == 0 || sk[k] != sk[k - 1]);
    L = PlanLayout::make(m, u, row_bytes_, pushes_max ? 2 * u : 0);
    plan = w.plan(L.bytes);
    int32_t* pos = reinterpret_cast<int32_t*>(plan + L.pos);
    int32_t* inv = reinterpret_cast<int32_t*>(plan + L.inv);
    int64_t* ukeys = reinterpret_cast<int64_t*>(plan + L.ukeys);
    int64_t r = -1;
    for (int64_t k = 0; k < m; ++k) {
      if (k == 0 || sk[k] != sk[k - 1]) ukeys[++r] = sk[k];
      pos[k] = sp[k];
      inv[k] = static_cast<int32_t>(r);
    }
    grouped = false;
#endif
  } else {
    const int32_t* mpos;
    const int64_t* mkeys;
    if (big) {  // a large GPU batch with few misses: copy the list back
      w.ensure_host_misses(m);
      w.miss_keys_h.narrow(0, 0, m).copy_(w.miss_keys_d.narrow(0, 0, m), /*non_blocking=*/true);
      w.miss_pos_h.narrow(0, 0, m).copy_(w.miss_pos_d.narrow(0, 0, m), /*non_blocking=*/false);
    }
    mpos = w.miss_pos_h.data_ptr<int32_t>();
    mkeys = w.miss_keys_h.data_ptr<int64_t>();
    // Distinct keys in first-occurrence order, then ordered: (bucket, key) for a cache (its insert then needs no
    // sort), key for a resident table. Any order of the list gives the same plan.
    w.dedup.reset(m);
    w.rank.resize(m);  // each entry's distinct-key number (first-occurrence order)
    std::vector<int64_t>& first = w.first;
    first.clear();
    for (int64_t j = 0; j < m; ++j) {
      const int32_t id = w.dedup.insert(mkeys[j], static_cast<int32_t>(first.size()));
      if (id == static_cast<int32_t>(first.size())) first.push_back(mkeys[j]);
      w.rank[j] = id;
    }
    u = static_cast<int64_t>(first.size());
    w.order.resize(u);
    std::iota(w.order.begin(), w.order.end(), int64_t{0});
    if (cache) {
      const int64_t num_buckets = slot_keys_.size(0) / kBucketSize;
      w.bucket.resize(u);
      for (int64_t k = 0; k < u; ++k) w.bucket[k] = bucket_of(mix64(key_bits(first[k])), num_buckets);
      std::sort(w.order.begin(), w.order.end(), [&](int64_t x, int64_t y) {
        return w.bucket[x] != w.bucket[y] ? w.bucket[x] < w.bucket[y] : first[x] < first[y];
      });
    } else {
      std::sort(w.order.begin(), w.order.end(), [&](int64_t x, int64_t y) { return first[x] < first[y]; });
    }
    L = PlanLayout::make(m, u, row_bytes_, pushes_max ? 2 * u : 0);
    plan = w.plan(L.bytes);
    int32_t* pos = reinterpret_cast<int32_t*>(plan + L.pos);
    int32_t* inv = reinterpret_cast<int32_t*>(plan + L.inv);
    int64_t* ukeys = reinterpret_cast<int64_t*>(plan + L.ukeys);
    std::vector<int32_t>& new_rank = w.new_rank;  // distinct-key number -> place in the ordered plan
    new_rank.resize(u);
    for (int64_t r = 0; r < u; ++r) {
      new_rank[w.order[r]] = static_cast<int32_t>(r);
      ukeys[r] = first[w.order[r]];
    }
    for (int64_t j = 0; j < m; ++j) {
      pos[j] = mpos[j];
      inv[j] = new_rank[w.rank[j]];
    }
  }
  stats_[kStatMissesPlanned] += m;
  stats_[kStatUniqueMisses] += u;
  const Clock::time_point t_fetch = Clock::now();
  record_latency(kStagePlan, std::chrono::duration<double>(t_fetch - t_plan).count());

  int64_t* ukeys = reinterpret_cast<int64_t*>(plan + L.ukeys);
  uint8_t* rows = plan + L.rows;
  const bool async = cache && async_thread_.joinable() && 1.0 - static_cast<double>(m) / static_cast<double>(n) >=
                                                                    async_threshold_;
  if (async) {
    std::unique_lock<std::mutex> alock(async_mu_);
    if (static_cast<int64_t>(async_queue_.size()) + async_running_ < max_pending_) {
      // HPS asynchronous insertion: this batch keeps the default rows the find wrote for its misses.
      async_queue_.push_back(AsyncJob{std::vector<int64_t>(ukeys, ukeys + u), grouped, version_});
      alock.unlock();
      async_cv_.notify_one();
      stats_[kStatAsyncBatches] += 1;
      stats_[kStatDefaultsPlanned] += m;
      return;
    }
  }
  w.found.resize(u);
  fetch_rows(ukeys, u, rows, reinterpret_cast<bool*>(w.found.data()));
  // Positions served the default vector (keys no tier holds).
  bool any_default = false;
  for (int64_t k = 0; k < u && !any_default; ++k) any_default = !w.found[k];
  if (any_default) {
    const int32_t* inv = reinterpret_cast<const int32_t*>(plan + L.inv);
    int64_t defaults = 0;
    for (int64_t j = 0; j < m; ++j) defaults += !w.found[inv[j]];
    stats_[kStatDefaultsPlanned] += defaults;
  }
  const Clock::time_point t_apply = Clock::now();
  record_latency(kStageFetch, std::chrono::duration<double>(t_apply - t_fetch).count());
  apply_plan(out, reinterpret_cast<const int32_t*>(plan + L.pos), reinterpret_cast<const int32_t*>(plan + L.inv), m,
             ukeys, rows, u, grouped, /*insert=*/true);
  record_latency(kStageApply, seconds_since(t_apply));
}

void LookupPipeline::check_rows(const at::Tensor& rows, int64_t n) const {
  const bool stored = storage_ != kStoreFloat32 && rows.scalar_type() == storage_dtype(storage_);
  const int64_t width = stored ? stored_width(storage_, dim_) : dim_;
  TORCH_CHECK_TYPE(rows.scalar_type() == at::kFloat || stored, "rows for ", tag_, " must be float32 rows",
                   storage_ == kStoreFloat32 ? "" : " or stored rows of the table's storage", ", found ",
                   rows.scalar_type());
  TORCH_CHECK_VALUE(rows.dim() == 2 && rows.size(0) == n && rows.size(1) == width, "rows for ", tag_,
                    " must have shape (", n, ", ", width, "), found ", rows.sizes());
}

// Rows already stored (the storage's dtype: rows a tier kept, or the engine encoded once for every table) pass as
// they are.
at::Tensor LookupPipeline::encode(const at::Tensor& rows) const {
  if (storage_ == kStoreFloat32 || rows.scalar_type() == storage_dtype(storage_)) return rows;
  using EncodeFn = at::Tensor(const at::Tensor&, int64_t);
  static auto encode_op = op<EncodeFn>("hps::encode_rows");
  return encode_op.call(rows, storage_);
}

at::Tensor LookupPipeline::decode(const at::Tensor& stored) const {
  if (storage_ == kStoreFloat32) return stored;
  using DecodeFn = at::Tensor(const at::Tensor&, std::optional<at::ScalarType>);
  static auto decode_op = op<DecodeFn>("hps::decode_rows");
  return decode_op.call(stored.contiguous(), std::nullopt);
}

// Rows of u distinct keys as this table stores them: the second level, the host-memory map, the lower tiers for
// what those lack, then the default vector. Every level keeps the table's stored rows, so each is copied as bytes -
// nothing is decoded or encoded on the miss path (re-encoding a decoded scaled row would not give its bytes back).
void LookupPipeline::fetch_rows(const int64_t* keys, int64_t u, uint8_t* rows, bool* found) {
  if (u == 0) return;
  std::fill(found, found + u, false);
  const uint8_t* def = static_cast<const uint8_t*>(default_row_host_.data_ptr());
  const size_t rb = static_cast<size_t>(row_bytes_);
  int64_t hits = 0;
  if (second_level_) {
    hits = second_level_->read_rows(keys, u, rows, found);
    stats_[kStatSecondLevelHits] += hits;
    if (hits < u && second_level_->answers_all()) {
      // The second level holds every key any tier holds: the rest get the default vector.
      for (int64_t k = 0; k < u; ++k) {
        if (!found[k]) std::memcpy(rows + k * rb, def, rb);
      }
      return;
    }
  }
  const at::ScalarType stored_type = storage_dtype(storage_);
  const int64_t width = stored_width(storage_, dim_);
  if (hits < u && source_) {
    std::vector<int64_t> rest;  // positions the second level lacked (all of them without one)
    for (int64_t k = 0; k < u; ++k) {
      if (!found[k]) rest.push_back(k);
    }
    const int64_t q = static_cast<int64_t>(rest.size());
    if (q == u) {
      at::Tensor k = at::from_blob(const_cast<int64_t*>(keys), {u}, at::kLong);
      at::Tensor r = at::from_blob(rows, {u, width}, stored_type);
      at::Tensor f = at::from_blob(found, {u}, at::kBool);
      source_->fetch_into(k, r, f);
    } else {
      std::vector<int64_t> rest_keys(q);
      for (int64_t i = 0; i < q; ++i) rest_keys[i] = keys[rest[i]];
      at::Tensor r = at::empty({q, width}, stored_type);
      at::Tensor f = at::empty({q}, at::kBool);
      source_->fetch_into(at::from_blob(rest_keys.data(), {q}, at::kLong), r, f);
      const uint8_t* rp = static_cast<const uint8_t*>(r.data_ptr());
      const bool* fp = f.data_ptr<bool>();
      for (int64_t i = 0; i < q; ++i) {
        if (!fp[i]) continue;
        std::memcpy(rows + rest[i] * rb, rp + i * rb, rb);
        found[rest[i]] = true;
      }
    }
    int64_t source_hits = 0;
    for (int64_t k = 0; k < u; ++k) source_hits += found[k];
    source_hits -= hits;
    stats_[kStatSourceHits] += source_hits;
    hits += source_hits;
  }
  if (hits == u) return;
  std::vector<int64_t> missing;
  std::vector<int64_t> missing_keys;
  for (int64_t k = 0; k < u; ++k) {
    if (!found[k]) {
      missing.push_back(k);
      missing_keys.push_back(keys[k]);
    }
  }
  const int64_t q = static_cast<int64_t>(missing.size());
  if (lower_tiers_ != nullptr) {
    std::vector<uint8_t> tier_rows(static_cast<size_t>(q) * rb);
    std::unique_ptr<bool[]> tier_found(new bool[q]);
    std::fill(tier_found.get(), tier_found.get() + q, false);
    const int64_t rc = lower_tiers_(lower_token_, missing_keys.data(), q, tier_rows.data(), tier_found.get());
    TORCH_CHECK(rc == 0, tag_, ": the lower tiers failed to answer ", q, " keys (the error is in the log)");
    stats_[kStatLowerTierKeys] += q;
    int64_t tier_hits = 0;
    for (int64_t i = 0; i < q; ++i) {
      const int64_t k = missing[i];
      if (tier_found[i]) {
        std::memcpy(rows + k * rb, tier_rows.data() + i * rb, rb);
        found[k] = true;
        ++tier_hits;
      }
    }
    stats_[kStatLowerTierHits] += tier_hits;
  }
  for (int64_t i = 0; i < q; ++i) {
    const int64_t k = missing[i];
    if (!found[k]) std::memcpy(rows + k * rb, def, rb);
  }
}

// Resident tables: rows for keys (present keys keep theirs; new keys get the next free row while capacity lasts,
// growing the row array first when `may_grow`; -1 when neither), and the index buckets that changed.
void LookupPipeline::resident_put(const int64_t* keys, int64_t u, bool may_grow, std::vector<int32_t>* row_ids,
                                  std::vector<int64_t>* touched, bool* rebuilt) {
  row_ids->resize(u);
  int64_t new_keys = 0;
  for (int64_t k = 0; k < u; ++k) new_keys += index_->row_of(keys[k]) < 0;
  if (may_grow && next_row_ + new_keys > capacity_) grow_rows(next_row_ + new_keys);
  for (int64_t k = 0; k < u; ++k) {
    const int64_t row = index_->row_of(keys[k]);
    if (row >= 0) {
      (*row_ids)[k] = static_cast<int32_t>(row);
      continue;
    }
    if (next_row_ >= capacity_) {
      (*row_ids)[k] = -1;
      if (!misses_to_tiers_) overflowed_ = true;
      continue;
    }
    const int32_t r = static_cast<int32_t>(next_row_++);
    index_->put(keys[k], r, touched, rebuilt);
    (*row_ids)[k] = r;
  }
  std::sort(touched->begin(), touched->end());
  touched->erase(std::unique(touched->begin(), touched->end()), touched->end());
}

void LookupPipeline::grow_rows(int64_t needed) {
  TORCH_CHECK_VALUE(!rows_on_host_, tag_, ": a host-mapped table cannot grow");
  int64_t cap = std::max<int64_t>(needed, capacity_ + capacity_ / 8 + 1024);  // HBM is scarce: grow by 1/8
  cap = std::min<int64_t>(cap, (int64_t{1} << 31) - 1);
  TORCH_CHECK_VALUE(cap >= needed, tag_, ": more than 2^31 - 1 resident rows");
  if (device_.is_cuda()) {
    TORCH_WARN(tag_, " on ", device_, ": the resident table grows from ", capacity_, " to ", cap,
               " rows; CUDA graphs captured over it must be captured again");
  }
  at::Tensor bigger = at::empty({cap, rows_.size(1)}, rows_.options());
  bigger.narrow(0, 0, next_row_).copy_(rows_.narrow(0, 0, next_row_));
  rows_ = bigger;
  capacity_ = cap;
}

void LookupPipeline::resident_upload_index() {
  if (device_.is_cpu()) return;
  const auto on_device = at::TensorOptions().device(device_);
  dindex_keys_ = index_->keys_tensor().to(on_device);
  dindex_digests_ = index_->digests_tensor().to(on_device);
  dindex_rows_ = index_->rows_tensor().to(on_device);
  dindex_spill_ = index_->spill_tensor().to(on_device);
}

// Scatter m positions from u fetched rows and store the rows (insert: cache insert, or resident rows + index).
void LookupPipeline::apply_plan(const OutRows& out, const int32_t* pos, const int32_t* inv, int64_t m, const int64_t* ukeys,
                                const void* rows, int64_t u, bool grouped, bool insert) {
  Workspace& w = *ws_;
  ApplyArgs a;
  a.out = out.data;
  a.out_dtype = out.dtype;
  a.dim = dim_;
  a.storage = storage_;
  a.pos = pos;
  a.inv = inv;
  a.m = m;
  a.rows = rows;
  a.u = u;
  const bool cache = kind_ == kDynamicCache;
  bool rebuilt = false;
  std::vector<int32_t>& row_ids = w.row_ids;
  std::vector<int64_t>& touched = w.touched;
  touched.clear();
  if (insert && !cache) resident_put(ukeys, u, /*may_grow=*/answers_all(), &row_ids, &touched, &rebuilt);
  if (insert && cache && grouped) {
    a.ukeys = ukeys;
    set_cache_state(a, slot_keys_, digests_, scores_, values_, clock_);
    a.lru = policy_ == kPolicyLRU;
    a.counts = ctrl_.data_ptr<int64_t>() + kCtrlInserted;
    if (sketch_.defined()) {
      a.sketch = sketch_.data_ptr<int32_t>();
      a.sketch_width = sketch_width();
    }
  }
  const auto insert_sorted_keys = [&](const at::Tensor& k, const at::Tensor& r) {
    static auto insert_op = op<CacheInsertFn>("hps::cache_insert_or_assign");
    at::Tensor counts = insert_op.call(slot_keys_, digests_, scores_, values_, clock_, k, r, policy_, sketch_arg());
    ctrl_.narrow(0, kCtrlInserted, 4).add_(counts);
  };

  if (device_.is_cpu()) {
    if (insert && !cache) {
      a.row_ids = row_ids.data();
      a.table_rows = rows_.data_ptr();
    }
    cpu::apply(a);
    if (insert && cache && !grouped && u > 0) {
      insert_sorted_keys(at::from_blob(const_cast<int64_t*>(ukeys), {u}, at::kLong),
                         at::from_blob(const_cast<void*>(rows), {u, values_.size(1)}, values_.scalar_type()));
    }
    return;
  }
#ifdef HPS_WITH_CUDA
  const c10::cuda::CUDAGuard guard(device_);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(device_.index()).stream();
  // The plan this call built lives in w.plan_h as [pos][inv][ukeys][rows]...; lay out the resident extras after it.
  const int64_t pushes = rebuilt ? 0 : static_cast<int64_t>(touched.size());
  const PlanLayout L = PlanLayout::make(m, u, row_bytes_, pushes);
  uint8_t* base = w.plan_h.defined() ? w.plan_h.data_ptr<uint8_t>() : nullptr;
  const bool in_plan = base != nullptr && reinterpret_cast<const uint8_t*>(rows) == base + L.rows &&
                       w.plan_h.size(0) >= L.bytes;
  if (!in_plan) {  // the caller's buffers (the async worker's): stage them in this workspace's plan layout
    uint8_t* p = w.plan(L.bytes);
    if (m > 0) {
      std::memcpy(p + L.pos, pos, m * 4);
      std::memcpy(p + L.inv, inv, m * 4);
    }
    std::memcpy(p + L.ukeys, ukeys, u * 8);
    std::memcpy(p + L.rows, rows, u * row_bytes_);
    base = p;
  }
  if (insert && !cache) {
    std::memcpy(base + L.row_ids, row_ids.data(), u * 4);
    for (int64_t k = 0; k < pushes; ++k) {
      const int64_t b = touched[k];
      reinterpret_cast<int64_t*>(base + L.push_buckets)[k] = b;
      std::memcpy(base + L.push_keys + k * kBucketSize * 8, index_->keys() + b * kBucketSize, kBucketSize * 8);
      std::memcpy(base + L.push_rows + k * kBucketSize * 4, index_->rows() + b * kBucketSize, kBucketSize * 4);
      std::memcpy(base + L.push_digests + k * kBucketSize, index_->digests() + b * kBucketSize, kBucketSize);
      (base + L.push_spill)[k] = index_->spill()[b];
    }
    if (rebuilt) resident_upload_index();
  }
  // Small plans are read by the kernel from pinned memory; large ones (and key-ordered inserts, which the insert
  // op reads as device tensors) are copied first.
  const bool copy = L.bytes > kZeroCopyPlanBytes || (insert && cache && !grouped);
  const uint8_t* src = base;
  if (copy) {
    if (!w.plan_d.defined() || w.plan_d.size(0) < L.bytes) {
      w.plan_d = at::empty({L.bytes + L.bytes / 2}, at::TensorOptions().dtype(at::kByte).device(device_));
    }
    C10_CUDA_CHECK(cudaMemcpyAsync(w.plan_d.data_ptr<uint8_t>(), base, L.bytes, cudaMemcpyHostToDevice, stream));
    src = w.plan_d.data_ptr<uint8_t>();
  }
  a.pos = reinterpret_cast<const int32_t*>(src + L.pos);
  a.inv = reinterpret_cast<const int32_t*>(src + L.inv);
  a.rows = src + L.rows;
  if (a.ukeys != nullptr) a.ukeys = reinterpret_cast<const int64_t*>(src + L.ukeys);
  if (insert && !cache) {
    a.row_ids = reinterpret_cast<const int32_t*>(src + L.row_ids);
    a.table_rows = rows_.data_ptr();
    a.num_push = pushes;
    a.push_buckets = reinterpret_cast<const int64_t*>(src + L.push_buckets);
    a.push_keys = reinterpret_cast<const int64_t*>(src + L.push_keys);
    a.push_rows = reinterpret_cast<const int32_t*>(src + L.push_rows);
    a.push_digests = src + L.push_digests;
    a.push_spill = src + L.push_spill;
    a.index_keys = dindex_keys_.data_ptr<int64_t>();
    a.index_rows = dindex_rows_.data_ptr<int32_t>();
    a.index_digests = dindex_digests_.data_ptr<uint8_t>();
    a.index_spill = dindex_spill_.data_ptr<uint8_t>();
  }
  cuda::launch_apply(a, stream);
  if (insert && cache && !grouped && u > 0) {
    const auto opts = at::TensorOptions().device(device_);
    insert_sorted_keys(at::from_blob(const_cast<uint8_t*>(src + L.ukeys), {u}, opts.dtype(at::kLong)),
                       at::from_blob(const_cast<uint8_t*>(src + L.rows), {u, values_.size(1)},
                                     opts.dtype(values_.scalar_type())));
  }
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Asynchronous inserts (HPS hit_rate_threshold < 1): fetch without the lock, store under it.

void LookupPipeline::async_loop() {
  Workspace own;
  own.pinned = device_.is_cuda();
#ifdef HPS_WITH_CUDA
  std::optional<c10::cuda::CUDAStream> stream;
  if (device_.is_cuda()) stream = c10::cuda::getStreamFromPool(false, device_.index());
#endif
  for (;;) {
    AsyncJob job;
    {
      std::unique_lock<std::mutex> alock(async_mu_);
      async_cv_.wait(alock, [&] { return async_stop_ || !async_queue_.empty(); });
      if (async_queue_.empty()) return;  // stopping, nothing left
      job = std::move(async_queue_.front());
      async_queue_.pop_front();
      ++async_running_;
    }
    try {
      const int64_t u = static_cast<int64_t>(job.keys.size());
      const PlanLayout L = PlanLayout::make(0, u, row_bytes_, 0);
      uint8_t* plan = own.plan(L.bytes);
      int64_t* ukeys = reinterpret_cast<int64_t*>(plan + L.ukeys);
      uint8_t* rows = plan + L.rows;
      std::memcpy(ukeys, job.keys.data(), u * 8);
      own.found.resize(u);
      fetch_rows(ukeys, u, rows, reinterpret_cast<bool*>(own.found.data()));
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (closed_) {
        } else if (job.version != version_) {
          stats_[kStatStaleInserts] += u;
        } else {
#ifdef HPS_WITH_CUDA
          std::optional<c10::cuda::CUDAStreamGuard> sg;
          if (stream) sg.emplace(*stream);
#endif
          quiesce();
          apply_plan(OutRows{}, nullptr, nullptr, 0, ukeys, rows, u, job.grouped, /*insert=*/true);
        }
      }
    } catch (const std::exception& e) {
      TORCH_WARN(tag_, ": an asynchronous cache insert failed: ", e.what());
    }
    {
      std::lock_guard<std::mutex> alock(async_mu_);
      --async_running_;
    }
    async_cv_.notify_all();
  }
}

void LookupPipeline::wait_inserts() {
  GilRelease nogil;
  std::unique_lock<std::mutex> alock(async_mu_);
  async_cv_.wait(alock, [&] { return async_queue_.empty() && async_running_ == 0; });
}

// ---------------------------------------------------------------------------------------------------------------
// Loading, updates and maintenance (each under the lock)

void LookupPipeline::load(const at::Tensor& keys, const at::Tensor& rows) {
  check_has_table("rows to load");
  if (kind_ == kDynamicCache) return insert(keys, rows);
  HPS_CHECK_DTYPE(keys, at::kLong);
  HPS_CHECK_CPU(keys);
  HPS_CHECK_DIM(keys, 1);
  check_rows(rows, keys.size(0));
  GilRelease nogil;
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  const int64_t k = keys.size(0);
  if (next_row_ + k > capacity_) grow_rows(next_row_ + k);
  const at::Tensor kc = keys.contiguous();
  const int64_t* kp = kc.data_ptr<int64_t>();
  for (int64_t i = 0; i < k; ++i) index_->put(kp[i], static_cast<int32_t>(next_row_ + i), nullptr, nullptr);
  rows_.narrow(0, next_row_, k).copy_(encode(rows.contiguous()));
  next_row_ += k;
  index_dirty_ = !device_.is_cpu();
}

void LookupPipeline::load_like(const c10::intrusive_ptr<LookupPipeline>& other) {
  TORCH_CHECK_VALUE(kind_ == kResident && other->kind_ == kResident && other->dim_ == dim_ &&
                        other->storage_ == storage_ && other->rows_on_host_ == rows_on_host_,
                    tag_, ": load_like needs a resident table of the same dim, storage and row placement");
  GilRelease nogil;
  std::lock_guard<std::mutex> lock(mu_);
  std::lock_guard<std::mutex> other_lock(other->mu_);
  index_ = std::make_unique<ResidentIndex>(*other->index_);
  next_row_ = other->next_row_;
  index_dirty_ = false;
  capacity_ = other->capacity_;
  overflowed_ = other->overflowed_.load();  // keys that did not fit there did not fit here either
  if (rows_on_host_) {
    rows_ = other->rows_;  // one pinned copy serves every GPU
  } else {
    rows_ = other->rows_.to(rows_.options());
  }
  resident_upload_index();
}

void LookupPipeline::insert(const at::Tensor& keys, const at::Tensor& rows) {
  check_has_table("rows to insert");
  if (kind_ == kResident) return load(keys, rows);
  check_rows(rows, keys.size(0));
  GilRelease nogil;
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  if (device_.is_cuda()) order_stream();
  static auto insert_op = op<CacheInsertFn>("hps::cache_insert_or_assign");
  at::Tensor counts = insert_op.call(slot_keys_, digests_, scores_, values_, clock_, keys.to(device_),
                                     encode(rows.to(device_).contiguous()), policy_, sketch_arg());
  ctrl_.narrow(0, kCtrlInserted, 4).add_(counts);
}

int64_t LookupPipeline::update(const at::Tensor& keys, const at::Tensor& rows) {
  check_has_table("rows to update");
  HPS_CHECK_DTYPE(keys, at::kLong);
  HPS_CHECK_CPU(keys);
  check_rows(rows, keys.size(0));
  GilRelease nogil;
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  ++version_;
  stats_[kStatUpdates] += 1;
  const int64_t u = keys.size(0);
  if (u == 0) return 0;
  if (kind_ == kDynamicCache) {
    if (device_.is_cuda()) order_stream();
    using AssignFn = at::Tensor(const at::Tensor&, const at::Tensor&, at::Tensor&, const at::Tensor&,
                                const at::Tensor&);
    static auto assign = op<AssignFn>("hps::cache_assign");
    return assign.call(slot_keys_, digests_, values_, keys.to(device_), encode(rows.to(device_).contiguous()))
        .item<int64_t>();
  }
  sync_index();
  quiesce();
  const at::Tensor kc = keys.contiguous();
  const at::Tensor rc = encode(rows.contiguous());
  const int64_t* kp = kc.data_ptr<int64_t>();
  int64_t present = 0;
  for (int64_t k = 0; k < u; ++k) present += index_->row_of(kp[k]) >= 0;
  if (rows_on_host_) {
    // One pinned copy shared by every GPU: let their reads finish, then write it from here.
#ifdef HPS_WITH_CUDA
    for (int d = 0; d < c10::cuda::device_count(); ++d) c10::cuda::device_synchronize();
#endif
    std::vector<int32_t> row_ids;
    std::vector<int64_t> touched;
    bool rebuilt = false;
    resident_put(kp, u, false, &row_ids, &touched, &rebuilt);
    uint8_t* dst = static_cast<uint8_t*>(rows_.data_ptr());
    const uint8_t* src = static_cast<const uint8_t*>(rc.data_ptr());
    for (int64_t k = 0; k < u; ++k) {
      if (row_ids[k] >= 0) std::memcpy(dst + row_ids[k] * row_bytes_, src + k * row_bytes_, row_bytes_);
    }
    if (!touched.empty() || rebuilt) resident_upload_index();
    return present;
  }
  // Through the apply path: rows to their (new or existing) rows, index buckets pushed.
  apply_plan(OutRows{}, nullptr, nullptr, 0, kp, rc.data_ptr(), u, false, /*insert=*/true);
  return present;
}

std::tuple<at::Tensor, int64_t> LookupPipeline::export_keys(int64_t start, int64_t end) {
  check_has_table("keys to export");
  GilRelease nogil;
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  const int64_t slots = kind_ == kDynamicCache ? slot_keys_.size(0) : index_->num_slots();
  TORCH_CHECK_VALUE(0 <= start && start <= end && end <= slots, "export_keys needs 0 <= start <= end <= ", slots,
                    ", found ", start, ", ", end);
  if (kind_ == kDynamicCache) {
    if (device_.is_cuda()) order_stream();
    using ExportFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&, int64_t, int64_t);
    static auto export_op = op<ExportFn>("hps::cache_export_batch");
    auto [k, v, count] = export_op.call(slot_keys_, digests_, values_, start, end);
    return {k.narrow(0, 0, count.item<int64_t>()).to(at::kCPU), version_};
  }
  std::vector<int64_t> keys;
  for (int64_t s = start; s < end; ++s) {
    if (index_->digests()[s] != kEmptyDigest) keys.push_back(index_->keys()[s]);
  }
  return {at::tensor(keys, at::kLong), version_};
}

at::Tensor LookupPipeline::fetch_stored(const at::Tensor& keys) {
  HPS_CHECK_DTYPE(keys, at::kLong);
  HPS_CHECK_CPU(keys);
  HPS_CHECK_DIM(keys, 1);
  const at::Tensor kc = keys.contiguous();
  const int64_t u = kc.numel();
  at::Tensor rows = at::empty({u, stored_width(storage_, dim_)}, storage_dtype(storage_));
  std::vector<uint8_t> found(static_cast<size_t>(u));
  GilRelease nogil;  // the lower tiers' callback takes the GIL itself
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  fetch_rows(kc.data_ptr<int64_t>(), u, static_cast<uint8_t*>(rows.data_ptr()), reinterpret_cast<bool*>(found.data()));
  return rows;
}

int64_t LookupPipeline::assign_if_version(const at::Tensor& keys, const at::Tensor& rows, int64_t version) {
  check_has_table("rows to assign");
  HPS_CHECK_DTYPE(keys, at::kLong);
  HPS_CHECK_CPU(keys);
  check_rows(rows, keys.size(0));
  GilRelease nogil;
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  if (version != version_) return -1;
  const int64_t u = keys.size(0);
  if (u == 0) return 0;
  if (device_.is_cuda()) order_stream();
  int64_t assigned = 0;
  if (kind_ == kDynamicCache) {
    using AssignFn = at::Tensor(const at::Tensor&, const at::Tensor&, at::Tensor&, const at::Tensor&,
                                const at::Tensor&);
    static auto assign = op<AssignFn>("hps::cache_assign");
    assigned = assign.call(slot_keys_, digests_, values_, keys.to(device_), encode(rows.to(device_).contiguous()))
                   .item<int64_t>();
  } else {
    const at::Tensor kc = keys.contiguous();
    std::vector<int64_t> row_of(u);
    for (int64_t k = 0; k < u; ++k) {
      row_of[k] = index_->row_of(kc.data_ptr<int64_t>()[k]);
      assigned += row_of[k] >= 0;
    }
    at::Tensor ids = at::tensor(row_of, at::kLong);
    at::Tensor keep = ids.ge(0);
    rows_.view(at::kByte).index_copy_(
        0, ids.masked_select(keep).to(rows_.device()),
        encode(rows.index_select(0, keep.nonzero().squeeze(1)).contiguous()).view(at::kByte).to(rows_.device()));
  }
  stats_[kStatRefreshedKeys] += assigned;
  return assigned;
}

std::tuple<at::Tensor, at::Tensor> LookupPipeline::export_all() {
  check_has_table("rows to export");
  GilRelease nogil;
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  if (device_.is_cuda()) order_stream();
  if (kind_ == kDynamicCache) {
    using ExportFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&, int64_t, int64_t);
    static auto export_op = op<ExportFn>("hps::cache_export_batch");
    auto [k, v, count] = export_op.call(slot_keys_, digests_, values_, 0, slot_keys_.size(0));
    const int64_t c = count.item<int64_t>();
    return {k.narrow(0, 0, c), decode(v.narrow(0, 0, c))};
  }
  std::vector<int64_t> keys, row_ids;
  for (int64_t s = 0; s < index_->num_slots(); ++s) {
    if (index_->digests()[s] != kEmptyDigest) {
      keys.push_back(index_->keys()[s]);
      row_ids.push_back(index_->rows()[s]);
    }
  }
  at::Tensor ids = at::tensor(row_ids, at::kLong).to(rows_.device());
  return {at::tensor(keys, at::kLong).to(device_),
          decode(rows_.view(at::kByte).index_select(0, ids).view(rows_.scalar_type()).to(device_))};
}

at::Tensor LookupPipeline::contains(const at::Tensor& keys) {
  check_has_table("keys to look for");
  HPS_CHECK_KEY_DTYPE(keys);
  GilRelease nogil;
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  if (kind_ == kDynamicCache) {
    if (device_.is_cuda()) order_stream();
    static auto contains_op =
        op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("hps::cache_contains");
    return contains_op.call(slot_keys_, digests_, keys.reshape({-1}).contiguous().to(device_)).to(keys.device());
  }
  const at::Tensor kc = keys.reshape({-1}).to(at::kCPU, at::kLong).contiguous();
  at::Tensor found = at::empty({kc.numel()}, at::kBool);
  for (int64_t i = 0; i < kc.numel(); ++i) found.data_ptr<bool>()[i] = index_->find(kc.data_ptr<int64_t>()[i]) >= 0;
  return found.to(keys.device());
}

int64_t LookupPipeline::size() {
  if (kind_ == kPassThrough) return 0;
  GilRelease nogil;
  std::lock_guard<std::mutex> lock(mu_);
  if (kind_ == kResident) return index_->size();
  if (device_.is_cuda()) order_stream();
  static auto size_op = op<at::Tensor(const at::Tensor&)>("hps::cache_size");
  return size_op.call(digests_).item<int64_t>();
}

int64_t LookupPipeline::num_slots() {
  std::lock_guard<std::mutex> lock(mu_);
  if (kind_ == kPassThrough) return 0;
  return kind_ == kDynamicCache ? slot_keys_.size(0) : index_->num_slots();
}

void LookupPipeline::clear() {
  check_has_table("rows to clear");
  GilRelease nogil;
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  if (device_.is_cuda()) order_stream();
  ++version_;
  if (kind_ == kDynamicCache) {
    static auto clear_op = op<void(at::Tensor&, at::Tensor&, at::Tensor&)>("hps::cache_clear");
    clear_op.call(digests_, scores_, clock_);
    clock_host_ = 0;
    if (sketch_.defined()) sketch_.zero_();
    keys_since_ageing_ = 0;
    return;
  }
  index_ = std::make_unique<ResidentIndex>(capacity_);
  next_row_ = 0;
  index_dirty_ = false;
  resident_upload_index();
}

int64_t LookupPipeline::memory_bytes() {
  std::lock_guard<std::mutex> lock(mu_);
  if (kind_ == kPassThrough) return 0;
  if (kind_ == kDynamicCache) {
    int64_t bytes = 0;
    for (const at::Tensor* t : {&slot_keys_, &digests_, &scores_, &values_, &clock_}) bytes += t->nbytes();
    if (sketch_.defined()) bytes += sketch_.nbytes();
    return bytes;
  }
  return static_cast<int64_t>(rows_.nbytes()) + index_->memory_bytes();
}

at::Tensor LookupPipeline::counters() {
  GilRelease nogil;
  std::lock_guard<std::mutex> lock(mu_);
  if (device_.is_cuda()) order_stream();
  at::Tensor out = at::empty({static_cast<int64_t>(kStatCount) + static_cast<int64_t>(kCtrlSize)}, at::kLong);
  for (int64_t i = 0; i < kStatCount; ++i) out.data_ptr<int64_t>()[i] = stats_[i].load();
  out.narrow(0, kStatCount, kCtrlSize).copy_(ctrl_);
  return out;
}

at::Tensor LookupPipeline::latencies(int64_t stage) {
  TORCH_CHECK_VALUE(stage >= 0 && stage < kStageCount, "stage must be in [0, ", kStageCount, "), found ", stage);
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t n = std::min(latency_count_[stage], kLatencyWindow);
  return at::tensor(std::vector<double>(latency_[stage].begin(), latency_[stage].begin() + n), at::kDouble);
}

// ---------------------------------------------------------------------------------------------------------------

void register_pipeline(torch::Library& m) {
  using P = LookupPipeline;
  using Ptr = c10::intrusive_ptr<P>;
  m.class_<P>("LookupPipeline")
      .def(torch::init<int64_t, std::string, int64_t, int64_t, int64_t, double, int64_t, bool, bool, std::string,
                       int64_t>())
      .def("set_source", &P::set_source)
      .def("storage", &P::storage)
      .def("set_lower_tiers", &P::set_lower_tiers)
      .def("set_async", &P::set_async)
      .def("set_admission", &P::set_admission)
      .def("set_second_level", &P::set_second_level)
      .def("lookup", [](const Ptr& self, const at::Tensor& keys) { return self->lookup(keys); })
      .def("load", &P::load)
      .def("load_like", &P::load_like)
      .def("insert", &P::insert)
      .def("update", &P::update)
      .def("export_keys", &P::export_keys)
      .def("assign_if_version", &P::assign_if_version)
      .def("fetch_stored", &P::fetch_stored)
      .def("export_all", &P::export_all)
      .def("contains", &P::contains)
      .def("size", &P::size)
      .def("num_slots", &P::num_slots)
      .def("capacity", &P::capacity)
      .def("clear", &P::clear)
      .def("memory_bytes", &P::memory_bytes)
      .def("wait_inserts", &P::wait_inserts)
      .def("counters", &P::counters)
      .def("latencies", &P::latencies)
      .def("handle", [](const Ptr& self) { return self->handle(self); })
      .def("tag", &P::tag)
      .def("dim", &P::dim)
      .def("device", &P::device)
      .def("kind", &P::kind)
      .def("rows_ptr", [](const Ptr& self) { return self->rows_ptr(); })
      .def("answers_all", &P::answers_all)
      .def("close", &P::close);
}

namespace {
// hps::lookup (schema in hps_ops.cpp), registered for both backends below.
at::Tensor lookup_by_handle(int64_t handle, const at::Tensor& keys, std::optional<at::ScalarType> dtype) {
  return find_pipeline(handle)->lookup(keys, dtype);
}

void write_error(const char* text, char* err, int64_t capacity) {
  if (err == nullptr || capacity <= 0) return;
  std::strncpy(err, text, static_cast<size_t>(capacity - 1));
  err[capacity - 1] = '\0';
}
}  // namespace

// The lookup of a framework op that reaches the engine without Python (the TF op's native route): n keys (int64
// when key_is_int64, else int32) in host memory -> out (n x dim float32, the caller's buffer) through the CPU
// pipeline `handle`. Returns 0, kNativeStale (-1) when no open pipeline has the handle (the caller routes again),
// or an absl status code (3 invalid argument, 9 failed precondition, 13 internal) with a message in err.
extern "C" __attribute__((visibility("default"))) int hps_native_lookup(int64_t handle, const void* keys, int64_t n,
                                                                        int key_is_int64, float* out, char* err,
                                                                        int64_t err_capacity) {
  constexpr int kNativeStale = -1;
  try {
    const c10::intrusive_ptr<LookupPipeline> p = pipeline_or_null(handle);
    if (!p || p->closed()) return kNativeStale;
    const at::Tensor k = at::from_blob(const_cast<void*>(keys), {n}, key_is_int64 ? at::kLong : at::kInt);
    p->check_keys(k);
    if (!p->on_cpu()) return kNativeStale;
    at::Tensor o = at::from_blob(out, {n, p->dim()}, at::kFloat);
    if (n > 0) p->lookup_into(k, o);
    return 0;
  } catch (const c10::Error& e) {
    write_error(e.what_without_backtrace(), err, err_capacity);
    const bool bad_input = dynamic_cast<const c10::ValueError*>(&e) || dynamic_cast<const c10::TypeError*>(&e);
    return bad_input ? 3 : 9;
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_capacity);
    return 13;
  }
}

TORCH_LIBRARY_IMPL(hps, CPU, m) { m.impl("lookup", &lookup_by_handle); }
#ifdef HPS_WITH_CUDA
TORCH_LIBRARY_IMPL(hps, CUDA, m) { m.impl("lookup", &lookup_by_handle); }
#endif

}  // namespace hps
