// nn.LSTM's forward of one layer and direction on CPU, keeping what meProp's BPTT needs (semantics:
// meprop/lstm_reference.py's lstm_forward): the input GEMM of the whole sequence written straight into the
// gates buffer (lstm_forward.h, shared with CUDA), then per step one GEMM that adds h_{t-1} W_hh^T in place and one vectorised pass that
// activates the gates and writes c_t and h_t. Outputs are written once (no temporaries of the step's size);
// float16/bfloat16 are computed in float32.
#include <torch/library.h>

#include "activations.h"
#include "common.h"
#include "large_alloc.h"
#include "../lstm_forward.h"

namespace meprop::cpu {
namespace {

// Rows [0, b) of one step: gates (b x 4H) hold the pre-activations (i, f, g, o) and are activated in place;
// c = f * c_prev + i * g and h = o * tanh(c).
template <typename acc>
void lstm_cell(int64_t b, int64_t H, acc* gates, const acc* c_prev, acc* c, acc* h) {
  at::parallel_for(0, b, row_grain(4 * H), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      acc* gi = gates + n * 4 * H;
      acc *gf = gi + H, *gg = gi + 2 * H, *go = gi + 3 * H;
      const acc* cp = c_prev + n * H;
      acc *cn = c + n * H, *hn = h + n * H;
      int64_t j = 0;
      if constexpr (std::is_same_v<acc, float>) {
        constexpr int L = Simd<float>::kLanes;
        for (; j + L <= H; j += L) {
          const fvec i = sigmoid_vec(load_vec(gi + j)), f = sigmoid_vec(load_vec(gf + j));
          const fvec g = tanh_vec(load_vec(gg + j)), o = sigmoid_vec(load_vec(go + j));
          const fvec cv = f * load_vec(cp + j) + i * g;
          const fvec hv = o * tanh_vec(cv);
          std::memcpy(gi + j, &i, sizeof(i));
          std::memcpy(gf + j, &f, sizeof(f));
          std::memcpy(gg + j, &g, sizeof(g));
          std::memcpy(go + j, &o, sizeof(o));
          std::memcpy(cn + j, &cv, sizeof(cv));
          std::memcpy(hn + j, &hv, sizeof(hv));
        }
      }
      for (; j < H; ++j) {
        const acc i = sigmoid_scalar(gi[j]), f = sigmoid_scalar(gf[j]), g = std::tanh(gg[j]);
        const acc o = sigmoid_scalar(go[j]);
        gi[j] = i, gf[j] = f, gg[j] = g, go[j] = o;
        cn[j] = f * cp[j] + i * g;
        hn[j] = o * std::tanh(cn[j]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_forward_cpu(const at::Tensor& x_in, const at::Tensor& h0_in,
                                                              const at::Tensor& c0_in, const at::Tensor& w_ih_in,
                                                              const at::Tensor& w_hh_in,
                                                              const std::optional<at::Tensor>& bias_in,
                                                              at::OptionalIntArrayRef batch_sizes, bool reverse) {
  checks::lstm_forward(x_in, h0_in, c0_in, w_ih_in, w_hh_in, bias_in, batch_sizes);
  const int64_t steps = x_in.size(0), batch = x_in.size(1), hidden = w_hh_in.size(1);
  const int64_t G = 4 * hidden;
  const auto acc_type = acc_dtype(x_in.scalar_type());
  const auto as_acc = [&](const at::Tensor& t) { return t.to(acc_type).contiguous(); };
  const at::Tensor x = as_acc(x_in), w_ih = as_acc(w_ih_in), w_hh = as_acc(w_hh_in);
  const auto options = x.options();
  at::Tensor gates = empty_for_write({steps, batch, G}, options);
  at::Tensor hs = empty_for_write({steps + 1, batch, hidden}, options);
  at::Tensor cs = empty_for_write({steps + 1, batch, hidden}, options);
  lstm_forward_start(x, w_ih, bias_in, h0_in, c0_in, reverse, gates, hs, cs);
  const at::Tensor w_hh_t = w_hh.t();
  AT_DISPATCH_FLOATING_TYPES(acc_type, "lstm_forward_cpu", [&] {
    using acc = scalar_t;
    for (int64_t step = 0; step < steps; ++step) {
      const int64_t t = reverse ? steps - 1 - step : step;
      const int64_t before = reverse ? t + 1 : t, after = reverse ? t : t + 1;
      const int64_t b = batch_sizes.has_value() ? (*batch_sizes)[t] : batch;
      at::Tensor g = gates.select(0, t);
      if (b > 0) {
        at::Tensor gb = g.narrow(0, 0, b);
        gb.addmm_(hs.select(0, before).narrow(0, 0, b), w_hh_t);
        lstm_cell<acc>(b, hidden, gb.mutable_data_ptr<acc>(), cs.select(0, before).const_data_ptr<acc>(),
                       cs.select(0, after).mutable_data_ptr<acc>(), hs.select(0, after).mutable_data_ptr<acc>());
      }
      if (b < batch) {  // rows not taking part carry their state; their gates are zero
        g.narrow(0, b, batch - b).zero_();
        hs.select(0, after).narrow(0, b, batch - b).copy_(hs.select(0, before).narrow(0, b, batch - b));
        cs.select(0, after).narrow(0, b, batch - b).copy_(cs.select(0, before).narrow(0, b, batch - b));
      }
    }
  });
  const auto dtype = x_in.scalar_type();
  return {hs.to(dtype), cs.to(dtype), gates.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CPU, m) { m.impl("lstm_forward", &lstm_forward_cpu); }

}  // namespace meprop::cpu
