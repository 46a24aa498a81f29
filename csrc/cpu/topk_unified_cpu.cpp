// Unified top-k on CPU: the |dy| column sums fused with the selection of the k largest (select.h).
#include <torch/library.h>

#include "select.h"

namespace meprop::cpu {
namespace {

at::Tensor topk_unified_cpu(const at::Tensor& dy_in, int64_t k) {
  checks::topk("topk_unified", dy_in, k);
  const at::Tensor dy = dy_in.contiguous();
  const int64_t n_rows = dy.size(0), n_cols = dy.size(1);
  at::Tensor idx = at::empty({k}, dy.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "topk_unified_cpu", [&] {
    std::vector<acc_t<scalar_t>> score(n_cols);
    column_sums(dy.const_data_ptr<scalar_t>(), n_rows, n_cols, score.data(), static_cast<acc_t<scalar_t>*>(nullptr));
    select_columns(score.data(), n_cols, k, idx.mutable_data_ptr<int64_t>());
  });
  return idx;
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CPU, m) { m.impl("topk_unified", &topk_unified_cpu); }

}  // namespace meprop::cpu
