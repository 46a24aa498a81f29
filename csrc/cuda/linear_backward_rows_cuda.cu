// The whole per-example backward of one layer on CUDA, in one call: the CUDA kernels of the selection and the
// sparse products (called through the dispatcher), and the bias gradient by ATen's reduction.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/_unique.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include "common.cuh"

namespace meprop::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_backward_rows_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, int64_t k,
    const std::optional<at::Tensor>& idx_in, bool input_grad, bool weight_grad, bool bias_grad, bool rows_only,
    bool /*reuse_grad*/) {
  checks::linear_backward("linear_backward_rows", dy, x, weight, k, idx_in, 2);
  const c10::cuda::OptionalCUDAGuard guard(dy.device());
  using Pair = std::tuple<at::Tensor, at::Tensor>;
  static const auto topk = meprop_op<Pair(const at::Tensor&, int64_t)>("topk_rows");
  static const auto input_grad_op =
      meprop_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("linear_input_grad_rows");
  static const auto weight_grad_op =
      meprop_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                           const std::optional<at::Tensor>&)>("linear_weight_grad_rows");
  at::Tensor vals, idx;
  if (idx_in.has_value()) {
    idx = *idx_in;
    vals = dy.gather(1, idx);
  } else {
    std::tie(vals, idx) = topk.call(dy, k);
  }
  // Outputs not asked for are empty tensors, each its own (an op's outputs may not alias each other).
  const auto nothing = [&] { return at::empty({0}, dy.options()); };
  const at::Tensor dx = input_grad ? input_grad_op.call(vals, idx, weight) : nothing();
  at::Tensor dw = nothing(), rows = at::empty({0}, idx.options());
  if (weight_grad && rows_only) {
    rows = std::get<0>(at::_unique(idx.reshape({-1}), /*sorted=*/true));
    dw = weight_grad_op.call(vals, idx, x, dy.size(1), rows);
  } else if (weight_grad) {
    dw = weight_grad_op.call(vals, idx, x, dy.size(1), std::nullopt);
  }
  const at::Tensor db = bias_grad ? at::sum(dy, {0}, false, acc_dtype(dy.scalar_type())).to(dy.scalar_type()) : nothing();
  return {dx, dw, db, rows};
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CUDA, m) { m.impl("linear_backward_rows", &linear_backward_rows_cuda); }

}  // namespace meprop::cuda
