// Unified compacted input gradient on CPU: dx (N, in) = dy[:, idx] @ W[idx, :] (products.h).
#include <torch/library.h>

#include "large_alloc.h"
#include "products.h"

namespace meprop::cpu {
namespace {

at::Tensor linear_input_grad_unified_cpu(const at::Tensor& dy_in, const at::Tensor& weight_in,
                                         const at::Tensor& idx_in) {
  checks::linear_input_grad_unified(dy_in, weight_in, idx_in);
  index_values("linear_input_grad_unified", "idx", idx_in, weight_in.size(0));
  const at::Tensor dy = dy_in.contiguous(), weight = weight_in.contiguous(), idx = idx_in.contiguous();
  at::Tensor dx = empty_for_write({dy.size(0), weight.size(1)}, dy.options());
  unified_input_grad(dy, weight, idx, dx);
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CPU, m) { m.impl("linear_input_grad_unified", &linear_input_grad_unified_cpu); }

}  // namespace meprop::cpu
