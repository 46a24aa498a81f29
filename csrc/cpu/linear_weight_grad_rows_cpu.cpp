// Per-example sparse weight gradient on CPU: dW[j] = sum over (n, i) with idx[n, i] == j of
// vals[n, i] * x[n]. The (n, i) pairs are bucketed by output row (a counting sort), so every row of dW
// is owned by one thread: no atomics, no dense masked dy, and a fixed summation order.
#include <torch/library.h>

#include "large_alloc.h"
#include "combine_rows.h"

namespace meprop::cpu {
namespace {

at::Tensor linear_weight_grad_rows_cpu(const at::Tensor& vals_in, const at::Tensor& idx_in, const at::Tensor& x_in,
                                       int64_t out_features, const std::optional<at::Tensor>& rows_in) {
  constexpr const char* op = "linear_weight_grad_rows";
  checks::linear_weight_grad_rows(vals_in, idx_in, x_in, out_features, rows_in);
  index_values(op, "idx", idx_in, out_features);
  if (rows_in.has_value()) index_values(op, "rows", *rows_in, out_features, /*distinct=*/true);
  const at::Tensor vals = vals_in.contiguous(), idx = idx_in.contiguous(), x = x_in.contiguous();
  const int64_t n_rows = vals.size(0), k = vals.size(1), n_in = x.size(1);

  // pos[j]: the output row that gradient row j goes to, or -1 when it is not asked for.
  std::vector<int64_t> pos(out_features);
  int64_t n_out_rows = out_features;
  if (rows_in.has_value()) {
    const at::Tensor rows = rows_in->contiguous();
    n_out_rows = rows.size(0);
    std::fill(pos.begin(), pos.end(), int64_t{-1});
    const int64_t* pr = rows.const_data_ptr<int64_t>();
    for (int64_t p = 0; p < n_out_rows; ++p) pos[pr[p]] = p;
  } else {
    for (int64_t j = 0; j < out_features; ++j) pos[j] = j;
  }
  at::Tensor grad = empty_for_write({n_out_rows, n_in}, vals.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vals.scalar_type(), "linear_weight_grad_rows_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* pv = vals.const_data_ptr<scalar_t>();
    const int64_t* pi = idx.const_data_ptr<int64_t>();
    // Counting sort of the (n, i) pairs by output row, stable in n.
    std::vector<int64_t> start(n_out_rows + 1, 0);
    for (int64_t e = 0; e < n_rows * k; ++e)
      if (pos[pi[e]] >= 0) ++start[pos[pi[e]] + 1];
    for (int64_t p = 0; p < n_out_rows; ++p) start[p + 1] += start[p];
    std::vector<int64_t> fill(start.begin(), start.end() - 1), src(start[n_out_rows]);
    std::vector<acc> coef(start[n_out_rows]);
    for (int64_t e = 0; e < n_rows * k; ++e) {
      const int64_t p = pos[pi[e]];
      if (p < 0) continue;
      src[fill[p]] = e / k;
      coef[fill[p]++] = static_cast<acc>(pv[e]);
    }
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* pg = grad.mutable_data_ptr<scalar_t>();
    // One task per column strip: pack the strip of x (N x strip), then every output row sums its bucket.
    const bool stream = stream_output<acc>(pg, n_out_rows, n_in);
    for_each_packed_strip<acc>(px, n_rows, n_in, [&](auto vecs, const acc* panel, int64_t c, int64_t width) {
      for (int64_t p = 0; p < n_out_rows; ++p)
        combine_rows<decltype(vecs)::value>(start[p + 1] - start[p], coef.data() + start[p], src.data() + start[p],
                                            panel, pg + p * n_in + c, width, stream);
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CPU, m) { m.impl("linear_weight_grad_rows", &linear_weight_grad_rows_cpu); }

}  // namespace meprop::cpu
