// LookupPipeline: one table on one device - the table's state (a dynamic cache, or a resident row array behind a
// host-built index) and the whole lookup over it, in native code, from one call with the GIL released
// (torch.classes.hps.LookupPipeline; the hot call is the op hps::lookup(handle, keys)).
//
// One lookup:
//   find (one launch: rows or the default row out, misses appended to a list, counters updated, clock bumped)
//   -> nothing else when the table answers every key by itself: a static table (HPS: a key it lacks gets the
//      default vector), or any table while a CUDA graph is being captured (misses then get the default vector)
//   -> else the miss count is read from pinned memory the find's last block writes (no stream sync): 0 -> done;
//   -> k misses: de-duplicated and planned on the host (on the device for very large lists), rows fetched from
//      the host-memory tier's map into pinned memory, what the map lacks from the lower tiers through a callback
//      (Python: Redis, RocksDB), the default vector for the rest; then one launch scatters the rows into the
//      output and stores them (cache insert, or resident rows + index buckets). The plan travels to the device
//      in the same launch (the kernel reads pinned memory) or by one copy when it is large.
//   -> HPS's asynchronous insertion (hit rate >= hit_rate_threshold): the batch keeps the default vector for its
//      misses (the find wrote it) and a worker thread of this pipeline fetches and inserts them later.
//   -> a dynamic cache on a GPU over a host-mapped second level that holds every key (set_second_level): no host
//      step at all - the misses are probed in the second level's device index, their rows copied from pinned
//      memory and inserted by kernels on the same stream (second_level_direct); capturable.
// Every call on a table runs under the pipeline's lock; GPU work goes to the caller's current stream, and a call
// from another stream than the last one first waits for the last one's work (an event), so the table sees one
// total order of operations.
#pragma once

#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "cpu/host_map.h"
#include "lookup_layout.h"
#include "resident_index.h"

namespace hps {

// Lower tiers, called for the distinct missed keys the host map lacks: fill rows (n stored rows of the table's
// storage, row-major bytes) and found (n,) for the keys a tier holds; return 0, or nonzero on an error (the lookup
// then raises). Called with this pipeline's lock held and the GIL released (a ctypes callback takes the GIL itself).
using LowerTierFn = int64_t (*)(int64_t token, const int64_t* keys, int64_t n, void* rows, bool* found);

// Host-side counters of a pipeline (the device control block holds lookups, keys, misses, insert counts).
enum PipelineStat : int64_t {
  kStatMissesPlanned = 0,  // miss positions the host path saw (synchronous and asynchronous)
  kStatUniqueMisses,       // their distinct keys
  kStatSourceHits,         // distinct keys found in the host-memory map
  kStatLowerTierKeys,      // distinct keys asked of the lower tiers
  kStatLowerTierHits,      // ... and found there
  kStatDefaultsPlanned,    // positions given the default vector by the host path (lower tiers lacked the key, or
                           // an asynchronous insert will fetch it)
  kStatAsyncBatches,
  kStatStaleInserts,       // keys of asynchronous inserts dropped because an update came in between
  kStatUpdates,
  kStatRefreshedKeys,
  kStatSecondLevelHits,    // distinct keys found in the second level (a host-mapped table below a cache)
  kStatCount,
};

// Latency stages recorded per lookup (seconds, the most recent kLatencyWindow of each).
enum PipelineStage : int64_t { kStageTotal = 0, kStageFind, kStagePlan, kStageFetch, kStageApply, kStageCount };
constexpr int64_t kLatencyWindow = 8192;

class LookupPipeline : public torch::CustomClassHolder {
 public:
  enum Kind : int64_t { kDynamicCache = 0, kResident = 1, kPassThrough = 2 };

