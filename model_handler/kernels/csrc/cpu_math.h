// Scalar helpers shared by the CPU kernels, written as plain loops that gcc/clang vectorize at -O3 (built with
// -fno-trapping-math and -fno-math-errno, see cpu_native.py, so compares and float-int casts vectorize too).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace sagemaker_llm_cpu {

inline void to_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  // bf16 is the high half of an fp32: a shift, which vectorizes (c10's conversion does not always).
  const auto* s = reinterpret_cast<const uint16_t*>(src);
  auto* d = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}

inline void to_float(const c10::Half* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// Round fp32 to the storage type, to nearest even as torch does (NaN stays NaN).
inline void from_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void from_float(const float* src, c10::BFloat16* dst, int64_t n) {
  auto* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, src + i, sizeof(bits));
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    d[i] = static_cast<uint16_t>((bits & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
  }
}

inline void from_float(const float* src, c10::Half* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

// x = float(T(x)): the rounding torch applies between two ops on T tensors (none for fp32).
template <typename T>
inline void round_to(float* x, T* scratch, int64_t n) {
  from_float(x, scratch, n);
  to_float(scratch, x, n);
}

template <>
inline void round_to<float>(float*, float*, int64_t) {}

// exp(x) for x <= 0: 2^(x log2 e) split into an integer power (the exponent bits) and a degree-6 polynomial
// on [-0.5, 0.5]; relative error ~2e-7.
inline float exp_nonpositive1(float x) {
  const float v = std::max(x * 1.44269504088896341f, -126.f);
  const float k = static_cast<float>(static_cast<int32_t>(v - 0.5f));  // v <= 0: nearest integer, as a cast
  const float f = v - k;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float power;
  std::memcpy(&power, &bits, sizeof(power));
  return p * power;
}

inline void exp_nonpositive(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = exp_nonpositive1(x[i]);
}

// x = cap * tanh(x / cap) in place: attention-logit soft-capping (Gemma 2). tanh of a = |x| / cap as Cephes' tanhf:
// an odd polynomial below 0.625, (1 - e) / (1 + e) with e = exp(-2a) above (relative error ~2e-7 either way); no
// calls, so the loop vectorizes.
inline void softcap(float* x, int64_t n, float cap) {
  const float inv = 1.f / cap;
  for (int64_t i = 0; i < n; ++i) {
    // Both forms computed (the polynomial's argument clamped, so both stay finite) and blended by a 0/1 factor: GCC
    // vectorizes that, not a select between them.
    const float a = std::fabs(x[i]) * inv, b = std::min(a, 0.625f), z = b * b;
    const float poly =
        (((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z + 1.33314422036e-1f) * z -
        3.33332819422e-1f;
    const float small = b + b * z * poly;
    const float e = exp_nonpositive1(-2.f * a);
    const float large = (1.f - e) / (1.f + e);
    const float m = a < 0.625f ? 1.f : 0.f;
    x[i] = std::copysign(cap * (m * small + (1.f - m) * large), x[i]);
  }
}

}  // namespace sagemaker_llm_cpu
