// Per-example sparse input gradient on CPU: dx[n] = sum_i vals[n, i] * W[idx[n, i], :].
// Work is split into column strips so that the strip of W the rows are gathered from stays in cache.
#include <torch/library.h>

#include "common.h"

namespace meprop::cpu {
namespace {

constexpr int64_t kStrip = 64;

template <typename scalar_t, int64_t W>
inline void gather_rows_strip(const scalar_t* vals, const int64_t* idx, int64_t k, const scalar_t* weight,
                              int64_t n_in, int64_t width, scalar_t* out) {
  using acc = acc_t<scalar_t>;
  acc t[W ? W : kStrip] = {};
  for (int64_t i = 0; i < k; ++i) {
    const acc a = static_cast<acc>(vals[i]);
    const scalar_t* w = weight + idx[i] * n_in;
    for (int64_t c = 0; c < (W ? W : width); ++c) t[c] += a * static_cast<acc>(w[c]);
  }
  for (int64_t c = 0; c < (W ? W : width); ++c) out[c] = static_cast<scalar_t>(t[c]);
}

at::Tensor linear_input_grad_rows_cpu(const at::Tensor& vals_in, const at::Tensor& idx_in,
                                      const at::Tensor& weight_in) {
  constexpr const char* op = "linear_input_grad_rows";
  check_matrix(vals_in, op, "vals");
  check_matrix(weight_in, op, "weight");
  check_same(vals_in, weight_in, op, "vals", "weight");
  check_index(idx_in, 2, weight_in.size(0), vals_in, op);
  TORCH_CHECK(idx_in.sizes() == vals_in.sizes(), op, ": idx and vals must have the same shape, got ",
              idx_in.sizes(), " and ", vals_in.sizes());
  const at::Tensor vals = vals_in.contiguous(), idx = idx_in.contiguous(), weight = weight_in.contiguous();
  const int64_t n_rows = vals.size(0), k = vals.size(1), n_in = weight.size(1);
  at::Tensor dx = empty_for_write({n_rows, n_in}, vals.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vals.scalar_type(), "linear_input_grad_rows_cpu", [&] {
    const scalar_t* pv = vals.const_data_ptr<scalar_t>();
    const int64_t* pi = idx.const_data_ptr<int64_t>();
    const scalar_t* pw = weight.const_data_ptr<scalar_t>();
    scalar_t* pdx = dx.mutable_data_ptr<scalar_t>();
    const int64_t strips = (n_in + kStrip - 1) / kStrip;
    constexpr int64_t kRowBlock = 256;
    const int64_t row_blocks = (n_rows + kRowBlock - 1) / kRowBlock;
    at::parallel_for(0, strips * row_blocks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c = (t / row_blocks) * kStrip, width = std::min(kStrip, n_in - c);
        const int64_t r_lo = (t % row_blocks) * kRowBlock, r_hi = std::min(n_rows, r_lo + kRowBlock);
        for (int64_t n = r_lo; n < r_hi; ++n) {
          if (width == kStrip)
            gather_rows_strip<scalar_t, kStrip>(pv + n * k, pi + n * k, k, pw + c, n_in, width, pdx + n * n_in + c);
          else
            gather_rows_strip<scalar_t, 0>(pv + n * k, pi + n * k, k, pw + c, n_in, width, pdx + n * n_in + c);
        }
      }
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CPU, m) { m.impl("linear_input_grad_rows", &linear_input_grad_rows_cpu); }

}  // namespace meprop::cpu
