// Unified top-k on CUDA: the column scores of column_sums.cuh (fixed-order sums of |dy|), then one block
// selects the k largest with the block selection of select.cuh. k > kMaxSelect takes a sort of the scores.
#include <ATen/ops/sort.h>
#include <torch/library.h>

#include "column_sums.cuh"
#include "common.cuh"
#include "select.cuh"

namespace meprop::cuda {
namespace {

constexpr int kSelectThreads = 1024;

// One block: idx[0..k) = the k best columns by score, in selection order.
template <typename acc>
__global__ void __launch_bounds__(kSelectThreads)
    select_columns_kernel(const acc* __restrict__ scores, int n_cols, int k, int64_t* __restrict__ idx) {
  using K = typename KeyOf<acc>::type;
  __shared__ SelectShared sh;
  extern __shared__ __align__(16) unsigned char smem[];
  const int padded = padded_size(k);
  K* sel_key = reinterpret_cast<K*>(smem);
  int* sel_idx = reinterpret_cast<int*>(smem + static_cast<size_t>(padded) * sizeof(K));
  block_select<K>([&](int c) { return order_key(scores[c]); }, n_cols, k, sh, sel_key, sel_idx, padded);
  for (int i = threadIdx.x; i < k; i += blockDim.x) idx[i] = sel_idx[i];
}

at::Tensor topk_unified_cuda(const at::Tensor& dy_in, int64_t k) {
  constexpr const char* op = "topk_unified";
  checks::topk(op, dy_in, k);
  const c10::cuda::OptionalCUDAGuard guard(dy_in.device());
  const at::Tensor dy = dy_in.contiguous();
  const int64_t n_cols = dy.size(1);
  TORCH_CHECK_VALUE(n_cols <= std::numeric_limits<int>::max(), "meprop.", op,
                    ": dy must have fewer than 2^31 columns on CUDA, got ", n_cols);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor scores = column_abs_sums(dy);
  at::Tensor idx = at::empty({k}, dy.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "topk_unified_cuda", [&] {
    using acc = acc_t<scalar_t>;
    if (k <= kMaxSelect) {
      using K = typename KeyOf<acc>::type;
      const int padded = padded_size(static_cast<int>(k));
      select_columns_kernel<acc><<<1, kSelectThreads, selection_bytes<K>(padded), stream>>>(
          scores.const_data_ptr<acc>(), static_cast<int>(n_cols), static_cast<int>(k), idx.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (k > kMaxSelect) {
    // A stable descending sort ranks NaN first and keeps equal scores in index order.
    const at::Tensor order = std::get<1>(at::sort(scores, /*stable=*/true, /*dim=*/0, /*descending=*/true));
    idx.copy_(order.narrow(0, 0, k));
  }
  return idx;
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CUDA, m) { m.impl("topk_unified", &topk_unified_cuda); }

}  // namespace meprop::cuda
