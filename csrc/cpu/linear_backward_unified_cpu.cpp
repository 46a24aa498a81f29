// The whole unified backward of one layer on CPU, in one call: a single pass over dy for the column scores
// and the bias gradient, the top-k selection, both compacted products, and the weight gradient dense (a
// reused buffer, grad_buffer.h) or as its kept rows.
#include <torch/library.h>

#include "grad_buffer.h"
#include "products.h"
#include "select.h"

namespace meprop::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_backward_unified_cpu(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& weight_in, int64_t k,
    const std::optional<at::Tensor>& idx_in, bool input_grad, bool weight_grad, bool bias_grad, bool rows_only,
    bool reuse_grad) {
  constexpr const char* op = "linear_backward_unified";
  checks::linear_backward(op, dy_in, x_in, weight_in, k, idx_in, 1);
  if (idx_in.has_value()) index_values(op, "idx", *idx_in, dy_in.size(1), /*distinct=*/true);
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous(), weight = weight_in.contiguous();
  const int64_t n_rows = dy.size(0), n_out = dy.size(1), n_in = x.size(1);
  // Outputs not asked for are empty tensors, each its own (an op's outputs may not alias each other).
  const auto nothing = [&] { return at::empty({0}, dy.options()); };
  at::Tensor kept = idx_in.has_value() ? idx_in->clone() : at::empty({k}, dy.options().dtype(at::kLong));
  at::Tensor db = nothing();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "linear_backward_unified_cpu", [&] {
    using acc = acc_t<scalar_t>;
    if (!idx_in.has_value() || bias_grad) {  // one pass over dy: the scores and the bias gradient
      std::vector<acc> scores(n_out), sums(bias_grad ? n_out : 0);
      column_sums(dy.const_data_ptr<scalar_t>(), n_rows, n_out, scores.data(), bias_grad ? sums.data() : nullptr);
      if (!idx_in.has_value()) select_columns(scores.data(), n_out, k, kept.mutable_data_ptr<int64_t>());
      if (bias_grad) {
        db = at::empty({n_out}, dy.options());
        std::copy(sums.begin(), sums.end(), db.mutable_data_ptr<scalar_t>());
      }
    }
  });
  at::Tensor dx = nothing(), dw = nothing();
  if (input_grad) {
    dx = empty_for_write({n_rows, n_in}, dy.options());
    unified_input_grad(dy, weight, kept, dx);
  }
  if (weight_grad && rows_only) {
    kept = std::get<0>(kept.sort());
    dw = at::empty({k, n_in}, dy.options());
    unified_weight_rows(dy, x, kept, dw);
  } else if (weight_grad) {
    at::Tensor rows = at::empty({k, n_in}, dy.options());
    unified_weight_rows(dy, x, kept, rows);
    std::vector<char> written(n_out, 0);
    const int64_t* pk = kept.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < k; ++i) written[pk[i]] = 1;
    dw = GradBuffers::take(weight_in, dy.options(), written, reuse_grad);
    const size_t row_bytes = n_in * rows.element_size();
    const char* src = static_cast<const char*>(rows.const_data_ptr());
    char* dst = static_cast<char*>(dw.mutable_data_ptr());
    at::parallel_for(0, k, row_grain(n_in), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) std::memcpy(dst + pk[i] * row_bytes, src + i * row_bytes, row_bytes);
    });
  }
  return {dx, dw, db, kept};
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CPU, m) { m.impl("linear_backward_unified", &linear_backward_unified_cpu); }

}  // namespace meprop::cpu
