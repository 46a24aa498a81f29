// Per-example sparse input gradient on CPU: dx[n] = sum_i vals[n, i] * W[idx[n, i], :].
#include <torch/library.h>

#include "large_alloc.h"
#include "combine_rows.h"

namespace meprop::cpu {
namespace {

at::Tensor linear_input_grad_rows_cpu(const at::Tensor& vals_in, const at::Tensor& idx_in,
                                      const at::Tensor& weight_in) {
  checks::linear_input_grad_rows(vals_in, idx_in, weight_in);
  index_values("linear_input_grad_rows", "idx", idx_in, weight_in.size(0));
  const at::Tensor vals = vals_in.contiguous(), idx = idx_in.contiguous(), weight = weight_in.contiguous();
  const int64_t n_rows = vals.size(0), k = vals.size(1), n_in = weight.size(1);
  at::Tensor dx = empty_for_write({n_rows, n_in}, vals.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vals.scalar_type(), "linear_input_grad_rows_cpu", [&] {
    const scalar_t* pv = vals.const_data_ptr<scalar_t>();
    const int64_t* pi = idx.const_data_ptr<int64_t>();
    const scalar_t* pw = weight.const_data_ptr<scalar_t>();
    scalar_t* pdx = dx.mutable_data_ptr<scalar_t>();
    using acc = acc_t<scalar_t>;
    const int64_t n_out = weight.size(0);
    // One task per column strip: pack the strip of W (out x strip, sized to stay in L2), then every row
    // of dx gathers its k weight rows from the packed panel.
    const bool stream = stream_output<acc>(pdx, n_rows, n_in);
    for_each_packed_strip<acc>(pw, n_out, n_in, [&](auto vecs, const acc* panel, int64_t c, int64_t width) {
      for (int64_t n = 0; n < n_rows; ++n)
        combine_rows<decltype(vecs)::value>(k, pv + n * k, pi + n * k, panel, pdx + n * n_in + c, width, stream);
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CPU, m) { m.impl("linear_input_grad_rows", &linear_input_grad_rows_cpu); }

}  // namespace meprop::cpu
