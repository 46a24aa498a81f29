// Per-example top-k on CPU: |dy| fused with a threshold-and-buffer selection per row (partial selection,
// no sort of the row). Blocks of 32 entries that cannot beat the current k-th best are skipped with one
// vectorised comparison, so a row costs about one streaming pass when k is much smaller than the row.
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <functional>

#include "common.h"

namespace meprop::cpu {
namespace {

// A candidate with the selection order as operator> (larger |value| first, NaN above all, then lower
// index). For float accumulators the whole order is one integer: the bits of |value| (NaN raised to the
// top) above the complement of the index, which sorts several times faster than a compound comparison.
template <typename acc>
struct Candidate {
  acc value;
  int64_t index;
  Candidate(acc v, int64_t i) : value(v), index(i) {}
  bool operator>(const Candidate& o) const { return ranks_before(value, index, o.value, o.index); }
};
template <>
struct Candidate<float> {
  uint64_t key;
  Candidate(float v, int64_t i) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    key = (uint64_t{std::isnan(v) ? 0xFFFFFFFFu : bits} << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(i));
  }
  float value() const {
    const uint32_t bits = static_cast<uint32_t>(key >> 32);
    float v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
  }
  int64_t index() const { return 0xFFFFFFFFu - static_cast<uint32_t>(key); }
  bool operator>(const Candidate& o) const { return key > o.key; }
};
template <typename acc>
acc value_of(const Candidate<acc>& c) { return c.value; }
inline float value_of(const Candidate<float>& c) { return c.value(); }
template <typename acc>
int64_t index_of(const Candidate<acc>& c) { return c.index; }
inline int64_t index_of(const Candidate<float>& c) { return c.index(); }

// Keeps the k best of buf (in any order) and returns the value an entry must now exceed.
template <typename acc>
acc shrink_to_best(std::vector<Candidate<acc>>& buf, int64_t k) {
  std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), std::greater<>());
  buf.resize(k, buf.front());
  return value_of(buf[k - 1]);  // nth_element put the k-th best there
}

template <typename scalar_t>
void topk_row(const scalar_t* row, int64_t n_cols, int64_t k, std::vector<Candidate<acc_t<scalar_t>>>& buf,
              scalar_t* vals, int64_t* idx) {
  using acc = acc_t<scalar_t>;
  // Candidates that beat the current threshold are appended; when the buffer is full it is cut back to the
  // k best and the threshold rises to the k-th best value. Entries come in increasing index order, so one
  // equal to the threshold never beats the entry holding it; !(v <= t) also admits NaN.
  const int64_t capacity = 4 * k;
  buf.clear();
  acc threshold = acc(-1);  // below every |value|: the first entries are all admitted
  const auto admit = [&](int64_t c) {
    const acc v = std::abs(static_cast<acc>(row[c]));
    if (!(v <= threshold)) {
      buf.emplace_back(v, c);
      if (static_cast<int64_t>(buf.size()) == capacity) threshold = shrink_to_best(buf, k);
    }
  };
  constexpr int64_t kBlock = 32;
  int64_t c = 0;
  for (; c + kBlock <= n_cols; c += kBlock) {
    int any = 0;
    for (int64_t i = 0; i < kBlock; ++i) any |= !(std::abs(static_cast<acc>(row[c + i])) <= threshold);
    if (any)
      for (int64_t i = 0; i < kBlock; ++i) admit(c + i);
  }
  for (; c < n_cols; ++c) admit(c);
  if (static_cast<int64_t>(buf.size()) > k) shrink_to_best(buf, k);
  std::sort(buf.begin(), buf.end(), std::greater<>());  // best first
  for (int64_t i = 0; i < k; ++i) {
    idx[i] = index_of(buf[i]);
    vals[i] = row[idx[i]];
  }
}

std::tuple<at::Tensor, at::Tensor> topk_rows_cpu(const at::Tensor& dy_in, int64_t k) {
  check_matrix(dy_in, "topk_rows", "dy");
  const at::Tensor dy = dy_in.contiguous();
  const int64_t n_rows = dy.size(0), n_cols = dy.size(1);
  TORCH_CHECK(k >= 1 && k <= n_cols, "topk_rows: k must lie in [1, ", n_cols, "], got ", k);
  TORCH_CHECK(n_cols < (int64_t{1} << 32), "topk_rows: rows longer than 2^32 - 1 are not supported");
  at::Tensor vals = at::empty({n_rows, k}, dy.options());
  at::Tensor idx = at::empty({n_rows, k}, dy.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "topk_rows_cpu", [&] {
    const scalar_t* p = dy.const_data_ptr<scalar_t>();
    scalar_t* pv = vals.mutable_data_ptr<scalar_t>();
    int64_t* pi = idx.mutable_data_ptr<int64_t>();
    at::parallel_for(0, n_rows, row_grain(n_cols), [&](int64_t r0, int64_t r1) {
      std::vector<Candidate<acc_t<scalar_t>>> buf;
      buf.reserve(4 * k);
      for (int64_t n = r0; n < r1; ++n) topk_row(p + n * n_cols, n_cols, k, buf, pv + n * k, pi + n * k);
    });
  });
  return {vals, idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CPU, m) { m.impl("topk_rows", &topk_rows_cpu); }

}  // namespace meprop::cpu
