// Unified top-k on CUDA: partial column sums of |dy| over chunks of rows (one block per column tile and
// row chunk), a fixed-order sum of the partials per column, then one block selects the k largest column
// scores with the block selection of select.cuh. Every sum is in a fixed order: the result does not
// depend on scheduling. k > kMaxSelect takes a sort of the scores.
#include <ATen/ops/sort.h>
#include <torch/library.h>

#include "common.cuh"
#include "select.cuh"

namespace meprop::cuda {
namespace {

constexpr int kSumThreads = 256;
constexpr int kMinRowsPerChunk = 64;
constexpr int kSelectThreads = 1024;

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

// One block: idx[0..k) = the k best columns by score, in selection order.
template <typename acc>
__global__ void __launch_bounds__(kSelectThreads)
    select_columns_kernel(const acc* __restrict__ scores, int n_cols, int k, int64_t* __restrict__ idx) {
  using K = typename KeyOf<acc>::type;
  __shared__ SelectShared sh;
  extern __shared__ __align__(16) unsigned char smem[];
  const int padded = padded_size(k);
  K* sel_key = reinterpret_cast<K*>(smem);
  int* sel_idx = reinterpret_cast<int*>(smem + static_cast<size_t>(padded) * sizeof(K));
  block_select<K>([&](int c) { return order_key(scores[c]); }, n_cols, k, sh, sel_key, sel_idx, padded);
  for (int i = threadIdx.x; i < k; i += blockDim.x) idx[i] = sel_idx[i];
}

at::Tensor topk_unified_cuda(const at::Tensor& dy_in, int64_t k) {
  constexpr const char* op = "topk_unified";
  checks::topk(op, dy_in, k);
  const c10::cuda::OptionalCUDAGuard guard(dy_in.device());
  const at::Tensor dy = dy_in.contiguous();
  const int64_t n_rows = dy.size(0), n_cols = dy.size(1);
  TORCH_CHECK_VALUE(n_cols <= std::numeric_limits<int>::max(), "meprop.", op,
                    ": dy must have fewer than 2^31 columns on CUDA, got ", n_cols);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // At most 65535 row chunks (the grid's y limit), each of at least kMinRowsPerChunk rows.
  const int64_t rows_per_chunk = std::max<int64_t>(kMinRowsPerChunk, ceil_div(n_rows, 65535));
  const int64_t n_chunks = std::max<int64_t>(1, ceil_div(n_rows, rows_per_chunk));
  const at::TensorOptions acc_options = dy.options().dtype(acc_dtype(dy.scalar_type()));
  at::Tensor scores = at::empty({n_cols}, acc_options);
  at::Tensor idx = at::empty({k}, dy.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "topk_unified_cuda", [&] {
    using acc = acc_t<scalar_t>;
    at::Tensor partial = n_chunks == 1 ? scores : at::empty({n_chunks, n_cols}, acc_options);
    const dim3 sum_grid(static_cast<unsigned int>(ceil_div(n_cols, kSumThreads)), static_cast<unsigned int>(n_chunks));
    column_abs_sums_kernel<scalar_t><<<sum_grid, kSumThreads, 0, stream>>>(
        dy.const_data_ptr<scalar_t>(), n_rows, n_cols, rows_per_chunk, partial.mutable_data_ptr<acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (n_chunks > 1) {
      sum_chunks_kernel<acc><<<grid_for(ceil_div(n_cols, 256)), 256, 0, stream>>>(
          partial.const_data_ptr<acc>(), n_chunks, n_cols, scores.mutable_data_ptr<acc>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (k <= kMaxSelect) {
      using K = typename KeyOf<acc>::type;
      const int padded = padded_size(static_cast<int>(k));
      select_columns_kernel<acc><<<1, kSelectThreads, selection_bytes<K>(padded), stream>>>(
          scores.const_data_ptr<acc>(), static_cast<int>(n_cols), static_cast<int>(k), idx.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (k > kMaxSelect) {
    // A stable descending sort ranks NaN first and keeps equal scores in index order.
    const at::Tensor order = std::get<1>(at::sort(scores, /*stable=*/true, /*dim=*/0, /*descending=*/true));
    idx.copy_(order.narrow(0, 0, k));
  }
  return idx;
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CUDA, m) { m.impl("topk_unified", &topk_unified_cuda); }

}  // namespace meprop::cuda
