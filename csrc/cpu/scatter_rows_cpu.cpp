// Scatter of compacted gradient rows into a dense (out_features, in) gradient on CPU. A large gradient whose
// k rows touch at most half of its huge pages starts as on-demand zero pages (zeros_on_demand) and only the
// k rows are copied; otherwise every element is written once (a copied row or zeros), in parallel.
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "large_alloc.h"
#include "common.h"

namespace meprop::cpu {
namespace {

at::Tensor scatter_rows_cpu(const at::Tensor& rows_in, const at::Tensor& idx_in, int64_t out_features) {
  checks::scatter_rows(rows_in, idx_in, out_features);
  index_values("scatter_rows", "idx", idx_in, out_features, /*distinct=*/true);
  const at::Tensor rows = rows_in.contiguous(), idx = idx_in.contiguous();
  const int64_t k = rows.size(0), n_in = rows.size(1);
  std::vector<int64_t> pos(out_features, -1);
  const int64_t* pi = idx.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < k; ++i) pos[pi[i]] = i;
  const size_t row_bytes = n_in * rows.element_size();
  const char* src = static_cast<const char*>(rows.const_data_ptr());
  // On-demand zero pages pay off when the k rows touch few of the huge pages (the OS zeroes every page a
  // row lands on); otherwise a reused block with the zeros written is cheaper.
  constexpr size_t kHugePage = size_t{2} << 20;
  std::vector<char> page_touched((out_features * row_bytes + kHugePage - 1) / kHugePage, 0);
  for (int64_t i = 0; i < k; ++i)
    for (size_t b = pi[i] * row_bytes; b < (pi[i] + 1) * row_bytes; b = (b / kHugePage + 1) * kHugePage)
      page_touched[b / kHugePage] = 1;
  const size_t touched = std::count(page_touched.begin(), page_touched.end(), char{1});
  at::Tensor dense;
  if (2 * touched <= page_touched.size()) dense = zeros_on_demand({out_features, n_in}, rows.options());
  if (dense.defined()) {  // already zero: copy the k rows only
    char* dst = static_cast<char*>(dense.mutable_data_ptr());
    at::parallel_for(0, k, row_grain(n_in), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) std::memcpy(dst + pi[i] * row_bytes, src + i * row_bytes, row_bytes);
    });
    return dense;
  }
  dense = empty_for_write({out_features, n_in}, rows.options());
  char* dst = static_cast<char*>(dense.mutable_data_ptr());
  at::parallel_for(0, out_features, row_grain(n_in), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (pos[r] >= 0)
        std::memcpy(dst + r * row_bytes, src + pos[r] * row_bytes, row_bytes);
      else
        std::memset(dst + r * row_bytes, 0, row_bytes);  // all-zero bytes are +0.0 in every float dtype
    }
  });
  return dense;
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CPU, m) { m.impl("scatter_rows", &scatter_rows_cpu); }

}  // namespace meprop::cpu