  // kind: kDynamicCache (capacity = rows wanted, rounded up to whole buckets; policy LRU/LFU), kResident
  //   (capacity = rows it may hold; loaded with load()) or kPassThrough (CPU only, capacity 0: a table without a
  //   cache - HPS gpucache false - every key position straight from the host map, the lower tiers and the default
  //   vector, no de-duplication, nothing stored). misses_to_tiers (resident only): false = a key the table
  //   lacks gets the default vector (HPS static tables), true = it is looked up in the tiers (and stored while
  //   the capacity lasts). rows_on_host (resident, CUDA only): rows in pinned host memory (HPS uvm) instead of HBM.
  //   storage (row_codec.h): how the table keeps its rows; rows arrive as float32 and are encoded once on the way
  //   in, lookups decode them into their output.
  LookupPipeline(int64_t kind, const std::string& device, int64_t dim, int64_t capacity, int64_t policy,
                 double default_value, int64_t max_keys, bool misses_to_tiers, bool rows_on_host,
                 const std::string& tag, int64_t storage);
  ~LookupPipeline() override;
  void release_resources() override;

  // Wiring (before the first lookup).
  void set_source(int64_t host_map_handle);  // -1: no host-memory tier
  void set_lower_tiers(int64_t fn, int64_t token);  // fn: a LowerTierFn address, 0 for none
  void set_async(double hit_rate_threshold, int64_t max_pending);  // threshold > 1: always synchronous
  // Admission (an LFU dynamic cache; cache_layout.h): a count-min sketch of 4 x the next power of two >= 4 x slots
  // counters counts every miss of every find; inserts that would evict admit only keys whose estimate beats the
  // victim's hit count. Every `window` keys looked up the sketch and the scores are halved. window 0: off.
  void set_admission(int64_t window);
  // A dynamic cache's second level: a resident table of the same table whose rows the host can read (on the CPU,
  // or host-mapped on a GPU), consulted for the cache's misses before the host map and the lower tiers. When it
  // answers every key, a key it lacks gets the default vector without asking the tiers.
  void set_second_level(const c10::intrusive_ptr<LookupPipeline>& second);

  // The hot path: keys int32/int64 of any shape on this pipeline's device -> keys.shape + (dim,) in `dtype`
  // (float32 by default; bfloat16 / float16: each row rounded to nearest even as it is written).
  at::Tensor lookup(const at::Tensor& keys, std::optional<at::ScalarType> dtype = std::nullopt);
  // The lookup of checked, contiguous flat keys (n > 0) into out (n x dim, float32 / bfloat16 / float16, contiguous,
  // on this device).
  void lookup_into(const at::Tensor& flat, at::Tensor& out);
  void check_keys(const at::Tensor& keys) const;
  bool closed() const { return closed_; }
  bool on_cpu() const { return device_.is_cpu(); }

