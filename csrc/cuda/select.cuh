// Block-wide top-k selection, shared by topk_rows and topk_unified.
//
// Scores are mapped to unsigned keys whose integer order is meprop's selection order on magnitudes:
// the absolute value's bit pattern (monotonic for non-negative floats), with every NaN mapped to the
// all-ones pattern above +inf. A radix select over the keys (11-bit digits, most significant first)
// finds the k-th largest key T; the selected set is every key above T plus the lowest-indexed keys
// equal to T; a bitonic sort in shared memory then puts it in selection order (larger key first,
// ties by lower index).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace meprop::cuda {

// The largest k the block selection handles; larger k take a sort-based path.
constexpr int kMaxSelect = 2048;
constexpr int kRadixBits = 11;
constexpr int kRadixBins = 1 << kRadixBits;

template <typename A>
struct KeyOf {
  using type = uint32_t;
};
template <>
struct KeyOf<double> {
  using type = uint64_t;
};

// The order key of |v|: larger magnitude -> larger key, NaN above +inf, -0 == +0.
__device__ __forceinline__ uint32_t order_key(float v) {
  const uint32_t bits = __float_as_uint(v) & 0x7fffffffu;
  return bits > 0x7f800000u ? 0x7fffffffu : bits;
}
__device__ __forceinline__ uint64_t order_key(double v) {
  const uint64_t bits = static_cast<uint64_t>(__double_as_longlong(v)) & 0x7fffffffffffffffull;
  return bits > 0x7ff0000000000000ull ? 0x7fffffffffffffffull : bits;
}

// Shared-memory state of one block's selection.
struct SelectShared {
  int hist[kRadixBins];
  int warp_counts[32];
  int digit;
  int k_rem;
  int eq_total;
  int count;
};

// The smallest power of two >= k (k >= 1).
__host__ __device__ inline int padded_size(int k) {
  int p = 1;
  while (p < k) p <<= 1;
  return p;
}

// Byte size of the sorted-selection buffers (keys then int32 indices) for `padded` entries, rounded up
// to 16 so that whatever the caller places after them stays aligned.
template <typename K>
__host__ __device__ inline size_t selection_bytes(int padded) {
  const size_t bytes = static_cast<size_t>(padded) * (sizeof(K) + sizeof(int));
  return (bytes + 15) / 16 * 16;
}

template <typename K>
__device__ __forceinline__ bool ranks_before(K ka, int ia, K kb, int ib) {
  return ka > kb || (ka == kb && ia < ib);
}

// Selects the k (1 <= k <= n) best of the n keys key_at(0..n-1) and leaves them in selection order in
// sel_key[0..k) / sel_idx[0..k) (shared memory of `padded` = padded_size(k) entries). Every thread of
// the block must call it; blockDim.x must be a multiple of 32.
template <typename K, typename KeyAt>
__device__ void block_select(const KeyAt& key_at, int n, int k, SelectShared& sh, K* sel_key, int* sel_idx,
                             int padded) {
  constexpr int kKeyBits = static_cast<int>(sizeof(K)) * 8;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n_warps = blockDim.x >> 5;

  // 1. Radix select: after the pass over bits [shift, hi), `prefix` holds the top bits of T.
  K prefix = 0;
  int k_rem = k, eq_total = 0;
  for (int hi = kKeyBits; hi > 0;) {
    const int shift = hi > kRadixBits ? hi - kRadixBits : 0;
    const K high_mask = hi == kKeyBits ? K(0) : (~K(0) << hi);
    for (int i = tid; i < kRadixBins; i += blockDim.x) sh.hist[i] = 0;
    __syncthreads();
    for (int c = tid; c < n; c += blockDim.x) {
      const K key = key_at(c);
      if ((key & high_mask) == prefix) atomicAdd(&sh.hist[static_cast<int>((key >> shift) & (kRadixBins - 1))], 1);
    }
    __syncthreads();
    if (warp == 0) {
      // Lane l owns the digits [top - per, top), lane 0 the highest; the rotated reads avoid bank conflicts.
      constexpr int per = kRadixBins / 32;
      const int top = kRadixBins - per * lane;
      int own = 0;
      for (int i = 0; i < per; ++i) own += sh.hist[top - per + ((i + lane) & (per - 1))];
      int incl = own;
      for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
      }
      const int excl = incl - own;
      if (excl < k_rem && k_rem <= incl) {
        int above = excl;
        for (int d = top - 1; d >= top - per; --d) {
          const int h = sh.hist[d];
          if (above + h >= k_rem) {
            sh.digit = d;
            sh.k_rem = k_rem - above;
            sh.eq_total = h;
            break;
          }
          above += h;
        }
      }
    }
    __syncthreads();
    prefix |= static_cast<K>(sh.digit) << shift;
    k_rem = sh.k_rem;
    eq_total = sh.eq_total;
    hi = shift;
  }
  const K threshold = prefix;

  // 2. Collect every key above the threshold and the k_rem lowest-indexed keys equal to it.
  if (tid == 0) sh.count = 0;
  __syncthreads();
  if (eq_total == k_rem) {
    for (int c = tid; c < n; c += blockDim.x) {
      const K key = key_at(c);
      if (key >= threshold) {
        const int slot = atomicAdd(&sh.count, 1);
        sel_key[slot] = key;
        sel_idx[slot] = c;
      }
    }
  } else {
    // Ties at the threshold: rank the equal keys in index order, one block-wide chunk at a time.
    int eq_before_chunk = 0;
    for (int base = 0; base < n; base += blockDim.x) {
      const int c = base + tid;
      const K key = c < n ? key_at(c) : K(0);
      const bool above = c < n && key > threshold;
      const bool equal = c < n && key == threshold;
      const unsigned ballot = __ballot_sync(0xffffffffu, equal);
      if (lane == 0) sh.warp_counts[warp] = __popc(ballot);
      __syncthreads();
      int rank = eq_before_chunk + __popc(ballot & ((1u << lane) - 1u)), chunk_total = 0;
      for (int w = 0; w < n_warps; ++w) {
        const int cw = sh.warp_counts[w];
        if (w < warp) rank += cw;
        chunk_total += cw;
      }
      if (above || (equal && rank < k_rem)) {
        const int slot = atomicAdd(&sh.count, 1);
        sel_key[slot] = key;
        sel_idx[slot] = c;
      }
      eq_before_chunk += chunk_total;
      __syncthreads();
    }
  }
  __syncthreads();

  // 3. Bitonic sort of the padded selection into selection order (padding ranks last).
  for (int i = k + tid; i < padded; i += blockDim.x) {
    sel_key[i] = K(0);
    sel_idx[i] = 0x7fffffff;
  }
  __syncthreads();
  for (int size = 2; size <= padded; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = tid; i < (padded >> 1); i += blockDim.x) {
        const int lo = 2 * i - (i & (stride - 1)), hi = lo + stride;
        const bool best_first = (lo & size) == 0;
        const K kl = sel_key[lo], kh = sel_key[hi];
        const int il = sel_idx[lo], ih = sel_idx[hi];
        if (ranks_before(kh, ih, kl, il) == best_first) {
          sel_key[lo] = kh;
          sel_key[hi] = kl;
          sel_idx[lo] = ih;
          sel_idx[hi] = il;
        }
      }
      __syncthreads();
    }
  }
}

}  // namespace meprop::cuda
