// The unified selection's column scores on CUDA, shared by topk_unified and column_scores: partial column
// sums of |dy| over chunks of rows (one block per column tile and row chunk), then a fixed-order sum of the
// partials per column. Every sum is in a fixed order: the result does not depend on scheduling.
#pragma once

#include "common.cuh"

namespace meprop::cuda {

constexpr int kSumThreads = 256;
constexpr int kMinRowsPerChunk = 64;

// partial[chunk, c] = sum of |dy[n, c]| over the rows n of the chunk.
template <typename scalar_t>
__global__ void column_abs_sums_kernel(const scalar_t* __restrict__ dy, int64_t n_rows, int64_t n_cols,
                                       int64_t rows_per_chunk, acc_t<scalar_t>* __restrict__ partial) {
  using acc = acc_t<scalar_t>;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kSumThreads + threadIdx.x;
  if (c >= n_cols) return;
  const int64_t chunk = blockIdx.y;
  const int64_t r0 = chunk * rows_per_chunk, r1 = std::min(n_rows, r0 + rows_per_chunk);
  acc sum = 0;
  for (int64_t n = r0; n < r1; ++n) sum += magnitude(static_cast<acc>(dy[n * n_cols + c]));
  partial[chunk * n_cols + c] = sum;
}

// scores[c] = sum over chunks of partial[chunk, c], in chunk order.
template <typename acc>
__global__ void sum_chunks_kernel(const acc* __restrict__ partial, int64_t n_chunks, int64_t n_cols,
                                  acc* __restrict__ scores) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < n_cols;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc sum = 0;
    for (int64_t chunk = 0; chunk < n_chunks; ++chunk) sum += partial[chunk * n_cols + c];
    scores[c] = sum;
  }
}

// scores (n_cols,) in the accumulation dtype = sum_n |dy[n, c]| of a contiguous dy, on the current stream.
inline at::Tensor column_abs_sums(const at::Tensor& dy) {
  const int64_t n_rows = dy.size(0), n_cols = dy.size(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // At most 65535 row chunks (the grid's y limit), each of at least kMinRowsPerChunk rows.
  const int64_t rows_per_chunk = std::max<int64_t>(kMinRowsPerChunk, ceil_div(n_rows, 65535));
  const int64_t n_chunks = std::max<int64_t>(1, ceil_div(n_rows, rows_per_chunk));
  const at::TensorOptions acc_options = dy.options().dtype(acc_dtype(dy.scalar_type()));
  at::Tensor scores = at::empty({n_cols}, acc_options);
  if (n_cols == 0) return scores;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "column_abs_sums", [&] {
    using acc = acc_t<scalar_t>;
    at::Tensor partial = n_chunks == 1 ? scores : at::empty({n_chunks, n_cols}, acc_options);
    const dim3 grid(static_cast<unsigned int>(ceil_div(n_cols, kSumThreads)), static_cast<unsigned int>(n_chunks));
    column_abs_sums_kernel<scalar_t><<<grid, kSumThreads, 0, stream>>>(
        dy.const_data_ptr<scalar_t>(), n_rows, n_cols, rows_per_chunk, partial.mutable_data_ptr<acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (n_chunks > 1) {
      sum_chunks_kernel<acc><<<grid_for(ceil_div(n_cols, 256)), 256, 0, stream>>>(
          partial.const_data_ptr<acc>(), n_chunks, n_cols, scores.mutable_data_ptr<acc>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return scores;
}

}  // namespace meprop::cuda