  // Resident tables: append rows (keys int64 (k,) CPU, rows float32 (k, dim) CPU); a later duplicate's row wins.
  void load(const at::Tensor& keys, const at::Tensor& rows);
  // Resident tables: take the index and rows of `other` (same table, another device), sharing host rows.
  void load_like(const c10::intrusive_ptr<LookupPipeline>& other);
  // Dynamic caches: store rows (cache warm-up, HPS init_ec); resident tables: same as load.
  void insert(const at::Tensor& keys, const at::Tensor& rows);
  // New values of keys (int64 (k,) CPU, distinct) from update(): rows of present keys overwritten; absent keys are
  // added to a resident table that answers for the whole table (it grows) or has spare capacity. Bumps the
  // version (pending asynchronous inserts of older rows are dropped). Returns the keys that were present.
  int64_t update(const at::Tensor& keys, const at::Tensor& rows);
  // Keys stored in slots [start, end) (int64 CPU) and the version they were read at; assign_if_version writes
  // rows for present keys unless the version moved on (-1 then). Together: HPS refresh.
  std::tuple<at::Tensor, int64_t> export_keys(int64_t start, int64_t end);
  int64_t assign_if_version(const at::Tensor& keys, const at::Tensor& rows, int64_t version);
  // The stored rows (n, width) a miss of these distinct keys (int64 (n,) CPU) would fetch now: the second level, the
  // host map, the lower tiers, the default vector (what refresh assigns: bytes, never decoded and re-encoded).
  at::Tensor fetch_stored(const at::Tensor& keys);
  // Every stored (key, row), keys int64 and rows float32 on this device.
  std::tuple<at::Tensor, at::Tensor> export_all();
  // found (n,) bool on the keys' device; no score change.
  at::Tensor contains(const at::Tensor& keys);
  int64_t size();
  int64_t num_slots();
  int64_t capacity() const { return capacity_; }
  void clear();
  int64_t memory_bytes();
  // Block until queued asynchronous inserts are applied.
  void wait_inserts();
  // Host counters (kStatCount) then the device control block (kCtrlSize), as one int64 CPU tensor.
  at::Tensor counters();
  // The recent latencies of a stage, seconds, float64 CPU.
  at::Tensor latencies(int64_t stage);
  // A process-unique number naming this pipeline to hps::lookup (find_pipeline).
  int64_t handle(const c10::intrusive_ptr<LookupPipeline>& self);
  std::string tag() const { return tag_; }
  int64_t dim() const { return dim_; }
  std::string device() const { return device_.str(); }
  int64_t kind() const { return kind_; }
  int64_t storage() const { return storage_; }
  // A resident table that answers every key itself: built so (misses_to_tiers false), and no update() has brought a
  // key it could not hold (host-mapped rows cannot grow: such a key lives in the tiers only).
  bool answers_all() const { return kind_ == kResident && !misses_to_tiers_ && !overflowed_.load(); }
  // Address of a resident table's rows (tests: GPUs of a host-mapped table share one pinned copy); 0 for a cache.
  int64_t rows_ptr() const { return rows_.defined() ? reinterpret_cast<int64_t>(rows_.data_ptr()) : 0; }
  // Stop the worker, drop the handle; every later call raises. Idempotent.
  void close();

 private:
  struct Workspace;   // pinned / device buffers a lookup reuses (pipeline.cpp)
  struct OutRows {  // a lookup's output: (n, dim) rows of dtype
    void* data = nullptr;
    int32_t dtype = kOutFloat32;
  };
  struct AsyncJob {
    std::vector<int64_t> keys;
    bool grouped;
    int64_t version;
  };

  void check_open() const;
  FindArgs table_args() const;
  FindMode find_mode() const;
  // Plan the misses of the call just found (host or device planner), fetch their rows, then apply or queue.
  void resolve_misses(int64_t misses, int64_t n, const OutRows& out, bool big);
  // Stored rows of `u` distinct keys into `rows` (host memory): second level, host map, lower tiers, default.
  void fetch_rows(const int64_t* keys, int64_t u, uint8_t* rows, bool* found);
  // Rows a caller hands in (load / insert / update / assign): float32 (n, dim), or stored rows (n, width) of the
  // table's storage; raises naming the table.
  void check_rows(const at::Tensor& rows, int64_t n) const;
  // float32 rows (any device) -> stored rows (stored rows as they are), and back (identity for float32 storage).
  at::Tensor encode(const at::Tensor& rows) const;
  at::Tensor decode(const at::Tensor& stored) const;
  // kPassThrough's lookup: every position through fetch_rows (under the lock).
  void pass_through(const at::Tensor& flat, at::Tensor& out);
  // Raises for the state-changing calls a pass-through pipeline has no state for.
  void check_has_table(const char* what) const;
  // Resident tables with host-readable rows: copy the rows of the keys present into `rows`, set found; returns
  // how many were present. Takes this pipeline's lock (a second level is read under its own lock).
  // The rows are copied as this table stores them (the caller has the same storage).
  int64_t read_rows(const int64_t* keys, int64_t u, uint8_t* rows, bool* found);
  // Store u rows for keys (grouped by bucket for a cache when `grouped`) and scatter m positions; host pointers
  // `pos`, `inv`, `ukeys`, `rows` in the pinned plan buffer (or any host memory on the CPU).
  void apply_plan(const OutRows& out, const int32_t* pos, const int32_t* inv, int64_t m, const int64_t* ukeys,
                  const void* rows, int64_t u, bool grouped, bool insert);
  // Resident: give new keys rows (while capacity allows), collect the touched buckets; returns row ids (u,).
  void resident_put(const int64_t* keys, int64_t u, bool may_grow, std::vector<int32_t>* row_ids,
                    std::vector<int64_t>* touched, bool* rebuilt);
  void resident_upload_index();
  // GPU-direct second level: after the find of this call, the second level answers its misses on the device and
  // the cache inserts them (stream-ordered, nothing waited on, capturable).
  void second_level_direct(const at::Tensor& flat, at::Tensor& out, int64_t n, bool capturing);
  void grow_rows(int64_t needed);
  void order_stream();
  void quiesce();
  void sync_index();
  void record_latency(int64_t stage, double seconds);
  // Admission: the sketch as an optional op argument, and its ageing before a find of n keys.
  std::optional<at::Tensor> sketch_arg() const;
  int64_t sketch_width() const { return sketch_.size(0) / kSketchDepth; }
  void age_before_find(int64_t n, bool capturing);
  void async_loop();

