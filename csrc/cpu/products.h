// The compacted products of the CPU kernels, shared by the product ops and the fused backward ops. Inputs
// are contiguous; outputs are preallocated, contiguous, and every element of an output is written.
//
// Unified: dy[:, idx] and W[idx, :] compacted in the accumulation type and multiplied by small_gemm
// (float16/bfloat16 accumulate in float32); small float32/float64 products go to BLAS.
// Per-example: every output row is a weighted sum of rows of a packed strip (combine_rows); the (n, i) pairs
// of the weight gradient are bucketed by output row (a counting sort), so every row is owned by one thread:
// no atomics, no dense masked dy, and a fixed summation order.
#pragma once

#include <vector>

#include "combine_rows.h"
#include "small_gemm.h"

namespace meprop::cpu {

// dx (N x in) = dy[:, idx] @ W[idx, :].
inline void unified_input_grad(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& idx, at::Tensor& dx) {
  const int64_t n_rows = dy.size(0), n_out = dy.size(1), n_in = w.size(1), k = idx.size(0);
  if ((dy.scalar_type() == at::kFloat || dy.scalar_type() == at::kDouble) && !small_gemm_pays(n_rows, n_in, k)) {
    at::mm_out(dx, dy.index_select(1, idx), w.index_select(0, idx));
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "unified_input_grad", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
    const scalar_t* pw = w.const_data_ptr<scalar_t>();
    const int64_t* pi = idx.const_data_ptr<int64_t>();
    // The compacted blocks, in the accumulation type: a = dy[:, idx] (N x k), b = W[idx, :] (k x in).
    std::vector<acc> a(n_rows * k), b(k * n_in);
    at::parallel_for(0, n_rows, row_grain(k), [&](int64_t r0, int64_t r1) {
      for (int64_t n = r0; n < r1; ++n)
        for (int64_t j = 0; j < k; ++j) a[n * k + j] = static_cast<acc>(pdy[n * n_out + pi[j]]);
    });
    at::parallel_for(0, k, row_grain(n_in), [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t c = 0; c < n_in; ++c) b[j * n_in + c] = static_cast<acc>(pw[pi[j] * n_in + c]);
    });
    small_gemm(n_rows, n_in, k, a.data(), k, b.data(), n_in, dx.mutable_data_ptr<scalar_t>(), n_in);
  });
}

// rows (k x in) = dy[:, idx]^T @ x. small_gemm packs x strip by strip (float16/bfloat16 accumulate in float32
// without converting x as a whole).
inline void unified_weight_rows(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& idx, at::Tensor& rows) {
  const int64_t n_rows = dy.size(0), n_out = dy.size(1), n_in = x.size(1), k = idx.size(0);
  if ((dy.scalar_type() == at::kFloat || dy.scalar_type() == at::kDouble) && !small_gemm_pays(k, n_in, n_rows)) {
    at::mm_out(rows, dy.index_select(1, idx).t(), x);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "unified_weight_rows", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
    const int64_t* pi = idx.const_data_ptr<int64_t>();
    std::vector<acc> at_(k * n_rows);  // dy[:, idx]^T (k x N), in the accumulation type
    at::parallel_for(0, n_rows, row_grain(k), [&](int64_t r0, int64_t r1) {
      for (int64_t n = r0; n < r1; ++n)
        for (int64_t j = 0; j < k; ++j) at_[j * n_rows + n] = static_cast<acc>(pdy[n * n_out + pi[j]]);
    });
    small_gemm(k, n_in, n_rows, at_.data(), n_rows, x.const_data_ptr<scalar_t>(), n_in,
               rows.mutable_data_ptr<scalar_t>(), n_in);
  });
}

// dx (N x in), dx[n] = sum_i vals[n, i] * W[idx[n, i], :]. One task per column strip: pack the strip of W
// (out x strip, sized to stay in L2), then every row of dx gathers its k weight rows from the panel.
inline void rows_input_grad(const at::Tensor& vals, const at::Tensor& idx, const at::Tensor& w, at::Tensor& dx) {
  const int64_t n_rows = vals.size(0), k = vals.size(1), n_out = w.size(0), n_in = w.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vals.scalar_type(), "rows_input_grad", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* pv = vals.const_data_ptr<scalar_t>();
    const int64_t* pi = idx.const_data_ptr<int64_t>();
    scalar_t* pdx = dx.mutable_data_ptr<scalar_t>();
    const bool stream = stream_output<acc>(pdx, n_rows, n_in);
    for_each_packed_strip<acc>(w.const_data_ptr<scalar_t>(), n_out, n_in,
                               [&](auto vecs, const acc* panel, int64_t c, int64_t width) {
                                 for (int64_t n = 0; n < n_rows; ++n)
                                   combine_rows<decltype(vecs)::value>(k, pv + n * k, pi + n * k, panel,
                                                                       pdx + n * n_in + c, width, stream);
                               });
  });
}

// The per-example weight gradient of the n_targets rows that `pos` selects: for every weight row j with
// pos[j] = p >= 0, output row dest[p] (p where dest is null) of `out` (R x in) is the sum over (n, i) with
// idx[n, i] == j of vals[n, i] * x[n]. Entries of rows with pos < 0 are left out; other rows of out are not
// touched.
inline void rows_weight_grad(const at::Tensor& vals, const at::Tensor& idx, const at::Tensor& x,
                             const std::vector<int64_t>& pos, int64_t n_targets, const int64_t* dest, at::Tensor& out) {
  const int64_t n_rows = vals.size(0), k = vals.size(1), n_in = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vals.scalar_type(), "rows_weight_grad", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* pv = vals.const_data_ptr<scalar_t>();
    const int64_t* pi = idx.const_data_ptr<int64_t>();
    // Counting sort of the (n, i) pairs by target, stable in n.
    std::vector<int64_t> start(n_targets + 1, 0);
    for (int64_t e = 0; e < n_rows * k; ++e)
      if (pos[pi[e]] >= 0) ++start[pos[pi[e]] + 1];
    for (int64_t p = 0; p < n_targets; ++p) start[p + 1] += start[p];
    std::vector<int64_t> fill(start.begin(), start.end() - 1), src(start[n_targets]);
    std::vector<acc> coef(start[n_targets]);
    for (int64_t e = 0; e < n_rows * k; ++e) {
      const int64_t p = pos[pi[e]];
      if (p < 0) continue;
      src[fill[p]] = e / k;
      coef[fill[p]++] = static_cast<acc>(pv[e]);
    }
    scalar_t* pg = out.mutable_data_ptr<scalar_t>();
    // One task per column strip: pack the strip of x (N x strip), then every target sums its bucket.
    const bool stream = dest == nullptr && stream_output<acc>(pg, n_targets, n_in);
    for_each_packed_strip<acc>(x.const_data_ptr<scalar_t>(), n_rows, n_in,
                               [&](auto vecs, const acc* panel, int64_t c, int64_t width) {
                                 for (int64_t p = 0; p < n_targets; ++p) {
                                   const int64_t row = dest == nullptr ? p : dest[p];
                                   combine_rows<decltype(vecs)::value>(
                                       start[p + 1] - start[p], coef.data() + start[p], src.data() + start[p], panel,
                                       pg + row * n_in + c, width, stream);
                                 }
                               });
  });
}

}  // namespace meprop::cpu
