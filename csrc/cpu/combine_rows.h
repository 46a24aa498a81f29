// The inner loop of the per-example products: a strip of one output row as a weighted sum of rows of a
// packed panel, out[0:width] = sum_e coef[e] * panel[row[e], :], accumulated in registers; the panel holds
// strips of V vectors per row. Even and odd terms go to separate accumulators, so twice as many
// independent FMA chains hide the latency of the gathered loads. `stream`: a full strip is written with
// non-temporal stores (out is acc-typed and 32-byte aligned).
#pragma once

#include <type_traits>
#include <vector>

#include "common.h"
#include "simd.h"

namespace meprop::cpu {

template <int V, typename acc, typename coef_t, typename scalar_t>
inline void combine_rows(int64_t count, const coef_t* coef, const int64_t* row, const acc* panel, scalar_t* out,
                         int64_t width, bool stream) {
  constexpr int L = Simd<acc>::kLanes;
  vec_t<acc> t[V] = {}, u[V] = {};
  int64_t e = 0;
  for (; e + 2 <= count; e += 2) {
    const acc a = static_cast<acc>(coef[e]), b = static_cast<acc>(coef[e + 1]);
    const acc* p = panel + row[e] * V * L;
    const acc* q = panel + row[e + 1] * V * L;
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      t[v] += a * load_vec(p + v * L);
      u[v] += b * load_vec(q + v * L);
    }
  }
  if (e < count) {
    const acc a = static_cast<acc>(coef[e]);
    const acc* p = panel + row[e] * V * L;
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) t[v] += a * load_vec(p + v * L);
  }
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) t[v] += u[v];
  if constexpr (std::is_same_v<scalar_t, acc>) {
    if (stream && width == V * L) {
      for (int v = 0; v < V; ++v) stream_vec(out + v * L, t[v]);
      return;
    }
  }
  store_row<acc, V>(out, t, width);
}

// The strip width, in vectors (2, 4 or 8), for a panel of `rows` rows: as wide as fits in ~512 KB, so
// that the panel stays in L2 while the rows gathered from it come in random order.
template <typename acc>
inline int strip_vecs(int64_t rows) {
  const int64_t fit = (int64_t{1024} << 10) / (std::max<int64_t>(rows, 1) * Simd<acc>::kLanes * int64_t(sizeof(acc)));
  return fit >= 8 ? 8 : fit >= 4 ? 4 : 2;
}

// Splits the n_cols columns of src (rows x n_cols, leading dimension n_cols) into strips of strip_vecs()
// vectors, one parallel task per strip: packs the strip into a panel and calls
// fn(vecs, panel, first_column, width), where decltype(vecs)::value is the strip width in vectors.
template <typename acc, typename T, typename Fn>
void for_each_packed_strip(const T* src, int64_t rows, int64_t n_cols, Fn&& fn) {
  const auto run = [&](auto vecs) {
    constexpr int64_t kStrip = decltype(vecs)::value * Simd<acc>::kLanes;
    at::parallel_for(0, (n_cols + kStrip - 1) / kStrip, 1, [&](int64_t s0, int64_t s1) {
      // Small panels reuse per-thread scratch (a fresh block above 128 KB faults in new pages on every call:
      // 96 -> 75 us at 500 rows); large ones take a fresh block, which measured faster there (18 vs 30 ms at
      // 4096 x 4096), the faults being few against the work.
      const size_t n = static_cast<size_t>(rows * kStrip);
      std::vector<acc> fresh(n * sizeof(acc) > (size_t{512} << 10) ? n : 0);
      acc* panel = fresh.empty() ? scratch<acc, 0>(n) : fresh.data();
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t c = s * kStrip, width = std::min(kStrip, n_cols - c);
        pack_strips(src, n_cols, rows, c, width, kStrip, 1, panel);
        fn(vecs, static_cast<const acc*>(panel), c, width);
      }
      store_fence();  // order the strips' non-temporal stores, if any, before the join
    });
  };
  const int vecs = strip_vecs<acc>(rows);
  if (vecs == 8)
    run(std::integral_constant<int, 8>{});
  else if (vecs == 4)
    run(std::integral_constant<int, 4>{});
  else
    run(std::integral_constant<int, 2>{});
}

}  // namespace meprop::cpu
