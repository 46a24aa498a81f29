// Scatter of compacted gradient rows into a dense (out_features, in) gradient on CUDA. A first kernel
// records, for each output row, which compacted row lands there (and asserts that idx holds each row
// at most once); a second writes every element exactly once, a copied row or zeros, in the widest
// unit (up to 16 bytes) that the row size and alignment allow.
#include <torch/library.h>

#include "common.cuh"

namespace meprop::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 4;
constexpr int64_t kStrip = kThreads * kItems;

// source[idx[i]] = i, for source pre-filled with -1.
__global__ void mark_rows_kernel(const int64_t* __restrict__ idx, int64_t k, int64_t out_features,
                                 int* __restrict__ source) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < k;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = idx[i];
    CUDA_KERNEL_ASSERT(j >= 0 && j < out_features && "meprop.scatter_rows: idx values must lie in [0, out_features)");
    const int previous = atomicCAS(source + j, -1, static_cast<int>(i));
    CUDA_KERNEL_ASSERT(previous == -1 && "meprop.scatter_rows: idx holds a value more than once");
  }
}

// dense[r] = rows[source[r]] or zeros, with each row seen as `units` elements of type U.
template <typename U>
__global__ void __launch_bounds__(kThreads)
    fill_rows_kernel(const U* __restrict__ rows, const int* __restrict__ source, int64_t out_features, int64_t units,
                     U* __restrict__ dense) {
  const int64_t n_strips = ceil_div(units, kStrip);
  for (int64_t tile = blockIdx.x; tile < out_features * n_strips; tile += gridDim.x) {
    const int64_t r = tile / n_strips, u0 = (tile % n_strips) * kStrip + threadIdx.x;
    const int s = source[r];
    U* out = dense + r * units;
    if (s >= 0) {
      const U* in = rows + static_cast<int64_t>(s) * units;
#pragma unroll
      for (int i = 0; i < kItems; ++i)
        if (u0 + i * kThreads < units) out[u0 + i * kThreads] = in[u0 + i * kThreads];
    } else {
      const U zero{};  // all-zero bytes are +0.0 in every float dtype
#pragma unroll
      for (int i = 0; i < kItems; ++i)
        if (u0 + i * kThreads < units) out[u0 + i * kThreads] = zero;
    }
  }
}

template <typename U>
void fill_rows(const at::Tensor& rows, const at::Tensor& source, at::Tensor& dense, cudaStream_t stream) {
  const int64_t out_features = dense.size(0);
  const int64_t units = dense.size(1) * dense.element_size() / static_cast<int64_t>(sizeof(U));
  fill_rows_kernel<U><<<grid_for(out_features * ceil_div(units, kStrip)), kThreads, 0, stream>>>(
      static_cast<const U*>(rows.const_data_ptr()), source.const_data_ptr<int>(), out_features, units,
      static_cast<U*>(dense.mutable_data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool fits_unit(const at::Tensor& rows, const at::Tensor& dense, size_t unit) {
  const size_t row_bytes = static_cast<size_t>(dense.size(1)) * dense.element_size();
  return row_bytes % unit == 0 && reinterpret_cast<uintptr_t>(rows.const_data_ptr()) % unit == 0 &&
         reinterpret_cast<uintptr_t>(dense.const_data_ptr()) % unit == 0;
}

at::Tensor scatter_rows_cuda(const at::Tensor& rows_in, const at::Tensor& idx_in, int64_t out_features) {
  constexpr const char* op = "scatter_rows";
  checks::scatter_rows(rows_in, idx_in, out_features);
  TORCH_CHECK_VALUE(out_features <= std::numeric_limits<int>::max(), "meprop.", op,
                    ": out_features must be < 2^31 on CUDA, got ", out_features);
  const c10::cuda::OptionalCUDAGuard guard(rows_in.device());
  const at::Tensor rows = rows_in.contiguous(), idx = idx_in.contiguous();
  const int64_t k = rows.size(0);
  at::Tensor dense = at::empty({out_features, rows.size(1)}, rows.options());
  if (dense.numel() == 0 && k == 0) return dense;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor source = at::empty({out_features}, idx.options().dtype(at::kInt));
  if (out_features > 0) C10_CUDA_CHECK(cudaMemsetAsync(source.mutable_data_ptr(), 0xff, source.nbytes(), stream));
  if (k > 0) {
    mark_rows_kernel<<<grid_for(ceil_div(k, kThreads)), kThreads, 0, stream>>>(idx.const_data_ptr<int64_t>(), k,
                                                                             out_features, source.mutable_data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (dense.numel() == 0) return dense;
  if (fits_unit(rows, dense, 16))
    fill_rows<uint4>(rows, source, dense, stream);
  else if (fits_unit(rows, dense, 8))
    fill_rows<uint2>(rows, source, dense, stream);
  else if (fits_unit(rows, dense, 4))
    fill_rows<uint32_t>(rows, source, dense, stream);
  else
    fill_rows<uint16_t>(rows, source, dense, stream);
  return dense;
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CUDA, m) { m.impl("scatter_rows", &scatter_rows_cuda); }

}  // namespace meprop::cuda
