// meProp's BPTT of one LSTM layer and direction on CUDA, the whole sequence in one call (semantics:
// meprop/lstm_reference.py): the step loop runs on the host and each step is a few ATen kernels in the
// accumulation type: the elementwise gate gradient, the selection (a stable descending sort of the scores,
// so ties go by index as everywhere in meprop), and the products with the kept entries only (gathered rows of
// the weights for the unified selection, a sparse COO matrix of the kept entries per example).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common.cuh"

namespace meprop::cuda {
namespace {

// The kept entries of da (b x 4H): unified, idx (kept,); per example, idx (b, kept). Gate by gate with per_gate.
at::Tensor select(const at::Tensor& da, int64_t k, bool per_gate, bool per_example) {
  const int64_t b = da.size(0), G = da.size(1), groups = per_gate ? 4 : 1, width = G / groups;
  const at::Tensor offsets = at::arange(groups, da.options().dtype(at::kLong)).mul_(width).unsqueeze(1);
  if (!per_example) {
    const at::Tensor scores = da.abs().sum(0).view({groups, width});
    const at::Tensor order = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/1, /*descending=*/true));
    return order.narrow(1, 0, k).add(offsets).reshape({groups * k});
  }
  const at::Tensor order = std::get<1>(da.abs().view({b, groups, width}).sort(true, 2, true));
  return order.narrow(2, 0, k).add(offsets).reshape({b, groups * k});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward_cuda(
    const at::Tensor& dout_in, const at::Tensor& dh_n, const at::Tensor& dc_n, const at::Tensor& x_in,
    const at::Tensor& h_prev_in, const at::Tensor& c_prev_in, const at::Tensor& gates_in, const at::Tensor& w_ih_in,
    const at::Tensor& w_hh_in, at::OptionalIntArrayRef batch_sizes, bool reverse, int64_t k, bool per_gate,
    bool per_example, const std::optional<at::Tensor>& idx) {
  checks::lstm_backward(dout_in, dh_n, dc_n, x_in, h_prev_in, c_prev_in, gates_in, w_ih_in, w_hh_in, batch_sizes, k,
                        per_gate, per_example, idx);
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const int64_t steps = x_in.size(0), batch = x_in.size(1), hidden = w_hh_in.size(1), G = 4 * hidden;
  if (idx.has_value() && idx->numel() > 0) {  // index values, checked on the device (no synchronisation)
    at::_assert_async((idx->min().ge(0)).logical_and(idx->max().lt(G)),
                      "meprop.lstm_backward: idx values must lie in [0, 4 * hidden)");
  }
  const auto acc = acc_dtype(x_in.scalar_type());
  const auto as_acc = [&](const at::Tensor& t) { return t.to(acc).contiguous(); };
  const at::Tensor dout = as_acc(dout_in), x = as_acc(x_in), h_prev = as_acc(h_prev_in), c_prev = as_acc(c_prev_in);
  const at::Tensor gates = as_acc(gates_in), w_ih = as_acc(w_ih_in), w_hh = as_acc(w_hh_in);
  at::Tensor dh = as_acc(dh_n).clone(), dc = as_acc(dc_n).clone();
  at::Tensor dx = at::zeros(x.sizes(), x.options());
  at::Tensor dw_ih = at::zeros(w_ih.sizes(), x.options()), dw_hh = at::zeros(w_hh.sizes(), x.options());
  at::Tensor db = at::zeros({G}, x.options());
  for (int64_t step = 0; step < steps; ++step) {
    const int64_t t = reverse ? step : steps - 1 - step;  // the forward's steps in the opposite order
    const int64_t b = batch_sizes.has_value() ? (*batch_sizes)[t] : batch;
    if (b == 0) continue;
    const auto parts = gates[t].narrow(0, 0, b).chunk(4, 1);
    const at::Tensor &i = parts[0], &f = parts[1], &g = parts[2], &o = parts[3];
    const at::Tensor cp = c_prev[t].narrow(0, 0, b), tc = (f * cp + i * g).tanh();
    const at::Tensor dh_t = dh.narrow(0, 0, b) + dout[t].narrow(0, 0, b);
    const at::Tensor dc_t = dc.narrow(0, 0, b) + dh_t * o * (1 - tc * tc);
    const at::Tensor da = at::cat({dc_t * g * i * (1 - i), dc_t * cp * f * (1 - f), dc_t * i * (1 - g * g),
                                   dh_t * tc * o * (1 - o)}, 1);
    db.add_(da.sum(0));
    dc.narrow(0, 0, b).copy_(dc_t * f);
    const at::Tensor hp = h_prev[t].narrow(0, 0, b), xt = x[t].narrow(0, 0, b);
    at::Tensor kept;
    if (idx.has_value())
      kept = per_example ? (*idx)[t].narrow(0, 0, b) : (*idx)[t];
    else
      kept = select(da, k, per_gate, per_example);
    if (per_example) {
      const int64_t n_kept = kept.size(1);
      const at::Tensor rows = at::arange(b, kept.options()).unsqueeze(1).expand({b, n_kept}).reshape({-1});
      const at::Tensor sparse = at::sparse_coo_tensor(at::stack({rows, kept.reshape({-1})}),
                                                      da.gather(1, kept).reshape({-1}), {b, G}).coalesce();
      dh.narrow(0, 0, b).copy_(at::mm(sparse, w_hh));
      dx[t].narrow(0, 0, b).copy_(at::mm(sparse, w_ih));
      const at::Tensor sparse_t = sparse.t().coalesce();
      dw_hh.add_(at::mm(sparse_t, hp));
      dw_ih.add_(at::mm(sparse_t, xt));
    } else {
      const at::Tensor a = da.index_select(1, kept);
      dh.narrow(0, 0, b).copy_(a.mm(w_hh.index_select(0, kept)));
      dx[t].narrow(0, 0, b).copy_(a.mm(w_ih.index_select(0, kept)));
      dw_hh.index_add_(0, kept, a.t().mm(hp));
      dw_ih.index_add_(0, kept, a.t().mm(xt));
    }
  }
  const auto dtype = x_in.scalar_type();
  return {dx.to(dtype), dh.to(dtype), dc.to(dtype), dw_ih.to(dtype), dw_hh.to(dtype), db.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CUDA, m) { m.impl("lstm_backward", &lstm_backward_cuda); }

}  // namespace meprop::cuda
