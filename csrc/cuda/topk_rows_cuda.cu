// Per-example top-k on CUDA: one block per row (32 to 256 threads by row length) selects the k largest
// |dy[n, :]| with the block selection of select.cuh. A row that fits in shared memory is read from
// global memory once; the radix passes then read the shared copy. k > kMaxSelect takes a sort.
#include <ATen/ops/sort.h>
#include <torch/library.h>

#include "common.cuh"
#include "select.cuh"

namespace meprop::cuda {
namespace {

// Dynamic shared memory a block may use without opting in (48 KiB) less the static SelectShared.
constexpr size_t kDynamicSmemBudget = 48 * 1024 - sizeof(SelectShared) - 256;

template <typename scalar_t>
__global__ void topk_rows_kernel(const scalar_t* __restrict__ dy, int64_t n_rows, int n_cols, int k,
                                 bool cache_row, scalar_t* __restrict__ vals, int64_t* __restrict__ idx) {
  using acc = acc_t<scalar_t>;
  using K = typename KeyOf<acc>::type;
  __shared__ SelectShared sh;
  extern __shared__ __align__(16) unsigned char smem[];
  const int padded = padded_size(k);
  K* sel_key = reinterpret_cast<K*>(smem);
  int* sel_idx = reinterpret_cast<int*>(smem + static_cast<size_t>(padded) * sizeof(K));
  scalar_t* cache = reinterpret_cast<scalar_t*>(smem + selection_bytes<K>(padded));

  for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
    const scalar_t* src = dy + row * n_cols;
    if (cache_row) {
      for (int c = threadIdx.x; c < n_cols; c += blockDim.x) cache[c] = src[c];
      __syncthreads();
      src = cache;
    }
    block_select<K>([&](int c) { return order_key(static_cast<acc>(src[c])); }, n_cols, k, sh, sel_key, sel_idx,
                    padded);
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
      const int c = sel_idx[i];
      idx[row * k + i] = c;
      vals[row * k + i] = src[c];
    }
    __syncthreads();  // the next row reuses the shared buffers
  }
}

// Threads per row: enough for about 16 entries each, 32 to 256.
int threads_for(int64_t n_cols) {
  int threads = 32;
  while (threads < 256 && threads * 16 < n_cols) threads <<= 1;
  return threads;
}

std::tuple<at::Tensor, at::Tensor> topk_rows_cuda(const at::Tensor& dy_in, int64_t k) {
  constexpr const char* op = "topk_rows";
  checks::topk(op, dy_in, k);
  const c10::cuda::OptionalCUDAGuard guard(dy_in.device());
  const at::Tensor dy = dy_in.contiguous();
  const int64_t n_rows = dy.size(0), n_cols = dy.size(1);
  TORCH_CHECK_VALUE(n_cols <= std::numeric_limits<int>::max(), "meprop.", op,
                    ": dy must have fewer than 2^31 columns on CUDA, got ", n_cols);
  if (k > kMaxSelect) {
    // A stable descending sort ranks NaN first and keeps equal magnitudes in index order.
    const at::Tensor order = std::get<1>(at::sort(dy.abs(), /*stable=*/true, /*dim=*/1, /*descending=*/true));
    const at::Tensor idx = order.narrow(1, 0, k).contiguous();
    return {dy.gather(1, idx), idx};
  }
  at::Tensor vals = at::empty({n_rows, k}, dy.options());
  at::Tensor idx = at::empty({n_rows, k}, dy.options().dtype(at::kLong));
  if (n_rows == 0) return {vals, idx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "topk_rows_cuda", [&] {
    using K = typename KeyOf<acc_t<scalar_t>>::type;
    const int padded = padded_size(static_cast<int>(k));
    const size_t selection = selection_bytes<K>(padded);
    const size_t row_bytes = static_cast<size_t>(n_cols) * sizeof(scalar_t);
    const bool cache_row = selection + row_bytes <= kDynamicSmemBudget;
    const size_t smem = selection + (cache_row ? row_bytes : 0);
    topk_rows_kernel<scalar_t><<<grid_for(n_rows), threads_for(n_cols), smem, c10::cuda::getCurrentCUDAStream()>>>(
        dy.const_data_ptr<scalar_t>(), n_rows, static_cast<int>(n_cols), static_cast<int>(k), cache_row,
        vals.mutable_data_ptr<scalar_t>(), idx.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {vals, idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CUDA, m) { m.impl("topk_rows", &topk_rows_cuda); }

}  // namespace meprop::cuda
