// Per-example top-k on CPU: the row selection of select.h, in parallel over rows.
#include <torch/library.h>

#include "select.h"

namespace meprop::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> topk_rows_cpu(const at::Tensor& dy_in, int64_t k) {
  checks::topk("topk_rows", dy_in, k);
  const at::Tensor dy = dy_in.contiguous();
  const int64_t n_rows = dy.size(0), n_cols = dy.size(1);
  TORCH_CHECK_VALUE(n_cols < (int64_t{1} << 32), "meprop.topk_rows: rows longer than 2^32 - 1 are not supported");
  at::Tensor vals = at::empty({n_rows, k}, dy.options());
  at::Tensor idx = at::empty({n_rows, k}, dy.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "topk_rows_cpu", [&] {
    select_rows(dy.const_data_ptr<scalar_t>(), n_rows, n_cols, k, vals.mutable_data_ptr<scalar_t>(),
                idx.mutable_data_ptr<int64_t>());
  });
  return {vals, idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CPU, m) { m.impl("topk_rows", &topk_rows_cpu); }

}  // namespace meprop::cpu
