// A register-tiled GEMM for the compacted products of meProp, whose shapes BLAS handles poorly: either
// the inner dimension is k (tens) or the output has only k rows. C[m, c] = sum_j A[m, j] * B[j, c].
#pragma once

#include "common.h"

namespace meprop::cpu {

// Output tile held in registers: kTileRows x kTileCols accumulators (8 AVX2 registers for float).
constexpr int64_t kTileRows = 4;
constexpr int64_t kTileCols = 16;

template <typename acc, typename b_t, typename c_t>
inline void small_gemm_tile(int64_t K, const acc* A, int64_t lda, const b_t* B, int64_t ldb, c_t* C,
                            int64_t ldc) {
  acc t[kTileRows][kTileCols] = {};
  for (int64_t j = 0; j < K; ++j) {
    acc b[kTileCols];
    for (int64_t c = 0; c < kTileCols; ++c) b[c] = static_cast<acc>(B[j * ldb + c]);
    for (int64_t r = 0; r < kTileRows; ++r) {
      const acc a = A[r * lda + j];
      for (int64_t c = 0; c < kTileCols; ++c) t[r][c] += a * b[c];
    }
  }
  for (int64_t r = 0; r < kTileRows; ++r)
    for (int64_t c = 0; c < kTileCols; ++c) C[r * ldc + c] = static_cast<c_t>(t[r][c]);
}

// The same for a partial tile at the matrix edge (rows < kTileRows or cols < kTileCols).
template <typename acc, typename b_t, typename c_t>
inline void small_gemm_edge(int64_t rows, int64_t cols, int64_t K, const acc* A, int64_t lda, const b_t* B,
                            int64_t ldb, c_t* C, int64_t ldc) {
  for (int64_t r = 0; r < rows; ++r) {
    acc t[kTileCols] = {};
    for (int64_t j = 0; j < K; ++j) {
      const acc a = A[r * lda + j];
      for (int64_t c = 0; c < cols; ++c) t[c] += a * static_cast<acc>(B[j * ldb + c]);
    }
    for (int64_t c = 0; c < cols; ++c) C[r * ldc + c] = static_cast<c_t>(t[c]);
  }
}

// C (M x Ncols, leading dimension ldc) = A (M x K) @ B (K x Ncols), parallel over blocks of C. A is an
// accumulation-type buffer; B and C may be of the input dtype (converted on load and on store).
template <typename acc, typename b_t, typename c_t>
void small_gemm(int64_t M, int64_t Ncols, int64_t K, const acc* A, int64_t lda, const b_t* B, int64_t ldb,
                c_t* C, int64_t ldc) {
  constexpr int64_t kBlockRows = 64, kBlockCols = 256;
  const int64_t row_blocks = (M + kBlockRows - 1) / kBlockRows;
  const int64_t col_blocks = (Ncols + kBlockCols - 1) / kBlockCols;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(kBlockRows * kBlockCols / 64 * K, 1));
  at::parallel_for(0, row_blocks * col_blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t m_lo = (blk % row_blocks) * kBlockRows, m_hi = std::min(M, m_lo + kBlockRows);
      const int64_t c_lo = (blk / row_blocks) * kBlockCols, c_hi = std::min(Ncols, c_lo + kBlockCols);
      // Column strips outside, row tiles inside: the K x kTileCols strip of B stays in L1.
      for (int64_t c = c_lo; c < c_hi; c += kTileCols) {
        const int64_t cols = std::min(kTileCols, c_hi - c);
        for (int64_t m = m_lo; m < m_hi; m += kTileRows) {
          const int64_t rows = std::min(kTileRows, m_hi - m);
          if (rows == kTileRows && cols == kTileCols)
            small_gemm_tile(K, A + m * lda, lda, B + c, ldb, C + m * ldc + c, ldc);
          else
            small_gemm_edge(rows, cols, K, A + m * lda, lda, B + c, ldb, C + m * ldc + c, ldc);
        }
      }
    }
  });
}

}  // namespace meprop::cpu
