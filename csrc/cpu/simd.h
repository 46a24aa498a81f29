// Fixed-width SIMD vectors (GCC/Clang vector extensions: AVX2 registers under -march=native on x86-64,
// narrower instructions elsewhere) for the accumulation types, and the packing of matrix strips into
// contiguous panels that the kernels compute from.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace meprop::cpu {

template <typename acc>
struct Simd;
template <>
struct Simd<float> {
  typedef float vec __attribute__((vector_size(32)));
  static constexpr int kLanes = 8;
};
template <>
struct Simd<double> {
  typedef double vec __attribute__((vector_size(32)));
  static constexpr int kLanes = 4;
};
template <typename acc>
using vec_t = typename Simd<acc>::vec;

template <typename acc>
inline vec_t<acc> load_vec(const acc* p) {
  vec_t<acc> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Stores a vector to 32-byte aligned p without bringing its cache line in (a non-temporal store where the
// target has one); store_fence() orders such stores before the writes that follow.
template <typename acc>
inline void stream_vec(acc* p, const vec_t<acc>& v) {
#if defined(__AVX__)
  if constexpr (std::is_same_v<acc, float>)
    _mm256_stream_ps(p, reinterpret_cast<__m256>(v));
  else
    _mm256_stream_pd(p, reinterpret_cast<__m256d>(v));
#else
  std::memcpy(p, &v, sizeof(v));
#endif
}

inline void store_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// Whether an output of `rows` rows with leading dimension `ld` (at `data`, of type T) goes to memory with
// stream_vec: acc-typed, large enough to leave the caches anyway, and every vector-aligned column of every
// row 32-byte aligned.
template <typename acc, typename T>
inline bool stream_output(const T* data, int64_t rows, int64_t ld) {
  return std::is_same_v<T, acc> && reinterpret_cast<uintptr_t>(data) % 32 == 0 && ld % Simd<acc>::kLanes == 0 &&
         rows * ld * int64_t(sizeof(T)) >= (int64_t{4} << 20);
}

// Stores the first `count` lanes of a row of vectors as values of type T.
template <typename acc, int V, typename T>
inline void store_row(T* p, const vec_t<acc> (&t)[V], int64_t count) {
  constexpr int L = Simd<acc>::kLanes;
  if (std::is_same_v<T, acc> && count == V * L) {
    std::memcpy(p, t, sizeof(t));
    return;
  }
  acc tmp[V * L];
  std::memcpy(tmp, t, sizeof(t));
  for (int64_t c = 0; c < count; ++c) p[c] = static_cast<T>(tmp[c]);
}

// Loads the first `count` lanes of a row of vectors (the rest zero).
template <typename acc, int V>
inline void load_row(const acc* p, vec_t<acc> (&t)[V], int64_t count) {
  acc tmp[V * Simd<acc>::kLanes] = {};
  std::memcpy(tmp, p, count * sizeof(acc));
  std::memcpy(t, tmp, sizeof(t));
}

// Packs columns [c, c + width) of `rows` rows of src (leading dimension ld) into `strips` contiguous
// strips of rows x strip_width accumulation-type values each, zero-padded on the right. Reading
// matrices with a power-of-two row stride in narrow strips maps every row to the same cache sets; a
// packed panel does not, and it converts half/bfloat16 to the accumulation type once.
template <typename acc, typename T>
inline void pack_strips(const T* src, int64_t ld, int64_t rows, int64_t c, int64_t width, int64_t strip_width,
                        int64_t strips, acc* panel) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * ld + c;
    for (int64_t p = 0; p < strips; ++p) {
      acc* d = panel + (p * rows + r) * strip_width;
      const int64_t lo = p * strip_width, n = std::clamp<int64_t>(width - lo, 0, strip_width);
      for (int64_t i = 0; i < n; ++i) d[i] = static_cast<acc>(s[lo + i]);
      std::fill(d + n, d + strip_width, acc(0));
    }
  }
}

}  // namespace meprop::cpu
