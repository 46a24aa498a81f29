// Unified compacted weight gradient on CPU: dW_rows (k, in) = dy[:, idx]^T @ x (products.h).
#include <torch/library.h>

#include "products.h"

namespace meprop::cpu {
namespace {

at::Tensor linear_weight_grad_unified_cpu(const at::Tensor& dy_in, const at::Tensor& x_in,
                                          const at::Tensor& idx_in) {
  checks::linear_weight_grad_unified(dy_in, x_in, idx_in);
  index_values("linear_weight_grad_unified", "idx", idx_in, dy_in.size(1));
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous(), idx = idx_in.contiguous();
  at::Tensor rows = at::empty({idx.size(0), x.size(1)}, dy.options());
  unified_weight_rows(dy, x, idx, rows);
  return rows;
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CPU, m) { m.impl("linear_weight_grad_unified", &linear_weight_grad_unified_cpu); }

}  // namespace meprop::cpu
