// Helpers shared by the CUDA kernels: magnitudes and launch sizes (the accumulation type and the host
// argument checks are in csrc/common.h, shared with the CPU kernels).
//
// Index values (idx, rows) are checked on the device with CUDA_KERNEL_ASSERT, as ATen's own indexing
// kernels do: a host-side check would cost a device synchronisation on every call.
#pragma once

// Only the headers in use (not ATen/ATen.h): they dominate the compile time of these small files.
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

#include "../common.h"

namespace meprop::cuda {

__device__ __forceinline__ float magnitude(float v) { return fabsf(v); }
__device__ __forceinline__ double magnitude(double v) { return fabs(v); }

// Kernels walk their work items in a grid-stride loop, so a grid never needs more blocks than this.
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

inline unsigned int grid_for(int64_t work_items) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(work_items, kMaxBlocks)));
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The typed handle of the op meprop::<name> (for the fused ops, which call the others through the dispatcher).
template <typename Signature>
c10::TypedOperatorHandle<Signature> meprop_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow((std::string("meprop::") + name).c_str(), "").typed<Signature>();
}

}  // namespace meprop::cuda
