// Element types and the scalar conversions between them.
//
// bfloat16 and float16 are stored as raw 16-bit patterns so the public headers need
// no compiler extension; conversions round to nearest even, like the hardware does.
#pragma once

#include <cstdint>
#include <cstring>

namespace spattn {

enum class DType : uint8_t { float32, bfloat16, float16, float64 };

constexpr int dtype_size(DType t) {
  switch (t) {
    case DType::float32: return 4;
    case DType::bfloat16: return 2;
    case DType::float16: return 2;
    case DType::float64: return 8;
  }
  return 0;
}

constexpr const char* dtype_name(DType t) {
  switch (t) {
    case DType::float32: return "float32";
    case DType::bfloat16: return "bfloat16";
    case DType::float16: return "float16";
    case DType::float64: return "float64";
  }
  return "unknown";
}

struct bfloat16 {
  uint16_t bits;
};
struct float16 {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float to_float(bfloat16 h) { return bits_to_float(uint32_t(h.bits) << 16); }

inline bfloat16 to_bfloat16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return {uint16_t(u >> 16)};
}

inline float to_float(float16 h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu;
  const uint32_t mantissa = h.bits & 0x3ffu;
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    // Subnormal (or zero): value = mantissa * 2^-24.
    const float magnitude = float(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline float16 to_float16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return {uint16_t(sign | 0x7e00u)};        // NaN
  if (abs >= 0x477ff000u) return {uint16_t(sign | 0x7c00u)};       // rounds to inf
  if (abs < 0x38800000u) {                                         // subnormal or zero
    // Scale so the subnormal step (2^-24) becomes 1, then round to nearest even.
    const float scaled = bits_to_float(abs) * 16777216.0f;
    uint32_t m = uint32_t(scaled);
    const float rest = scaled - float(m);
    if (rest > 0.5f || (rest == 0.5f && (m & 1u))) ++m;
    return {uint16_t(sign | m)};
  }
  uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);
  return {uint16_t(sign | ((rounded - (112u << 23)) >> 13))};
}

// Generic load/store used by reference code and conversions; kernels use vector paths.
template <class T> inline float load_as_float(const T& x) { return float(x); }
template <> inline float load_as_float(const bfloat16& x) { return to_float(x); }
template <> inline float load_as_float(const float16& x) { return to_float(x); }

template <class T> inline T store_from_float(float f) { return T(f); }
template <> inline bfloat16 store_from_float<bfloat16>(float f) { return to_bfloat16(f); }
template <> inline float16 store_from_float<float16>(float f) { return to_float16(f); }

}  // namespace spattn
