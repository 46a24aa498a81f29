// The whole unified backward of one layer on CUDA, in one call: the CUDA kernels of the selection and the
// compacted products (called through the dispatcher), and the bias gradient by ATen's reduction.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include "common.cuh"

namespace meprop::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_backward_unified_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, int64_t k,
    const std::optional<at::Tensor>& idx, bool input_grad, bool weight_grad, bool bias_grad, bool rows_only,
    bool /*reuse_grad*/) {
  checks::linear_backward("linear_backward_unified", dy, x, weight, k, idx, 1);
  const c10::cuda::OptionalCUDAGuard guard(dy.device());
  static const auto topk = meprop_op<at::Tensor(const at::Tensor&, int64_t)>("topk_unified");
  static const auto input_grad_op =
      meprop_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("linear_input_grad_unified");
  static const auto weight_rows_op =
      meprop_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("linear_weight_grad_unified");
  static const auto scatter_op =
      meprop_op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>("scatter_rows");
  // Outputs not asked for are empty tensors, each its own (an op's outputs may not alias each other).
  const auto nothing = [&] { return at::empty({0}, dy.options()); };
  at::Tensor kept = idx.has_value() ? idx->clone() : topk.call(dy, k);  // (outputs may not alias inputs)
  const at::Tensor dx = input_grad ? input_grad_op.call(dy, weight, kept) : nothing();
  at::Tensor dw = nothing();
  if (weight_grad && rows_only) {
    kept = std::get<0>(at::sort(kept));
    dw = weight_rows_op.call(dy, x, kept);
  } else if (weight_grad) {
    dw = scatter_op.call(weight_rows_op.call(dy, x, kept), kept, dy.size(1));
  }
  const at::Tensor db = bias_grad ? at::sum(dy, {0}, false, acc_dtype(dy.scalar_type())).to(dy.scalar_type()) : nothing();
  return {dx, dw, db, kept};
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CUDA, m) { m.impl("linear_backward_unified", &linear_backward_unified_cuda); }

}  // namespace meprop::cuda
