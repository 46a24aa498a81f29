// Unified top-k on CPU: the |dy| column sums fused with the selection of the k largest.
#include <torch/library.h>

#include <algorithm>
#include <numeric>

#include "common.h"

namespace meprop::cpu {
namespace {

at::Tensor topk_unified_cpu(const at::Tensor& dy_in, int64_t k) {
  checks::topk("topk_unified", dy_in, k);
  const at::Tensor dy = dy_in.contiguous();
  const int64_t n_rows = dy.size(0), n_cols = dy.size(1);
  at::Tensor idx = at::empty({k}, dy.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "topk_unified_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* p = dy.const_data_ptr<scalar_t>();
    std::vector<acc> score(n_cols);
    column_abs_sums(p, n_rows, n_cols, score.data());
    std::vector<int64_t> order(n_cols);
    std::iota(order.begin(), order.end(), int64_t{0});
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
      return ranks_before(score[a], a, score[b], b);
    });
    std::copy(order.begin(), order.begin() + k, idx.mutable_data_ptr<int64_t>());
  });
  return idx;
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CPU, m) { m.impl("topk_unified", &topk_unified_cpu); }

}  // namespace meprop::cpu
