// Helpers shared by the CPU kernels: the selection order, index-value checks and grain sizes (the
// accumulation type and the other argument checks are in csrc/common.h, shared with the CUDA kernels).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../common.h"

namespace meprop::cpu {

// The selection order of every meprop op: a ranks before b when its score is larger, NaN ranking above
// every number, and equal scores by lower index.
template <typename S>
inline bool ranks_before(S a, int64_t ia, S b, int64_t ib) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ia < ib;
}

// Index values of a CPU index tensor (the twin of meprop.checks.index_values): every value in [0, bound)
// (IndexError) and, with `distinct`, none repeated (ValueError, naming the smallest repeated value).
inline void index_values(const char* op, const char* name, const at::Tensor& idx_in, int64_t bound,
                         bool distinct = false) {
  if (idx_in.numel() == 0) return;
  const at::Tensor idx = idx_in.contiguous();
  const int64_t* p = idx.const_data_ptr<int64_t>();
  const int64_t n = idx.numel();
  int64_t lo = p[0], hi = p[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = std::min(lo, p[i]);
    hi = std::max(hi, p[i]);
  }
  TORCH_CHECK_INDEX(lo >= 0 && hi < bound, "meprop.", op, ": ", name, " values must lie in [0, ", bound,
                    "), got [", lo, ", ", hi, "]");
  if (!distinct) return;
  std::vector<char> seen(bound, 0);
  int64_t repeated = bound;
  for (int64_t i = 0; i < n; ++i) {
    if (seen[p[i]]) repeated = std::min(repeated, p[i]);
    seen[p[i]] = 1;
  }
  TORCH_CHECK_VALUE(repeated == bound, "meprop.", op, ": ", name, " holds ", repeated, " more than once");
}

// Grain sizes for at::parallel_for, in rows, so that one task is worth a thread's start-up.
inline int64_t row_grain(int64_t row_work) {
  constexpr int64_t kWorkPerTask = 1 << 15;
  return std::max<int64_t>(1, kWorkPerTask / std::max<int64_t>(row_work, 1));
}

}  // namespace meprop::cpu
