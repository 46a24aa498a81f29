// Unified compacted weight gradient on CUDA: dW_rows (k, in) = dy[:, idx]^T @ x. The compacted block
// dy[:, idx] (N x k) is gathered (index_select checks the index values on the device) and multiplied by
// cuBLAS, which accumulates float16/bfloat16 products in float32.
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "common.cuh"

namespace meprop::cuda {
namespace {

at::Tensor linear_weight_grad_unified_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& idx) {
  checks::linear_weight_grad_unified(dy, x, idx);
  const c10::cuda::OptionalCUDAGuard guard(dy.device());
  return at::mm(dy.index_select(1, idx).t(), x);
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CUDA, m) { m.impl("linear_weight_grad_unified", &linear_weight_grad_unified_cuda); }

}  // namespace meprop::cuda