  // configuration
  const int64_t kind_;
  const c10::Device device_;  // a CUDA device always with its index
  const int64_t dim_;
  const int64_t policy_;
  const float default_value_;
  const int64_t max_keys_;
  const bool misses_to_tiers_;
  const bool rows_on_host_;
  const std::string tag_;
  const int32_t storage_;
  const int64_t row_bytes_;  // of a stored row
  int64_t capacity_;
  c10::intrusive_ptr<HostHashMap> source_;
  c10::intrusive_ptr<LookupPipeline> second_level_;
  LowerTierFn lower_tiers_ = nullptr;
  int64_t lower_token_ = 0;
  double async_threshold_ = 2.0;
  int64_t max_pending_ = 1;

  // table state
  at::Tensor slot_keys_, digests_, scores_, values_, clock_;  // dynamic cache
  std::unique_ptr<ResidentIndex> index_;                      // resident: the host index (the CPU's own index)
  at::Tensor dindex_keys_, dindex_digests_, dindex_rows_, dindex_spill_;  // resident on a GPU: its copy
  at::Tensor rows_;                                           // resident: (capacity, W) stored rows
  at::Tensor default_row_;                                    // (1, W): the default vector, stored
  at::Tensor default_row_host_;                               // ... and its CPU copy
  int64_t next_row_ = 0;
  bool index_dirty_ = false;  // the host index changed since it was copied to the device
  std::atomic<bool> overflowed_{false};  // answers_all() no more: a key did not fit
  int64_t clock_host_ = 0;  // mirror of the LRU clock: decay before it reaches kClockLimit
  at::Tensor ctrl_;         // kCtrlSize int64 on the device
  at::Tensor sketch_;       // admission: (kSketchDepth * width,) int32 on the device, or undefined
  int64_t sketch_window_ = 0;
  int64_t keys_since_ageing_ = 0;

  // concurrency
  mutable std::mutex mu_;
  int64_t version_ = 0;
  int64_t seq_ = 0;
  std::atomic<bool> closed_{false};  // written under mu_; read without it by closed()
  void* last_stream_ = nullptr;  // cudaStream_t of the last call
  void* order_event_ = nullptr;  // cudaEvent_t
  std::unique_ptr<Workspace> ws_;

  // statistics
  std::atomic<int64_t> stats_[kStatCount];
  std::vector<double> latency_[kStageCount];
  int64_t latency_count_[kStageCount] = {};

  // asynchronous inserts
  std::mutex async_mu_;
  std::condition_variable async_cv_;
  std::deque<AsyncJob> async_queue_;
  int64_t async_running_ = 0;
  bool async_stop_ = false;
  std::thread async_thread_;

  int64_t handle_ = -1;
};

// The live pipeline with this handle; ValueError if there is none (never registered, or closed).
c10::intrusive_ptr<LookupPipeline> find_pipeline(int64_t handle);

// Registers torch.classes.hps.LookupPipeline (the op hps::lookup is declared with the others in hps_ops.cpp).
void register_pipeline(torch::Library& m);

}  // namespace hps
