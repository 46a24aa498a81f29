// Column scores on CPU: sum_n |dy[n, c]| per column, in the accumulation type (the unified selection's
// scores, for a selection shared by several processes).
#include <torch/library.h>

#include "select.h"

namespace meprop::cpu {
namespace {

at::Tensor column_scores_cpu(const at::Tensor& dy_in) {
  checks::matrix("column_scores", "dy", dy_in);
  const at::Tensor dy = dy_in.contiguous();
  at::Tensor scores = at::empty({dy.size(1)}, dy.options().dtype(acc_dtype(dy.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "column_scores_cpu", [&] {
    using acc = acc_t<scalar_t>;
    column_sums(dy.const_data_ptr<scalar_t>(), dy.size(0), dy.size(1), scores.mutable_data_ptr<acc>(),
                static_cast<acc*>(nullptr));
  });
  return scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CPU, m) { m.impl("column_scores", &column_scores_cpu); }

}  // namespace meprop::cpu
