// Helpers shared by the CUDA kernels: accumulation types, argument checks and launch sizes.
//
// Index values (idx, rows) are checked on the device with CUDA_KERNEL_ASSERT, as ATen's own indexing
// kernels do: a host-side check would cost a device synchronisation on every call.
#pragma once

// Only the headers in use (not ATen/ATen.h): they dominate the compile time of these small files.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace meprop::cuda {

// Products and sums of half/bfloat16/float inputs accumulate in float, of double inputs in double.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

__device__ __forceinline__ float magnitude(float v) { return fabsf(v); }
__device__ __forceinline__ double magnitude(double v) { return fabs(v); }

inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_matrix(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

inline void check_same(const at::Tensor& a, const at::Tensor& b, const char* op, const char* na,
                       const char* nb) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", na, " and ", nb,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), op, ": ", na, " and ", nb, " must be on the same device, got ",
              a.device(), " and ", b.device());
}

// Checks that an index tensor is int64, of `dims` dimensions and on `like`'s device. Its values are
// checked by the kernels that read them.
inline void check_index(const at::Tensor& idx, int64_t dims, const at::Tensor& like, const char* op,
                        const char* name = "idx") {
  TORCH_CHECK(idx.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.dim() == dims, op, ": ", name, " must be ", dims, "-D, got shape ", idx.sizes());
  TORCH_CHECK(idx.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ",
              idx.device());
}

// Kernels walk their work items in a grid-stride loop, so a grid never needs more blocks than this.
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

inline unsigned int grid_for(int64_t work_items) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(work_items, kMaxBlocks)));
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace meprop::cuda
