// Helpers shared by the CPU kernels: accumulation types, the selection order, argument checks and grain
// sizes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace meprop::cpu {

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

// The selection order of every meprop op: a ranks before b when its score is larger, NaN ranking above
// every number, and equal scores by lower index.
template <typename S>
inline bool ranks_before(S a, int64_t ia, S b, int64_t ib) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ia < ib;
}

inline void check_matrix(const at::Tensor& t, const char* op, const char* name) {
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

// Checks that idx is an int64 tensor of `dims` dimensions on `like`'s device with values in [0, bound).
inline void check_index(const at::Tensor& idx, int64_t dims, int64_t bound, const at::Tensor& like,
                        const char* op) {
  TORCH_CHECK(idx.scalar_type() == at::kLong, op, ": idx must be int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.dim() == dims, op, ": idx must be ", dims, "-D, got shape ", idx.sizes());
  TORCH_CHECK(idx.device() == like.device(), op, ": idx must be on ", like.device(), ", got ",
              idx.device());
  if (idx.numel() > 0) {
    const auto lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < bound, op, ": idx values must lie in [0, ", bound, "), got [", lo, ", ",
                hi, "]");
  }
}

// Grain sizes for at::parallel_for, in rows, so that one task is worth a thread's start-up.
inline int64_t row_grain(int64_t row_work) {
  constexpr int64_t kWorkPerTask = 1 << 15;
  return std::max<int64_t>(1, kWorkPerTask / std::max<int64_t>(row_work, 1));
}

}  // namespace meprop::cpu
