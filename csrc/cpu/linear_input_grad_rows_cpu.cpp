// Per-example sparse input gradient on CPU: dx[n] = sum_i vals[n, i] * W[idx[n, i], :] (products.h).
#include <torch/library.h>

#include "large_alloc.h"
#include "products.h"

namespace meprop::cpu {
namespace {

at::Tensor linear_input_grad_rows_cpu(const at::Tensor& vals_in, const at::Tensor& idx_in,
                                      const at::Tensor& weight_in) {
  checks::linear_input_grad_rows(vals_in, idx_in, weight_in);
  index_values("linear_input_grad_rows", "idx", idx_in, weight_in.size(0));
  const at::Tensor vals = vals_in.contiguous(), idx = idx_in.contiguous(), weight = weight_in.contiguous();
  at::Tensor dx = empty_for_write({vals.size(0), weight.size(1)}, vals.options());
  rows_input_grad(vals, idx, weight, dx);
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CPU, m) { m.impl("linear_input_grad_rows", &linear_input_grad_rows_cpu); }

}  // namespace meprop::cpu
