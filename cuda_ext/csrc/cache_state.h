// Validation of the cache state tensors, shared by the CPU and CUDA entry points.
//
// State of one cache (S slots = num_buckets * kBucketSize, D = embedding dim):
//   slot_keys (S,)   int64    key stored in each slot (meaningless where the digest is empty)
//   digests   (S,)   uint8    0 = empty slot, else digest_of(hash(key))
//   scores    (S,)   int32    LRU: clock value of the last touch; LFU: hit count
//   values    (S, W) stored   the cached rows as stored rows (row_codec.h): any storage dtype, W its stored width
//                             for D; inserts copy new_values' stored bytes, finds decode to float32
//   clock     (1,)   int64    LRU logical clock, bumped once per non-empty find call
#pragma once

#include <optional>

#include <ATen/ATen.h>

#include "cache_layout.h"
#include "checks.h"
#include "stored_rows.h"

namespace hps {

inline int64_t check_cache_state(const at::Tensor& slot_keys, const at::Tensor& digests, const at::Tensor& scores,
                                 const at::Tensor& values, const at::Tensor& clock) {
  HPS_CHECK_DTYPE(slot_keys, at::kLong);
  HPS_CHECK_DTYPE(digests, at::kByte);
  HPS_CHECK_DTYPE(scores, at::kInt);
  check_stored(values, "values");
  HPS_CHECK_DTYPE(clock, at::kLong);
  HPS_CHECK_DIM(slot_keys, 1);
  const int64_t slots = slot_keys.size(0);
  TORCH_CHECK_VALUE(slots > 0 && slots % kBucketSize == 0, "cache slot count must be a positive multiple of ",
                    kBucketSize, ", found ", slots);
  TORCH_CHECK_VALUE(digests.dim() == 1 && digests.size(0) == slots, "digests must have shape (", slots,
                    ",), found ", digests.sizes());
  TORCH_CHECK_VALUE(scores.dim() == 1 && scores.size(0) == slots, "scores must have shape (", slots, ",), found ",
                    scores.sizes());
  TORCH_CHECK_VALUE(values.size(0) == slots, "values must have ", slots, " rows, found ", values.size(0));
  TORCH_CHECK_VALUE(clock.numel() == 1, "clock must hold one element, found shape ", clock.sizes());
  for (const at::Tensor* t : {&slot_keys, &digests, &scores, &values, &clock}) {
    HPS_CHECK_CONTIGUOUS(*t);
    HPS_CHECK_SAME_DEVICE(*t, slot_keys);
  }
  return slots / kBucketSize;
}

// For the ops that take only part of the state (contains, assign, erase, export_batch, size, clear, decay): the
// same dtype/shape/device rules on the tensors they do take. The CPU and CUDA entry points add "on my device".
// Returns num_buckets.
inline int64_t check_digests(const at::Tensor& digests) {
  HPS_CHECK_DTYPE(digests, at::kByte);
  HPS_CHECK_DIM(digests, 1);
  HPS_CHECK_CONTIGUOUS(digests);
  const int64_t slots = digests.size(0);
  TORCH_CHECK_VALUE(slots > 0 && slots % kBucketSize == 0, "cache slot count must be a positive multiple of ",
                    kBucketSize, ", found ", slots);
  return slots / kBucketSize;
}

inline int64_t check_keys_digests(const at::Tensor& slot_keys, const at::Tensor& digests) {
  HPS_CHECK_DTYPE(slot_keys, at::kLong);
  HPS_CHECK_DIM(slot_keys, 1);
  HPS_CHECK_CONTIGUOUS(slot_keys);
  HPS_CHECK_SAME_DEVICE(digests, slot_keys);
  const int64_t num_buckets = check_digests(digests);
  TORCH_CHECK_VALUE(slot_keys.size(0) == digests.size(0), "slot_keys must have shape (", digests.size(0),
                    ",), found ", slot_keys.sizes());
  return num_buckets;
}

inline void check_values(const at::Tensor& values, const at::Tensor& slot_keys) {
  check_stored(values, "values");
  HPS_CHECK_SAME_DEVICE(values, slot_keys);
  TORCH_CHECK_VALUE(values.size(0) == slot_keys.size(0), "values must have ", slot_keys.size(0), " rows, found ",
                    values.size(0));
}

inline void check_scores(const at::Tensor& scores, const at::Tensor& digests) {
  HPS_CHECK_DTYPE(scores, at::kInt);
  HPS_CHECK_CONTIGUOUS(scores);
  HPS_CHECK_SAME_DEVICE(scores, digests);
  TORCH_CHECK_VALUE(scores.dim() == 1 && scores.size(0) == digests.size(0), "scores must have shape (",
                    digests.size(0), ",), found ", scores.sizes());
}

inline void check_clock(const at::Tensor& clock, const at::Tensor& scores) {
  HPS_CHECK_DTYPE(clock, at::kLong);
  HPS_CHECK_CONTIGUOUS(clock);
  HPS_CHECK_SAME_DEVICE(clock, scores);
  TORCH_CHECK_VALUE(clock.numel() == 1, "clock must hold one element, found shape ", clock.sizes());
}

inline void check_policy(int64_t policy) {
  TORCH_CHECK_VALUE(policy == kPolicyLRU || policy == kPolicyLFU, "policy must be ", kPolicyLRU, " (LRU) or ",
                    kPolicyLFU, " (LFU), found ", policy);
}

inline void check_query_keys(const at::Tensor& keys, const at::Tensor& slot_keys) {
  HPS_CHECK_KEY_DTYPE(keys);
  HPS_CHECK_DIM(keys, 1);
  HPS_CHECK_CONTIGUOUS(keys);
  HPS_CHECK_SAME_DEVICE(keys, slot_keys);
}

// An admission sketch (cache_layout.h): int32 (kSketchDepth * width,), width a power of two, contiguous, on the
// cache's device. Returns width.
inline int64_t check_sketch(const at::Tensor& sketch, const at::Tensor& slot_keys) {
  HPS_CHECK_DTYPE(sketch, at::kInt);
  HPS_CHECK_DIM(sketch, 1);
  HPS_CHECK_CONTIGUOUS(sketch);
  HPS_CHECK_SAME_DEVICE(sketch, slot_keys);
  const int64_t width = sketch.size(0) / kSketchDepth;
  TORCH_CHECK_VALUE(width > 0 && width * kSketchDepth == sketch.size(0) && (width & (width - 1)) == 0,
                    "sketch must hold ", kSketchDepth, " rows of a power-of-two width, found ", sketch.size(0),
                    " counters");
  return width;
}

// sketch_add's arguments (both devices): a valid sketch, query keys on its device, `skip` (optional) bool (n,).
inline void check_sketch_add(const at::Tensor& sketch, const at::Tensor& keys, const std::optional<at::Tensor>& skip) {
  check_sketch(sketch, sketch);
  check_query_keys(keys, sketch);
  if (!skip) return;
  HPS_CHECK_DTYPE(*skip, at::kBool);
  HPS_CHECK_CONTIGUOUS(*skip);
  HPS_CHECK_SAME_DEVICE(*skip, keys);
  TORCH_CHECK_VALUE(skip->dim() == 1 && skip->size(0) == keys.size(0), "skip must have shape (", keys.size(0),
                    ",), found ", skip->sizes());
}

// The admission sketch of an insert, when given: a valid sketch, and an LFU cache (admission compares the key's
// estimated frequency with the victim's hit count; an LRU score is a time).
inline void check_admission(const std::optional<at::Tensor>& sketch, const at::Tensor& slot_keys, int64_t policy) {
  if (!sketch) return;
  check_sketch(*sketch, slot_keys);
  TORCH_CHECK_VALUE(policy == kPolicyLFU, "sketch: admission needs the LFU policy (", kPolicyLFU, "), found policy ",
                    policy);
}

// new_values are stored rows of the cache's own storage (checked `values`): the caller encodes, the ops only copy
// bytes, so a row of another dtype or width would be copied as garbage.
inline void check_new_values(const at::Tensor& new_values, const at::Tensor& keys, const at::Tensor& values) {
  TORCH_CHECK_TYPE(new_values.scalar_type() == values.scalar_type(), "new_values must have dtype ",
                   values.scalar_type(), " (the cache's stored rows), found ", new_values.scalar_type());
  HPS_CHECK_DIM(new_values, 2);
  HPS_CHECK_CONTIGUOUS(new_values);
  HPS_CHECK_SAME_DEVICE(new_values, values);
  TORCH_CHECK_VALUE(new_values.size(0) == keys.size(0), "new_values must have one row per key (", keys.size(0),
                    "), found ", new_values.size(0));
  TORCH_CHECK_VALUE(new_values.size(1) == values.size(1), "new_values must have width ", values.size(1),
                    " (the cache's stored rows of dim ", dim_of_width(storage_of(values, "values"), values.size(1)),
                    "), found ", new_values.size(1));
}

}  // namespace hps
