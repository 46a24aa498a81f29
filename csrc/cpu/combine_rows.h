// The inner loop of the per-example products: a strip of one output row as a weighted sum of rows of a
// packed panel, out[0:width] = sum_e coef[e] * panel[row[e], :], accumulated in registers; the panel holds
// strips of V vectors per row.
#pragma once

#include <type_traits>

#include "common.h"
#include "simd.h"

namespace meprop::cpu {

template <int V, typename acc, typename coef_t, typename scalar_t>
inline void combine_rows(int64_t count, const coef_t* coef, const int64_t* row, const acc* panel, scalar_t* out,
                         int64_t width) {
  constexpr int L = Simd<acc>::kLanes;
  vec_t<acc> t[V] = {};
  for (int64_t e = 0; e < count; ++e) {
    const acc a = static_cast<acc>(coef[e]);
    const acc* p = panel + row[e] * V * L;
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) t[v] += a * load_vec(p + v * L);
  }
  store_row<acc, V>(out, t, width);
}

// The strip width, in vectors (2, 4 or 8), for a panel of `rows` rows: as wide as fits in ~512 KB, so
// that the panel stays in L2 while the rows gathered from it come in random order.
template <typename acc>
inline int strip_vecs(int64_t rows) {
  const int64_t fit = (int64_t{512} << 10) / (std::max<int64_t>(rows, 1) * Simd<acc>::kLanes * int64_t(sizeof(acc)));
  return fit >= 8 ? 8 : fit >= 4 ? 4 : 2;
}

// Calls fn with the compile-time strip width V (vectors) equal to `vecs`.
template <typename Fn>
inline void with_strip_vecs(int vecs, Fn&& fn) {
  if (vecs == 8)
    fn(std::integral_constant<int, 8>{});
  else if (vecs == 4)
    fn(std::integral_constant<int, 4>{});
  else
    fn(std::integral_constant<int, 2>{});
}

}  // namespace meprop::cpu
