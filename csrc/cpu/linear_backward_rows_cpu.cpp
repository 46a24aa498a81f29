// The whole per-example backward of one layer on CPU, in one call: the per-row top-k selection with the bias
// gradient summed in the same pass over dy, both sparse products, and the weight gradient dense (a reused
// buffer, grad_buffer.h) or as its touched rows.
#include <torch/library.h>

#include "grad_buffer.h"
#include "products.h"
#include "select.h"

namespace meprop::cpu {
namespace {

// vals, idx (N x k): the per-row top k of dy (or idx given, vals gathered), and db = sum_n dy when db_out is not
// null, in one pass over dy: each of T tasks selects a band of rows and sums them into its own partial.
template <typename scalar_t>
void select_and_sum(const scalar_t* dy, int64_t n_rows, int64_t n_cols, int64_t k, bool given, scalar_t* vals,
                    int64_t* idx, scalar_t* db_out) {
  using acc = acc_t<scalar_t>;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_rows / std::max<int64_t>(1, row_grain(n_cols))));
  std::vector<acc> partial(db_out != nullptr ? tasks * n_cols : 0, acc(0));
  const int64_t block = block_length(n_cols, k);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    RowSelector<scalar_t> selector;
    for (int64_t t = t0; t < t1; ++t) {
      acc* sums = db_out != nullptr ? partial.data() + t * n_cols : nullptr;
      for (int64_t n = t * n_rows / tasks, end = (t + 1) * n_rows / tasks; n < end; ++n) {
        const scalar_t* row = dy + n * n_cols;
        if (given)
          for (int64_t i = 0; i < k; ++i) vals[n * k + i] = row[idx[n * k + i]];
        else
          selector.select(row, n_cols, k, block, vals + n * k, idx + n * k);
        if (sums != nullptr)
          for (int64_t c = 0; c < n_cols; ++c) sums[c] += static_cast<acc>(row[c]);
      }
    }
  });
  if (db_out == nullptr) return;
  for (int64_t c = 0; c < n_cols; ++c) {
    acc s = 0;
    for (int64_t t = 0; t < tasks; ++t) s += partial[t * n_cols + c];
    db_out[c] = static_cast<scalar_t>(s);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_backward_rows_cpu(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& weight_in, int64_t k,
    const std::optional<at::Tensor>& idx_in, bool input_grad, bool weight_grad, bool bias_grad, bool rows_only,
    bool reuse_grad) {
  constexpr const char* op = "linear_backward_rows";
  checks::linear_backward(op, dy_in, x_in, weight_in, k, idx_in, 2);
  if (idx_in.has_value()) index_values(op, "idx", *idx_in, dy_in.size(1));
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous(), weight = weight_in.contiguous();
  const int64_t n_rows = dy.size(0), n_out = dy.size(1), n_in = x.size(1);
  TORCH_CHECK_VALUE(n_out < (int64_t{1} << 32), "meprop.", op, ": rows longer than 2^32 - 1 are not supported");
  // Outputs not asked for are empty tensors, each its own (an op's outputs may not alias each other).
  const auto nothing = [&] { return at::empty({0}, dy.options()); };
  at::Tensor idx = idx_in.has_value() ? idx_in->contiguous() : at::empty({n_rows, k}, dy.options().dtype(at::kLong));
  at::Tensor vals = at::empty({n_rows, k}, dy.options());
  at::Tensor db = bias_grad ? at::empty({n_out}, dy.options()) : nothing();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "linear_backward_rows_cpu", [&] {
    select_and_sum(dy.const_data_ptr<scalar_t>(), n_rows, n_out, k, idx_in.has_value(),
                   vals.mutable_data_ptr<scalar_t>(), idx.mutable_data_ptr<int64_t>(),
                   bias_grad ? db.mutable_data_ptr<scalar_t>() : nullptr);
  });
  at::Tensor dx = nothing(), dw = nothing(), rows = at::empty({0}, dy.options().dtype(at::kLong));
  if (input_grad) {
    dx = empty_for_write({n_rows, n_in}, dy.options());
    rows_input_grad(vals, idx, weight, dx);
  }
  if (weight_grad) {
    std::vector<char> written(n_out, 0);
    const int64_t* pi = idx.const_data_ptr<int64_t>();
    for (int64_t e = 0; e < n_rows * k; ++e) written[pi[e]] = 1;
    std::vector<int64_t> targets, pos(n_out, -1);  // the touched rows, ascending; pos[j]: j's place among them
    for (int64_t j = 0; j < n_out; ++j)
      if (written[j]) {
        pos[j] = static_cast<int64_t>(targets.size());
        targets.push_back(j);
      }
    const int64_t n_targets = static_cast<int64_t>(targets.size());
    if (rows_only) {
      rows = at::empty({n_targets}, dy.options().dtype(at::kLong));
      std::copy(targets.begin(), targets.end(), rows.mutable_data_ptr<int64_t>());
      dw = empty_for_write({n_targets, n_in}, dy.options());
      rows_weight_grad(vals, idx, x, pos, n_targets, nullptr, dw);
    } else {
      dw = GradBuffers::take(weight_in, dy.options(), written, reuse_grad);
      rows_weight_grad(vals, idx, x, pos, n_targets, targets.data(), dw);
    }
  }
  return {dx, dw, db, rows};
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CPU, m) { m.impl("linear_backward_rows", &linear_backward_rows_cpu); }

}  // namespace meprop::cpu
