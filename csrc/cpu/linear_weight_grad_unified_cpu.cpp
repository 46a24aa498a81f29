// Unified compacted weight gradient on CPU: dW_rows (k, in) = dy[:, idx]^T @ x by small_gemm, which packs x
// strip by strip (accumulating float16/bfloat16 in float32 without converting x as a whole); small
// float32/float64 products go to BLAS.
#include <torch/library.h>

#include "small_gemm.h"

namespace meprop::cpu {
namespace {

at::Tensor linear_weight_grad_unified_cpu(const at::Tensor& dy_in, const at::Tensor& x_in,
                                          const at::Tensor& idx_in) {
  checks::linear_weight_grad_unified(dy_in, x_in, idx_in);
  index_values("linear_weight_grad_unified", "idx", idx_in, dy_in.size(1));
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous(), idx = idx_in.contiguous();
  const int64_t n_rows = dy.size(0), n_out = dy.size(1), n_in = x.size(1), k = idx.size(0);
  at::Tensor rows = at::empty({k, n_in}, dy.options());
  if ((dy.scalar_type() == at::kFloat || dy.scalar_type() == at::kDouble) && !small_gemm_pays(k, n_in, n_rows)) {
    return at::mm_out(rows, dy.index_select(1, idx).t(), x);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "linear_weight_grad_unified_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
    const int64_t* pi = idx.const_data_ptr<int64_t>();
    // at = dy[:, idx]^T (k x N), in the accumulation type.
    std::vector<acc> at_(k * n_rows);
    at::parallel_for(0, n_rows, row_grain(k), [&](int64_t r0, int64_t r1) {
      for (int64_t n = r0; n < r1; ++n)
        for (int64_t j = 0; j < k; ++j) at_[j * n_rows + n] = static_cast<acc>(pdy[n * n_out + pi[j]]);
    });
    small_gemm(k, n_in, n_rows, at_.data(), n_rows, x.const_data_ptr<scalar_t>(), n_in,
               rows.mutable_data_ptr<scalar_t>(), n_in);
  });
  return rows;
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CPU, m) { m.impl("linear_weight_grad_unified", &linear_weight_grad_unified_cpu); }

}  // namespace meprop::cpu
