// Unified top-k with error feedback on CUDA: the column scores of column_sums.cuh, then one block ranks
// r = scores + memory with the block selection of select.cuh (keys of |r|) and writes the next memory
// decay * r with the kept columns 0. k > kMaxSelect takes a sort of |r|. The bias gradient is ATen's sum.
#include <ATen/ops/sort.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include "column_sums.cuh"
#include "common.cuh"
#include "select.cuh"

namespace meprop::cuda {
namespace {

constexpr int kSelectThreads = 1024;

// One block: idx[0..k) = the k columns of largest |scores + memory| in selection order, and
// next = decay * (scores + memory) with those columns 0.
template <typename acc>
__global__ void __launch_bounds__(kSelectThreads)
    feedback_select_kernel(const acc* __restrict__ scores, const acc* __restrict__ memory, int n_cols, int k,
                           acc decay, int64_t* __restrict__ idx, acc* __restrict__ next) {
  using K = typename KeyOf<acc>::type;
  __shared__ SelectShared sh;
  extern __shared__ __align__(16) unsigned char smem[];
  const int padded = padded_size(k);
  K* sel_key = reinterpret_cast<K*>(smem);
  int* sel_idx = reinterpret_cast<int*>(smem + static_cast<size_t>(padded) * sizeof(K));
  block_select<K>([&](int c) { return order_key(scores[c] + memory[c]); }, n_cols, k, sh, sel_key, sel_idx, padded);
  for (int c = threadIdx.x; c < n_cols; c += blockDim.x) next[c] = decay * (scores[c] + memory[c]);
  __syncthreads();  // (the kept columns' zeros below come after every thread's writes above)
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    idx[i] = sel_idx[i];
    next[sel_idx[i]] = acc(0);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_unified_feedback_cuda(const at::Tensor& dy_in,
                                                                         const at::Tensor& memory_in, int64_t k,
                                                                         double decay, bool bias_grad) {
  constexpr const char* op = "topk_unified_feedback";
  checks::topk_unified_feedback(dy_in, memory_in, k, decay);
  const c10::cuda::OptionalCUDAGuard guard(dy_in.device());
  const at::Tensor dy = dy_in.contiguous(), memory = memory_in.contiguous();
  const int64_t n_cols = dy.size(1);
  TORCH_CHECK_VALUE(n_cols <= std::numeric_limits<int>::max(), "meprop.", op,
                    ": dy must have fewer than 2^31 columns on CUDA, got ", n_cols);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor scores = column_abs_sums(dy);
  at::Tensor idx = at::empty({k}, dy.options().dtype(at::kLong));
  at::Tensor next = at::empty({n_cols}, memory.options());
  if (k <= kMaxSelect) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "topk_unified_feedback_cuda", [&] {
      using acc = acc_t<scalar_t>;
      using K = typename KeyOf<acc>::type;
      const int padded = padded_size(static_cast<int>(k));
      feedback_select_kernel<acc><<<1, kSelectThreads, selection_bytes<K>(padded), stream>>>(
          scores.const_data_ptr<acc>(), memory.const_data_ptr<acc>(), static_cast<int>(n_cols), static_cast<int>(k),
          static_cast<acc>(decay), idx.mutable_data_ptr<int64_t>(), next.mutable_data_ptr<acc>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    // A stable descending sort ranks NaN first and keeps equal magnitudes in index order.
    const at::Tensor ranked = scores.add(memory);
    const at::Tensor order = std::get<1>(at::sort(ranked.abs(), /*stable=*/true, /*dim=*/0, /*descending=*/true));
    idx.copy_(order.narrow(0, 0, k));
    next.copy_(ranked.mul(decay));
    next.index_fill_(0, idx, 0);
  }
  const at::Tensor db = bias_grad ? at::sum(dy, {0}, false, acc_dtype(dy.scalar_type())).to(dy.scalar_type())
                                  : at::empty({0}, dy.options());
  return {idx, next, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CUDA, m) { m.impl("topk_unified_feedback", &topk_unified_feedback_cuda); }

}  // namespace meprop::cuda
