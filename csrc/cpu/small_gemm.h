// A register-tiled GEMM for the compacted products of meProp, whose shapes BLAS handles poorly: either
// the inner dimension is k (tens) or the output has only k rows. C[m, c] = sum_j A[m, j] * B[j, c].
#pragma once

#include <vector>

#include "common.h"
#include "simd.h"

namespace meprop::cpu {

constexpr int kTileRows = 4;  // output tile: kTileRows x 2 vectors (for float, 4 x 16 in 8 AVX2 registers)

// C[0:R, 0:cols] = A[0:R, 0:K] @ panel[0:K, 0:2L], the panel packed with rows of 2L values.
template <int R, typename acc, typename c_t>
inline void small_gemm_tile(int64_t K, const acc* A, int64_t lda, const acc* panel, c_t* C, int64_t ldc,
                            int64_t cols) {
  constexpr int L = Simd<acc>::kLanes;
  vec_t<acc> t[R][2] = {};
  for (int64_t j = 0; j < K; ++j) {
    const vec_t<acc> b0 = load_vec(panel + j * 2 * L), b1 = load_vec(panel + j * 2 * L + L);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const acc a = A[r * lda + j];
      t[r][0] += a * b0;
      t[r][1] += a * b1;
    }
  }
  for (int r = 0; r < R; ++r) store_row<acc, 2>(C + r * ldc, t[r], cols);
}

// C (M x Ncols, leading dimension ldc) = A (M x K, an accumulation-type buffer) @ B (K x Ncols, leading
// dimension ldb, any float dtype), parallel over column blocks of C. Each block of B is packed once
// (row segments of kBlockStrips tiles, long enough to stream from memory) and used for every row tile.
template <typename acc, typename b_t, typename c_t>
void small_gemm(int64_t M, int64_t Ncols, int64_t K, const acc* A, int64_t lda, const b_t* B, int64_t ldb,
                c_t* C, int64_t ldc) {
  constexpr int64_t kCols = 2 * Simd<acc>::kLanes, kBlockStrips = 8, kBlock = kBlockStrips * kCols;
  const int64_t blocks = (Ncols + kBlock - 1) / kBlock;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(M * K * kBlock, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    std::vector<acc> panel(K * kBlock);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kBlock, width = std::min(kBlock, Ncols - c0);
      pack_strips(B, ldb, K, c0, width, kCols, kBlockStrips, panel.data());
      for (int64_t s = 0; s * kCols < width; ++s) {
        const acc* strip = panel.data() + s * K * kCols;
        const int64_t c = c0 + s * kCols, cols = std::min(kCols, width - s * kCols);
        int64_t m = 0;
        for (; m + kTileRows <= M; m += kTileRows)
          small_gemm_tile<kTileRows>(K, A + m * lda, lda, strip, C + m * ldc + c, ldc, cols);
        for (; m < M; ++m) small_gemm_tile<1>(K, A + m * lda, lda, strip, C + m * ldc + c, ldc, cols);
      }
    }
  });
}

}  // namespace meprop::cpu
