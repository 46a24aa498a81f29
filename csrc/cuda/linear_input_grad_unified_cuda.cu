// Unified compacted input gradient on CUDA: dx (N, in) = dy[:, idx] @ W[idx, :]. The compacted blocks
// dy[:, idx] (N x k) and W[idx, :] (k x in) are gathered (index_select checks the index values on the
// device) and multiplied by cuBLAS, which accumulates float16/bfloat16 products in float32.
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "common.cuh"

namespace meprop::cuda {
namespace {

at::Tensor linear_input_grad_unified_cuda(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& idx) {
  checks::linear_input_grad_unified(dy, weight, idx);
  const c10::cuda::OptionalCUDAGuard guard(dy.device());
  return at::mm(dy.index_select(1, idx), weight.index_select(0, idx));
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CUDA, m) { m.impl("linear_input_grad_unified", &linear_input_grad_unified_cuda); }

}  // namespace meprop::cuda
