// The selections of the CPU kernels, shared by the top-k ops and the fused backward ops.
//
// Per-example: two streaming passes per row and no sort of the row. Magnitudes become unsigned integer keys
// whose order is the selection order (NaN above every number). Pass 1 takes the largest key of each small
// block; the k-th largest of those block maxima, T, is at most the row's k-th largest key (k blocks each
// hold a key >= T), so pass 2 keeps only entries with key >= T (a few k for typical gradients) and the exact
// top k is chosen among them.
//
// Unified: the |dy| column sums (and, in the same pass, the plain column sums that are the bias gradient),
// then a partial sort of the columns by score.
#pragma once

#include <algorithm>
#include <cstring>
#include <functional>
#include <numeric>
#include <vector>

#include "common.h"

namespace meprop::cpu {

// The magnitude key of an accumulation-type value: the bits of |value|, every NaN mapped to one key just
// above +inf (so NaNs tie, and ties go by index).
template <typename acc>
struct MagnitudeKey;
template <>
struct MagnitudeKey<float> {
  using type = uint32_t;
  static type of(float v) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    return std::min<uint32_t>(bits & 0x7FFFFFFFu, 0x7F800001u);
  }
};
template <>
struct MagnitudeKey<double> {
  using type = uint64_t;
  static type of(double v) {
    uint64_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    return std::min<uint64_t>(bits & 0x7FFFFFFFFFFFFFFFull, 0x7FF0000000000001ull);
  }
};

// A candidate ordered by the selection order with operator>: larger key first, then lower index.
template <typename key_t>
struct Candidate {
  key_t key;
  int64_t index;
  bool operator>(const Candidate& o) const { return key != o.key ? key > o.key : index < o.index; }
};
// For 32-bit keys both fit one integer (key above the complement of the index), which selects faster.
template <>
struct Candidate<uint32_t> {
  uint64_t packed;
  Candidate(uint32_t key, int64_t index) : packed((uint64_t{key} << 32) | (0xFFFFFFFFu - uint32_t(index))) {}
  int64_t index_() const { return 0xFFFFFFFFu - static_cast<uint32_t>(packed); }
  bool operator>(const Candidate& o) const { return packed > o.packed; }
};
template <typename key_t>
int64_t index_of(const Candidate<key_t>& c) { return c.index; }
inline int64_t index_of(const Candidate<uint32_t>& c) { return c.index_(); }

// Block length for pass 1: up to 32, small enough that a row has at least 4k blocks (1 when k > n/4).
inline int64_t block_length(int64_t n_cols, int64_t k) {
  int64_t b = 32;
  while (b > 1 && n_cols / b < 4 * k) b /= 2;
  return b;
}

template <typename scalar_t>
struct RowSelector {
  using acc = acc_t<scalar_t>;
  using key_t = typename MagnitudeKey<acc>::type;
  std::vector<key_t> keys, block_max, order;
  std::vector<Candidate<key_t>> candidates;

  void select(const scalar_t* row, int64_t n_cols, int64_t k, int64_t block, scalar_t* vals, int64_t* idx) {
    const int64_t blocks = (n_cols + block - 1) / block;
    keys.resize(n_cols);
    block_max.resize(blocks);
    for (int64_t b = 0; b < blocks; ++b) {
      key_t m = 0;
      for (int64_t c = b * block, end = std::min(n_cols, c + block); c < end; ++c) {
        keys[c] = MagnitudeKey<acc>::of(static_cast<acc>(row[c]));
        m = std::max(m, keys[c]);
      }
      block_max[b] = m;
    }
    order.assign(block_max.begin(), block_max.end());
    std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), std::greater<>());
    const key_t threshold = order[k - 1];
    candidates.clear();
    for (int64_t b = 0; b < blocks; ++b) {
      if (block_max[b] < threshold) continue;  // no entry of this block can be among the k best
      for (int64_t c = b * block, end = std::min(n_cols, c + block); c < end; ++c)
        if (keys[c] >= threshold) candidates.push_back(Candidate<key_t>{keys[c], c});
    }
    std::nth_element(candidates.begin(), candidates.begin() + (k - 1), candidates.end(), std::greater<>());
    std::sort(candidates.begin(), candidates.begin() + k, std::greater<>());  // best first
    for (int64_t i = 0; i < k; ++i) {
      idx[i] = index_of(candidates[i]);
      vals[i] = row[idx[i]];
    }
  }
};

// scores[c] = sum_n |dy[n, c]| and, where sums is not null, sums[c] = sum_n dy[n, c], in one pass over the
// contiguous (n_rows x n_cols) dy. Each thread owns a band of columns and streams every row through it.
template <typename scalar_t, typename acc = acc_t<scalar_t>>
void column_sums(const scalar_t* dy, int64_t n_rows, int64_t n_cols, acc* scores, acc* sums) {
  at::parallel_for(0, n_cols, std::max<int64_t>(512, row_grain(n_rows)), [&](int64_t c0, int64_t c1) {
    std::fill(scores + c0, scores + c1, acc(0));
    if (sums != nullptr) std::fill(sums + c0, sums + c1, acc(0));
    for (int64_t n = 0; n < n_rows; ++n) {
      const scalar_t* row = dy + n * n_cols;
      if (sums != nullptr) {
        for (int64_t c = c0; c < c1; ++c) {
          const acc v = static_cast<acc>(row[c]);
          scores[c] += std::abs(v);
          sums[c] += v;
        }
      } else {
        for (int64_t c = c0; c < c1; ++c) scores[c] += std::abs(static_cast<acc>(row[c]));
      }
    }
  });
}

// idx[0..k) = the k columns of best score, in selection order (larger first, NaN first, ties by index).
template <typename acc>
void select_columns(const acc* scores, int64_t n_cols, int64_t k, int64_t* idx) {
  std::vector<int64_t> order(n_cols);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::partial_sort(order.begin(), order.begin() + k, order.end(),
                    [&](int64_t a, int64_t b) { return ranks_before(scores[a], a, scores[b], b); });
  std::copy(order.begin(), order.begin() + k, idx);
}

// vals, idx (n_rows x k) = the per-row top k of the contiguous (n_rows x n_cols) dy, in parallel over rows.
template <typename scalar_t>
void select_rows(const scalar_t* dy, int64_t n_rows, int64_t n_cols, int64_t k, scalar_t* vals, int64_t* idx) {
  const int64_t block = block_length(n_cols, k);
  at::parallel_for(0, n_rows, row_grain(n_cols), [&](int64_t r0, int64_t r1) {
    RowSelector<scalar_t> selector;
    for (int64_t n = r0; n < r1; ++n) selector.select(dy + n * n_cols, n_cols, k, block, vals + n * k, idx + n * k);
  });
}

}  // namespace meprop::cpu
