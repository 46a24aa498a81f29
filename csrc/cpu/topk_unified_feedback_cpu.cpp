// Unified top-k with error feedback on CPU, in one pass over dy: the column sums of |dy| (and of dy, for the
// bias gradient) of select.h, plus the memory, then the selection of the k largest |r| and the next memory.
#include <torch/library.h>

#include "select.h"

namespace meprop::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_unified_feedback_cpu(const at::Tensor& dy_in,
                                                                        const at::Tensor& memory_in, int64_t k,
                                                                        double decay, bool bias_grad) {
  checks::topk_unified_feedback(dy_in, memory_in, k, decay);
  const at::Tensor dy = dy_in.contiguous(), memory = memory_in.contiguous();
  const int64_t n_rows = dy.size(0), n_cols = dy.size(1);
  at::Tensor kept = at::empty({k}, dy.options().dtype(at::kLong));
  at::Tensor next = at::empty({n_cols}, memory.options());
  at::Tensor db = at::empty({bias_grad ? n_cols : 0}, dy.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "topk_unified_feedback_cpu", [&] {
    using acc = acc_t<scalar_t>;
    acc* ranked = next.mutable_data_ptr<acc>();  // r = scores + memory, then the next memory in place
    std::vector<acc> sums(bias_grad ? n_cols : 0), magnitude(n_cols);
    column_sums(dy.const_data_ptr<scalar_t>(), n_rows, n_cols, ranked, bias_grad ? sums.data() : nullptr);
    const acc* m = memory.const_data_ptr<acc>();
    for (int64_t c = 0; c < n_cols; ++c) {
      ranked[c] += m[c];
      magnitude[c] = std::abs(ranked[c]);
    }
    int64_t* pk = kept.mutable_data_ptr<int64_t>();
    select_columns(magnitude.data(), n_cols, k, pk);
    const acc factor = static_cast<acc>(decay);
    for (int64_t c = 0; c < n_cols; ++c) ranked[c] *= factor;
    for (int64_t i = 0; i < k; ++i) ranked[pk[i]] = acc(0);
    if (bias_grad) std::copy(sums.begin(), sums.end(), db.mutable_data_ptr<scalar_t>());
  });
  return {kept, next, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CPU, m) { m.impl("topk_unified_feedback", &topk_unified_feedback_cpu); }

}  // namespace meprop::cpu
