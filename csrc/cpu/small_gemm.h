// A register-tiled GEMM for the compacted products of meProp, whose shapes BLAS handles poorly: either
// the inner dimension is k (tens) or the output has only k rows. C[m, c] = sum_j A[m, j] * B[j, c].
#pragma once

#include <vector>

#include "common.h"
#include "simd.h"

namespace meprop::cpu {

constexpr int kTileRows = 6;  // output tile: kTileRows x 2 vectors (for float, 6 x 16 in 12 AVX2 registers)

// C[0:R, 0:cols] = A[0:R, 0:K] @ panel[0:K, 0:2L] (+ C if `add`; C is then acc-typed), the panel packed
// with rows of 2L values. `stream`: full tiles go to memory with non-temporal stores (C is acc-typed and
// 32-byte aligned).
template <int R, typename acc, typename c_t>
inline void small_gemm_tile(int64_t K, const acc* A, int64_t lda, const acc* panel, c_t* C, int64_t ldc,
                            int64_t cols, bool add, bool stream) {
  constexpr int L = Simd<acc>::kLanes;
  vec_t<acc> t[R][2] = {};
  if constexpr (std::is_same_v<c_t, acc>) {
    if (add)
      for (int r = 0; r < R; ++r) load_row<acc, 2>(C + r * ldc, t[r], cols);
  }
  for (int64_t j = 0; j < K; ++j) {
    const vec_t<acc> b0 = load_vec(panel + j * 2 * L), b1 = load_vec(panel + j * 2 * L + L);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const acc a = A[r * lda + j];
      t[r][0] += a * b0;
      t[r][1] += a * b1;
    }
  }
  if constexpr (std::is_same_v<c_t, acc>) {
    if (stream && cols == 2 * L) {
      for (int r = 0; r < R; ++r) {
        stream_vec(C + r * ldc, t[r][0]);
        stream_vec(C + r * ldc + L, t[r][1]);
      }
      return;
    }
  }
  for (int r = 0; r < R; ++r) store_row<acc, 2>(C + r * ldc, t[r], cols);
}

// Whether small_gemm beats BLAS (MKL) for a float/double product of this size. Measured on a 2-core AMD
// EPYC (2026-11-22): below it a parallel region costs more than it saves; above it MKL's blocking for an
// inner dimension of k, or an output of k rows, is slower (e.g. 62 vs 89 GFLOP/s for (1024 x 32) @ (32 x
// 8192), 59 vs 68 for (32 x 1024) @ (1024 x 8192)).
inline bool small_gemm_pays(int64_t M, int64_t Ncols, int64_t K) { return M * Ncols * K >= (int64_t{1} << 22); }

// C (M x Ncols, leading dimension ldc) = A (M x K, an accumulation-type buffer) @ B (K x Ncols, leading
// dimension ldb, any float dtype), parallel over column blocks of C. Each block of B is packed into strips
// (as many as fit in ~256 KB of L2, of at most kDepth rows so that one strip stays in L1) and every row tile
// runs along all strips of the block, so C is written in row segments; an acc-typed C accumulates over
// depth chunks, any other C takes the whole depth in one chunk (one rounding). A large C is written with
// non-temporal stores: it is not read back here, and they save reading its lines from memory first.
template <typename acc, typename b_t, typename c_t>
void small_gemm(int64_t M, int64_t Ncols, int64_t K, const acc* A, int64_t lda, const b_t* B, int64_t ldb,
                c_t* C, int64_t ldc) {
  if (M == 0 || Ncols == 0) return;  // an empty C (and no column blocks to split the work into)
  constexpr int64_t kCols = 2 * Simd<acc>::kLanes, kPanelBytes = int64_t{256} << 10, kDepth = 256;
  const int64_t depth = std::max<int64_t>(1, std::is_same_v<c_t, acc> ? std::min(K, kDepth) : K);
  const int64_t strips = (Ncols + kCols - 1) / kCols;
  const int64_t fit = std::max<int64_t>(1, kPanelBytes / (depth * kCols * int64_t(sizeof(acc))));
  const int64_t block_strips = std::min(fit, (strips + at::get_num_threads() - 1) / at::get_num_threads());
  const int64_t blocks = (strips + block_strips - 1) / block_strips, block = block_strips * kCols;
  const bool stream = depth == K && stream_output<acc>(C, M, ldc);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    acc* panel = scratch<acc, 1>(depth * block);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * block, width = std::min(block, Ncols - c0);
      for (int64_t j0 = 0; j0 == 0 || j0 < K; j0 += depth) {  // K = 0 still writes zeros
        const int64_t d = std::min(depth, K - j0);
        pack_strips(B + j0 * ldb, ldb, d, c0, width, kCols, block_strips, panel);
        const auto row_tile = [&](auto rows, int64_t m) {
          for (int64_t s = 0; s * kCols < width; ++s)
            small_gemm_tile<decltype(rows)::value>(d, A + m * lda + j0, lda, panel + s * d * kCols,
                                                   C + m * ldc + c0 + s * kCols, ldc,
                                                   std::min(kCols, width - s * kCols), j0 > 0, stream);
        };
        int64_t m = 0;
        for (; m + kTileRows <= M; m += kTileRows) row_tile(std::integral_constant<int, kTileRows>{}, m);
        for (; m + 2 <= M; m += 2) row_tile(std::integral_constant<int, 2>{}, m);
        for (; m < M; ++m) row_tile(std::integral_constant<int, 1>{}, m);
      }
    }
    if (stream) store_fence();
  });
}

}  // namespace meprop::cpu
