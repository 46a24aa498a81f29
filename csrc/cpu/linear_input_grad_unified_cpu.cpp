// Unified compacted input gradient on CPU: dx (N, in) = dy[:, idx] @ W[idx, :] by small_gemm on the compacted
// blocks (accumulating float16/bfloat16 in float32); small float32/float64 products go to BLAS.
#include <torch/library.h>

#include "large_alloc.h"
#include "small_gemm.h"

namespace meprop::cpu {
namespace {

at::Tensor linear_input_grad_unified_cpu(const at::Tensor& dy_in, const at::Tensor& weight_in,
                                         const at::Tensor& idx_in) {
  checks::linear_input_grad_unified(dy_in, weight_in, idx_in);
  index_values("linear_input_grad_unified", "idx", idx_in, weight_in.size(0));
  const at::Tensor dy = dy_in.contiguous(), weight = weight_in.contiguous(), idx = idx_in.contiguous();
  const int64_t n_rows = dy.size(0), n_out = dy.size(1), n_in = weight.size(1), k = idx.size(0);
  at::Tensor dx = empty_for_write({n_rows, n_in}, dy.options());
  if ((dy.scalar_type() == at::kFloat || dy.scalar_type() == at::kDouble) && !small_gemm_pays(n_rows, n_in, k)) {
    return at::mm_out(dx, dy.index_select(1, idx), weight.index_select(0, idx));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "linear_input_grad_unified_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
    const scalar_t* pw = weight.const_data_ptr<scalar_t>();
    const int64_t* pi = idx.const_data_ptr<int64_t>();
    // The compacted blocks, in the accumulation type: a = dy[:, idx] (N x k), b = W[idx, :] (k x in).
    std::vector<acc> a(n_rows * k), b(k * n_in);
    at::parallel_for(0, n_rows, row_grain(k), [&](int64_t r0, int64_t r1) {
      for (int64_t n = r0; n < r1; ++n)
        for (int64_t j = 0; j < k; ++j) a[n * k + j] = static_cast<acc>(pdy[n * n_out + pi[j]]);
    });
    at::parallel_for(0, k, row_grain(n_in), [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t c = 0; c < n_in; ++c) b[j * n_in + c] = static_cast<acc>(pw[pi[j] * n_in + c]);
    });
    small_gemm(n_rows, n_in, k, a.data(), k, b.data(), n_in, dx.mutable_data_ptr<scalar_t>(), n_in);
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CPU, m) { m.impl("linear_input_grad_unified", &linear_input_grad_unified_cpu); }

}  // namespace meprop::cpu
