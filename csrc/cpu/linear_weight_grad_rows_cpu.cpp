// Per-example sparse weight gradient on CPU: dW[j] = sum over (n, i) with idx[n, i] == j of vals[n, i] * x[n],
// dense or for the requested rows only (products.h).
#include <torch/library.h>

#include "large_alloc.h"
#include "products.h"

namespace meprop::cpu {
namespace {

at::Tensor linear_weight_grad_rows_cpu(const at::Tensor& vals_in, const at::Tensor& idx_in, const at::Tensor& x_in,
                                       int64_t out_features, const std::optional<at::Tensor>& rows_in) {
  constexpr const char* op = "linear_weight_grad_rows";
  checks::linear_weight_grad_rows(vals_in, idx_in, x_in, out_features, rows_in);
  index_values(op, "idx", idx_in, out_features);
  if (rows_in.has_value()) index_values(op, "rows", *rows_in, out_features, /*distinct=*/true);
  const at::Tensor vals = vals_in.contiguous(), idx = idx_in.contiguous(), x = x_in.contiguous();
  // pos[j]: the output row that gradient row j goes to, or -1 when it is not asked for.
  std::vector<int64_t> pos(out_features);
  int64_t n_targets = out_features;
  if (rows_in.has_value()) {
    const at::Tensor rows = rows_in->contiguous();
    n_targets = rows.size(0);
    std::fill(pos.begin(), pos.end(), int64_t{-1});
    const int64_t* pr = rows.const_data_ptr<int64_t>();
    for (int64_t p = 0; p < n_targets; ++p) pos[pr[p]] = p;
  } else {
    for (int64_t j = 0; j < out_features; ++j) pos[j] = j;
  }
  at::Tensor grad = empty_for_write({n_targets, x.size(1)}, vals.options());
  rows_weight_grad(vals, idx, x, pos, n_targets, nullptr, grad);
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CPU, m) { m.impl("linear_weight_grad_rows", &linear_weight_grad_rows_cpu); }

}  // namespace meprop::cpu
