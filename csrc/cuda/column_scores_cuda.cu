// Column scores on CUDA: sum_n |dy[n, c]| per column in the accumulation type (column_sums.cuh), the
// unified selection's scores, for a selection shared by several processes.
#include <torch/library.h>

#include "column_sums.cuh"
#include "common.cuh"

namespace meprop::cuda {
namespace {

at::Tensor column_scores_cuda(const at::Tensor& dy) {
  checks::matrix("column_scores", "dy", dy);
  const c10::cuda::OptionalCUDAGuard guard(dy.device());
  return column_abs_sums(dy.contiguous());
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CUDA, m) { m.impl("column_scores", &column_scores_cuda); }

}  // namespace meprop::cuda
