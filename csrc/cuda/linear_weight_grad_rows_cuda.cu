// Per-example sparse weight gradient on CUDA: dW[j] = sum over (n, i) with idx[n, i] == j of
// vals[n, i] * x[n]. The N*k pairs are sorted by output row (a stable sort, so each row's pairs keep
// their order); a block then owns one output row and a strip of columns, finds the row's segment by
// binary search and sums its pairs in order: no atomics, deterministic results, every element written.
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common.cuh"

namespace meprop::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kItems = 4;
constexpr int64_t kStrip = kThreads * kItems;

// The first position in sorted[0..n) whose value is >= v (upper = false) or > v (upper = true).
__device__ int64_t bound(const int64_t* sorted, int64_t n, int64_t v, bool upper) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (sorted[mid] < v || (upper && sorted[mid] == v))
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// Asserts that rows[0..n) lie in [0, out_features) and are distinct (seen: out_features zeros).
__global__ void mark_rows_kernel(const int64_t* __restrict__ rows, int64_t n, int64_t out_features,
                                 int* __restrict__ seen) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = rows[i];
    CUDA_KERNEL_ASSERT(j >= 0 && j < out_features &&
                       "meprop.linear_weight_grad_rows: rows values must lie in [0, out_features)");
    const int previous = atomicExch(seen + j, 1);
    CUDA_KERNEL_ASSERT(previous == 0 && "meprop.linear_weight_grad_rows: rows holds a value more than once");
  }
}

// grad[p] = the gradient of weight row targets[p] (row p itself when targets is null).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    weight_grad_rows_kernel(const scalar_t* __restrict__ vals, const int64_t* __restrict__ sorted_rows,
                            const int64_t* __restrict__ order, int64_t n_pairs, int64_t k,
                            const int64_t* __restrict__ targets, int64_t n_targets, int64_t out_features,
                            const scalar_t* __restrict__ x, int64_t n_in, scalar_t* __restrict__ grad) {
  using acc = acc_t<scalar_t>;
  __shared__ acc coef[kThreads];
  __shared__ int64_t src_row[kThreads];
  __shared__ int64_t segment[2];
  const int64_t n_strips = ceil_div(n_in, kStrip);
  for (int64_t tile = blockIdx.x; tile < n_targets * n_strips; tile += gridDim.x) {
    const int64_t p = tile / n_strips, c0 = (tile % n_strips) * kStrip + threadIdx.x;
    __syncthreads();  // the previous tile's segment is no longer read
    if (threadIdx.x == 0) {
      const int64_t j = targets == nullptr ? p : targets[p];
      CUDA_KERNEL_ASSERT(j >= 0 && j < out_features && "meprop.linear_weight_grad_rows: rows values must lie in [0, out_features)");
      CUDA_KERNEL_ASSERT((n_pairs == 0 || (sorted_rows[0] >= 0 && sorted_rows[n_pairs - 1] < out_features)) &&
                         "meprop.linear_weight_grad_rows: idx values must lie in [0, out_features)");
      segment[0] = bound(sorted_rows, n_pairs, j, false);
      segment[1] = bound(sorted_rows, n_pairs, j, true);
    }
    __syncthreads();
    const int64_t begin = segment[0], end = segment[1];
    acc sum[kItems];
#pragma unroll
    for (int s = 0; s < kItems; ++s) sum[s] = 0;
    for (int64_t e0 = begin; e0 < end; e0 += kThreads) {
      const int count = static_cast<int>(end - e0 < kThreads ? end - e0 : kThreads);
      __syncthreads();  // the previous chunk's pairs are no longer read
      if (threadIdx.x < count) {
        const int64_t pair = order[e0 + threadIdx.x];
        src_row[threadIdx.x] = pair / k;
        coef[threadIdx.x] = static_cast<acc>(vals[pair]);
      }
      __syncthreads();
      for (int i = 0; i < count; ++i) {
        const scalar_t* xr = x + src_row[i] * n_in;
        const acc a = coef[i];
#pragma unroll
        for (int s = 0; s < kItems; ++s) {
          const int64_t c = c0 + s * kThreads;
          if (c < n_in) sum[s] += a * static_cast<acc>(xr[c]);
        }
      }
    }
#pragma unroll
    for (int s = 0; s < kItems; ++s) {
      const int64_t c = c0 + s * kThreads;
      if (c < n_in) grad[p * n_in + c] = static_cast<scalar_t>(sum[s]);
    }
  }
}

at::Tensor linear_weight_grad_rows_cuda(const at::Tensor& vals_in, const at::Tensor& idx_in, const at::Tensor& x_in,
                                        int64_t out_features, const std::optional<at::Tensor>& rows_in) {
  checks::linear_weight_grad_rows(vals_in, idx_in, x_in, out_features, rows_in);
  const c10::cuda::OptionalCUDAGuard guard(vals_in.device());
  const at::Tensor vals = vals_in.contiguous(), x = x_in.contiguous();
  const at::Tensor rows = rows_in.has_value() ? rows_in->contiguous() : at::Tensor();
  if (rows.defined() && rows.numel() > 0) {  // device assertion: distinct rows (their range is asserted below)
    at::Tensor seen = at::zeros({out_features}, rows.options().dtype(at::kInt));
    mark_rows_kernel<<<grid_for(ceil_div(rows.numel(), kThreads)), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        rows.const_data_ptr<int64_t>(), rows.numel(), out_features, seen.mutable_data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t k = vals.size(1), n_pairs = vals.numel(), n_in = x.size(1);
  const int64_t n_targets = rows.defined() ? rows.size(0) : out_features;
  at::Tensor grad = at::empty({n_targets, n_in}, vals.options());
  if (grad.numel() == 0) return grad;
  // The pairs in output-row order; a stable sort keeps each row's pairs in increasing (n, i) order.
  const auto sorted = at::sort(idx_in.reshape({-1}), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor& sorted_rows = std::get<0>(sorted);
  const at::Tensor& order = std::get<1>(sorted);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vals.scalar_type(), "linear_weight_grad_rows_cuda", [&] {
    weight_grad_rows_kernel<scalar_t><<<grid_for(n_targets * ceil_div(n_in, kStrip)), kThreads, 0,
                                        c10::cuda::getCurrentCUDAStream()>>>(
        vals.const_data_ptr<scalar_t>(), sorted_rows.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(),
        n_pairs, k, rows.defined() ? rows.const_data_ptr<int64_t>() : nullptr, n_targets, out_features,
        x.const_data_ptr<scalar_t>(), n_in, grad.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CUDA, m) { m.impl("linear_weight_grad_rows", &linear_weight_grad_rows_cuda); }

}  // namespace meprop::cuda
