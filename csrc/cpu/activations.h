// Vectorised sigmoid and tanh for float (GCC/Clang vector extensions, Simd<float>::vec): exp by range reduction
// to [-ln2/2, ln2/2] and a degree-6 polynomial (Cephes' expf coefficients, ~1 ulp), the power of two built in
// the exponent bits. Absolute error of sigmoid and tanh below 1e-7. Scalar twins for tails and other types.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "simd.h"

namespace meprop::cpu {

using fvec = vec_t<float>;
typedef int32_t ivec __attribute__((vector_size(sizeof(fvec))));

inline fvec splat(float v) {
  fvec out;
  for (int i = 0; i < Simd<float>::kLanes; ++i) out[i] = v;
  return out;
}

// exp(x), x clamped to [-87.3, 88] (results in [FLT_MIN, 1.7e38]: never inf, never denormal).
inline fvec exp_vec(fvec x) {
  const fvec hi = splat(88.0f), lo = splat(-87.3f);
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const fvec magic = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const fvec n = (x * splat(1.44269504088896341f) + magic) - magic;
  fvec r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);  // ln 2 in two parts, so r is exact
  fvec p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
  fvec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline fvec sigmoid_vec(fvec x) { return splat(1.0f) / (splat(1.0f) + exp_vec(-x)); }

// tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|) <= 1.
inline fvec tanh_vec(fvec x) {
  const fvec ax = x < splat(0.0f) ? -x : x;
  const fvec e = exp_vec(splat(-2.0f) * ax);
  const fvec t = (splat(1.0f) - e) / (splat(1.0f) + e);
  return x < splat(0.0f) ? -t : t;
}

template <typename acc>
inline acc sigmoid_scalar(acc x) {
  return acc(1) / (acc(1) + std::exp(-x));
}

}  // namespace meprop::cpu
