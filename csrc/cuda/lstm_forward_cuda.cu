// nn.LSTM's forward of one layer and direction on CUDA, keeping what meProp's BPTT needs (semantics:
// meprop/lstm_reference.py's lstm_forward): the input GEMM of the whole sequence into the gates buffer
// (lstm_forward.h, shared with the CPU kernel), then per step (host loop) one GEMM adding h_{t-1} W_hh^T in
// place and one elementwise kernel that activates the gates and writes c_t and h_t (rows not taking part carry
// their state), in the accumulation type.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../lstm_forward.h"
#include "common.cuh"

namespace meprop::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }
__device__ __forceinline__ double sigmoid(double v) { return 1.0 / (1.0 + exp(-v)); }

// One thread per (row, unit) of the batch: rows < b run the cell on gates (batch x 4H, pre-activations,
// activated in place); rows >= b copy their state and zero their gates.
template <typename acc>
__global__ void lstm_cell_kernel(int64_t batch, int64_t b, int64_t H, acc* __restrict__ gates,
                                 const acc* __restrict__ h_prev, const acc* __restrict__ c_prev, acc* __restrict__ h,
                                 acc* __restrict__ c) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < batch * H; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = e / H, j = e % H;
    acc* g = gates + n * 4 * H + j;
    if (n >= b) {
      g[0] = g[H] = g[2 * H] = g[3 * H] = acc(0);
      h[e] = h_prev[e];
      c[e] = c_prev[e];
      continue;
    }
    const acc i = sigmoid(g[0]), f = sigmoid(g[H]), gg = tanh(g[2 * H]), o = sigmoid(g[3 * H]);
    g[0] = i, g[H] = f, g[2 * H] = gg, g[3 * H] = o;
    const acc cn = f * c_prev[e] + i * gg;
    c[e] = cn;
    h[e] = o * tanh(cn);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_forward_cuda(const at::Tensor& x_in, const at::Tensor& h0_in,
                                                               const at::Tensor& c0_in, const at::Tensor& w_ih_in,
                                                               const at::Tensor& w_hh_in,
                                                               const std::optional<at::Tensor>& bias_in,
                                                               at::OptionalIntArrayRef batch_sizes, bool reverse) {
  checks::lstm_forward(x_in, h0_in, c0_in, w_ih_in, w_hh_in, bias_in, batch_sizes);
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const int64_t steps = x_in.size(0), batch = x_in.size(1), hidden = w_hh_in.size(1);
  const int64_t G = 4 * hidden;
  const auto acc_type = acc_dtype(x_in.scalar_type());
  const auto as_acc = [&](const at::Tensor& t) { return t.to(acc_type).contiguous(); };
  const at::Tensor x = as_acc(x_in), w_ih = as_acc(w_ih_in), w_hh = as_acc(w_hh_in);
  const auto options = x.options();
  at::Tensor gates = at::empty({steps, batch, G}, options);
  at::Tensor hs = at::empty({steps + 1, batch, hidden}, options), cs = at::empty({steps + 1, batch, hidden}, options);
  lstm_forward_start(x, w_ih, bias_in, h0_in, c0_in, reverse, gates, hs, cs);
  const at::Tensor w_hh_t = w_hh.t();
  AT_DISPATCH_FLOATING_TYPES(acc_type, "lstm_forward_cuda", [&] {
    using acc = scalar_t;
    for (int64_t step = 0; step < steps; ++step) {
      const int64_t t = reverse ? steps - 1 - step : step;
      const int64_t before = reverse ? t + 1 : t, after = reverse ? t : t + 1;
      const int64_t b = batch_sizes.has_value() ? (*batch_sizes)[t] : batch;
      at::Tensor g = gates.select(0, t);
      if (b > 0) g.narrow(0, 0, b).addmm_(hs.select(0, before).narrow(0, 0, b), w_hh_t);
      if (batch * hidden == 0) continue;
      lstm_cell_kernel<acc><<<grid_for(ceil_div(batch * hidden, kThreads)), kThreads, 0,
                              c10::cuda::getCurrentCUDAStream()>>>(
          batch, b, hidden, g.mutable_data_ptr<acc>(), hs.select(0, before).const_data_ptr<acc>(),
          cs.select(0, before).const_data_ptr<acc>(), hs.select(0, after).mutable_data_ptr<acc>(),
          cs.select(0, after).mutable_data_ptr<acc>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  const auto dtype = x_in.scalar_type();
  return {hs.to(dtype), cs.to(dtype), gates.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CUDA, m) { m.impl("lstm_forward", &lstm_forward_cuda); }

}  // namespace meprop::cuda
