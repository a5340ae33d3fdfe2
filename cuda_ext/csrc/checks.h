// Input checks for every op entry point. Messages say what was found and what was allowed.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#define HPS_CHECK_DTYPE(t, dtype)                                                                        \
  TORCH_CHECK_TYPE((t).scalar_type() == (dtype), #t " must have dtype ", c10::toString(dtype), ", found ", \
                   (t).scalar_type())

#define HPS_CHECK_KEY_DTYPE(t)                                                                       \
  TORCH_CHECK_TYPE((t).scalar_type() == at::kLong || (t).scalar_type() == at::kInt,                 \
                   #t " must be int64 or int32, found ", (t).scalar_type())

#define HPS_CHECK_DIM(t, d) \
  TORCH_CHECK_VALUE((t).dim() == (d), #t " must be ", d, "-D, found shape ", (t).sizes())

#define HPS_CHECK_CONTIGUOUS(t) TORCH_CHECK_VALUE((t).is_contiguous(), #t " must be contiguous")

#define HPS_CHECK_SAME_DEVICE(a, b)                                                                       \
  TORCH_CHECK_VALUE((a).device() == (b).device(), #a " and " #b " must be on one device, found ", (a).device(), \
                    " and ", (b).device())

#define HPS_CHECK_CPU(t) TORCH_CHECK_VALUE((t).device().is_cpu(), #t " must be a CPU tensor, found ", (t).device())
#define HPS_CHECK_CUDA(t) TORCH_CHECK_VALUE((t).device().is_cuda(), #t " must be a CUDA tensor, found ", (t).device())
