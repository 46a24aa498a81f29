// Per-example top-k on CPU: |dy| fused with a bounded heap per row. Blocks of 16 entries that cannot
// beat the current k-th best are skipped with one vectorisable comparison, so a row costs about one
// streaming pass when k is much smaller than the row.
#include <torch/library.h>

#include <algorithm>
#include <utility>

#include "common.h"

namespace meprop::cpu {
namespace {

template <typename scalar_t>
void topk_row(const scalar_t* row, int64_t n_cols, int64_t k, std::vector<std::pair<acc_t<scalar_t>, int64_t>>& heap,
              scalar_t* vals, int64_t* idx) {
  using acc = acc_t<scalar_t>;
  using Entry = std::pair<acc, int64_t>;
  // With this comparator the heap's front is the kept entry that ranks last.
  const auto before = [](const Entry& a, const Entry& b) { return ranks_before(a.first, a.second, b.first, b.second); };
  heap.clear();
  for (int64_t c = 0; c < k; ++c) heap.emplace_back(std::abs(static_cast<acc>(row[c])), c);
  std::make_heap(heap.begin(), heap.end(), before);
  const auto offer = [&](int64_t c) {
    const acc v = std::abs(static_cast<acc>(row[c]));
    // Entries come in increasing index order, so an entry equal to the worst kept one never beats it.
    if (ranks_before(v, c, heap.front().first, heap.front().second)) {
      std::pop_heap(heap.begin(), heap.end(), before);
      heap.back() = Entry(v, c);
      std::push_heap(heap.begin(), heap.end(), before);
    }
  };
  constexpr int64_t kBlock = 16;
  int64_t c = k;
  for (; c + kBlock <= n_cols; c += kBlock) {
    const acc threshold = heap.front().first;
    bool any = false;  // !(v <= threshold) is also true for NaN on either side: those take the slow path
    for (int64_t i = 0; i < kBlock; ++i) any |= !(std::abs(static_cast<acc>(row[c + i])) <= threshold);
    if (any)
      for (int64_t i = 0; i < kBlock; ++i) offer(c + i);
  }
  for (; c < n_cols; ++c) offer(c);
  std::sort_heap(heap.begin(), heap.end(), before);  // best first
  for (int64_t i = 0; i < k; ++i) {
    idx[i] = heap[i].second;
    vals[i] = row[heap[i].second];
  }
}

std::tuple<at::Tensor, at::Tensor> topk_rows_cpu(const at::Tensor& dy_in, int64_t k) {
  check_matrix(dy_in, "topk_rows", "dy");
  const at::Tensor dy = dy_in.contiguous();
  const int64_t n_rows = dy.size(0), n_cols = dy.size(1);
  TORCH_CHECK(k >= 1 && k <= n_cols, "topk_rows: k must lie in [1, ", n_cols, "], got ", k);
  at::Tensor vals = at::empty({n_rows, k}, dy.options());
  at::Tensor idx = at::empty({n_rows, k}, dy.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "topk_rows_cpu", [&] {
    const scalar_t* p = dy.const_data_ptr<scalar_t>();
    scalar_t* pv = vals.mutable_data_ptr<scalar_t>();
    int64_t* pi = idx.mutable_data_ptr<int64_t>();
    at::parallel_for(0, n_rows, row_grain(n_cols), [&](int64_t r0, int64_t r1) {
      std::vector<std::pair<acc_t<scalar_t>, int64_t>> heap;
      heap.reserve(k);
      for (int64_t n = r0; n < r1; ++n) topk_row(p + n * n_cols, n_cols, k, heap, pv + n * k, pi + n * k);
    });
  });
  return {vals, idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CPU, m) { m.impl("topk_rows", &topk_rows_cpu); }

}  // namespace meprop::cpu
