// Per-example sparse input gradient on CUDA: dx[n] = sum_i vals[n, i] * W[idx[n, i], :]. A block owns
// one row n and a strip of kThreads * kItems columns: it stages the row's (vals, idx) pairs in shared
// memory and every thread accumulates its columns over the k gathered rows of W (coalesced reads), in
// a fixed order, so the result is deterministic.
#include <torch/library.h>

#include "common.cuh"

namespace meprop::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kItems = 4;
constexpr int64_t kStrip = kThreads * kItems;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    input_grad_rows_kernel(const scalar_t* __restrict__ vals, const int64_t* __restrict__ idx,
                           const scalar_t* __restrict__ weight, int64_t n_rows, int64_t k, int64_t n_out,
                           int64_t n_in, scalar_t* __restrict__ dx) {
  using acc = acc_t<scalar_t>;
  __shared__ acc coef[kThreads];
  __shared__ int64_t src_row[kThreads];
  const int64_t n_strips = ceil_div(n_in, kStrip);
  for (int64_t tile = blockIdx.x; tile < n_rows * n_strips; tile += gridDim.x) {
    const int64_t n = tile / n_strips, c0 = (tile % n_strips) * kStrip + threadIdx.x;
    acc sum[kItems];
#pragma unroll
    for (int s = 0; s < kItems; ++s) sum[s] = 0;
    for (int64_t i0 = 0; i0 < k; i0 += kThreads) {
      const int count = static_cast<int>(k - i0 < kThreads ? k - i0 : kThreads);
      __syncthreads();  // the previous chunk's pairs are no longer read
      if (threadIdx.x < count) {
        const int64_t e = n * k + i0 + threadIdx.x, j = idx[e];
        CUDA_KERNEL_ASSERT(j >= 0 && j < n_out && "meprop.linear_input_grad_rows: idx values must lie in [0, out)");
        src_row[threadIdx.x] = j;
        coef[threadIdx.x] = static_cast<acc>(vals[e]);
      }
      __syncthreads();
      for (int i = 0; i < count; ++i) {
        const scalar_t* w = weight + src_row[i] * n_in;
        const acc a = coef[i];
#pragma unroll
        for (int s = 0; s < kItems; ++s) {
          const int64_t c = c0 + s * kThreads;
          if (c < n_in) sum[s] += a * static_cast<acc>(w[c]);
        }
      }
    }
#pragma unroll
    for (int s = 0; s < kItems; ++s) {
      const int64_t c = c0 + s * kThreads;
      if (c < n_in) dx[n * n_in + c] = static_cast<scalar_t>(sum[s]);
    }
  }
}

at::Tensor linear_input_grad_rows_cuda(const at::Tensor& vals_in, const at::Tensor& idx_in, const at::Tensor& weight_in) {
  checks::linear_input_grad_rows(vals_in, idx_in, weight_in);
  const c10::cuda::OptionalCUDAGuard guard(vals_in.device());
  const at::Tensor vals = vals_in.contiguous(), idx = idx_in.contiguous(), weight = weight_in.contiguous();
  const int64_t n_rows = vals.size(0), k = vals.size(1), n_out = weight.size(0), n_in = weight.size(1);
  at::Tensor dx = at::empty({n_rows, n_in}, vals.options());
  if (dx.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vals.scalar_type(), "linear_input_grad_rows_cuda", [&] {
    input_grad_rows_kernel<scalar_t><<<grid_for(n_rows * ceil_div(n_in, kStrip)), kThreads, 0,
                                       c10::cuda::getCurrentCUDAStream()>>>(
        vals.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), weight.const_data_ptr<scalar_t>(), n_rows, k,
        n_out, n_in, dx.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CUDA, m) { m.impl("linear_input_grad_rows", &linear_input_grad_rows_cuda); }

}  // namespace meprop::cuda
