// Tile-level building blocks of the CPU backend: small matrix products on row-major tiles that
// live in per-thread buffers, a vector exp2, and conversions between storage dtypes and the
// accumulation type.
//
// Every product is written as C (m, n) = or += A (m, k) · B (k, n), all row-major, because that
// form needs only a broadcast of A and contiguous loads of B: callers transpose K, V, Q or dO
// into a packed buffer when the math wants a transposed operand. Packing costs O(tile) while the
// product costs O(tile · k), so it is never the bottleneck.
//
// Paths: AVX-512F (the main one: 6 rows × 64 columns of accumulators per step), AVX-512 BF16
// (vdpbf16ps on pairs of bf16, for the bf16 forward and backward), and portable loops that the compiler
// vectorises for other machines and for float64.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "spattn/dtype.hpp"

namespace spattn::cpu::kernel {

// ---------------------------------------------------------------------------------------------
// Products

// The accumulator arrays of the micro-kernels must live in registers. GCC replaces an array by
// scalars only when the loops over it are unrolled early; without this it keeps a stack copy and
// stores all 24 accumulators on every k step, which measured 2.5-5x slower (6-13 vs 32-37
// GFLOP/s per core on a 128x64x64 tile).
#define SPATTN_UNROLL _Pragma("GCC unroll 8")

// Portable product, also the float64 path.
template <class T>
inline void gemm_portable(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
                          int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < m; ++i) {
    T* crow = c + i * ldc;
    if (!accumulate)
      for (int64_t j = 0; j < n; ++j) crow[j] = T(0);
    for (int64_t kk = 0; kk < k; ++kk) {
      const T aik = a[i * lda + kk];
      const T* brow = b + kk * ldb;
      for (int64_t j = 0; j < n; ++j) crow[j] += aik * brow[j];
    }
  }
}

#if defined(__AVX512F__)

inline __mmask16 tail_mask(int64_t lanes) {
  return lanes >= 16 ? __mmask16(0xffff) : __mmask16((1u << lanes) - 1u);
}

// MR rows × NV vectors of 16 columns; the last vector is masked by `last`.
template <int MR, int NV>
inline void micro_f32(int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                      float* c, int64_t ldc, __mmask16 last, bool accumulate) {
  __m512 acc[MR][NV];
  SPATTN_UNROLL for (int i = 0; i < MR; ++i)
    SPATTN_UNROLL for (int v = 0; v < NV; ++v)
      acc[i][v] = accumulate ? _mm512_maskz_loadu_ps(v == NV - 1 ? last : __mmask16(0xffff),
                                                     c + i * ldc + 16 * v)
                             : _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    __m512 bv[NV];
    SPATTN_UNROLL for (int v = 0; v < NV; ++v)
      bv[v] = _mm512_maskz_loadu_ps(v == NV - 1 ? last : __mmask16(0xffff), b + kk * ldb + 16 * v);
    SPATTN_UNROLL for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * lda + kk]);
      SPATTN_UNROLL for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
    }
  }
  SPATTN_UNROLL for (int i = 0; i < MR; ++i)
    SPATTN_UNROLL for (int v = 0; v < NV; ++v)
      _mm512_mask_storeu_ps(c + i * ldc + 16 * v, v == NV - 1 ? last : __mmask16(0xffff),
                            acc[i][v]);
}

template <int MR>
inline void micro_f32_cols(int nv, int64_t k, const float* a, int64_t lda, const float* b,
                           int64_t ldb, float* c, int64_t ldc, __mmask16 last, bool accumulate) {
  switch (nv) {
    case 1: micro_f32<MR, 1>(k, a, lda, b, ldb, c, ldc, last, accumulate); break;
    case 2: micro_f32<MR, 2>(k, a, lda, b, ldb, c, ldc, last, accumulate); break;
    case 3: micro_f32<MR, 3>(k, a, lda, b, ldb, c, ldc, last, accumulate); break;
    default: micro_f32<MR, 4>(k, a, lda, b, ldb, c, ldc, last, accumulate); break;
  }
}

inline void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                 int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  constexpr int kRows = 6;  // 6 × 4 accumulators + 4 B vectors fill 28 of the 32 zmm registers
  for (int64_t j0 = 0; j0 < n; j0 += 64) {
    const int64_t cols = std::min<int64_t>(64, n - j0);
    const int nv = int((cols + 15) / 16);
    const __mmask16 last = tail_mask(cols - 16 * (nv - 1));
    int64_t i0 = 0;
    for (; i0 + kRows <= m; i0 += kRows)
      micro_f32_cols<kRows>(nv, k, a + i0 * lda, lda, b + j0, ldb, c + i0 * ldc + j0, ldc, last,
                            accumulate);
    const float* ar = a + i0 * lda;
    float* cr = c + i0 * ldc + j0;
    switch (m - i0) {
      case 5: micro_f32_cols<5>(nv, k, ar, lda, b + j0, ldb, cr, ldc, last, accumulate); break;
      case 4: micro_f32_cols<4>(nv, k, ar, lda, b + j0, ldb, cr, ldc, last, accumulate); break;
      case 3: micro_f32_cols<3>(nv, k, ar, lda, b + j0, ldb, cr, ldc, last, accumulate); break;
      case 2: micro_f32_cols<2>(nv, k, ar, lda, b + j0, ldb, cr, ldc, last, accumulate); break;
      case 1: micro_f32_cols<1>(nv, k, ar, lda, b + j0, ldb, cr, ldc, last, accumulate); break;
      default: break;
    }
  }
}

#else

inline void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                 int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  gemm_portable(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

#endif

inline void gemm(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b,
                 int64_t ldb, double* c, int64_t ldc, bool accumulate) {
  gemm_portable(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

// bf16 product with float32 accumulation: A holds pairs of bf16 along k as uint32 (m, k2),
// B holds pairs interleaved per column (k2, n, 2) as uint32 (k2, n). Products of two bf16 are
// exact in float32, so only the accumulation rounds, as in the float32 path.
#if defined(__AVX512BF16__)
inline constexpr bool kHaveBf16Dot = true;

template <int MR, int NV>
inline void micro_bf16(int64_t k2, const uint32_t* a, int64_t lda, const uint32_t* b,
                       int64_t ldb, float* c, int64_t ldc, __mmask16 last, bool accumulate) {
  __m512 acc[MR][NV];
  SPATTN_UNROLL for (int i = 0; i < MR; ++i)
    SPATTN_UNROLL for (int v = 0; v < NV; ++v)
      acc[i][v] = accumulate ? _mm512_maskz_loadu_ps(v == NV - 1 ? last : __mmask16(0xffff),
                                                     c + i * ldc + 16 * v)
                             : _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k2; ++kk) {
    __m512bh bv[NV];
    SPATTN_UNROLL for (int v = 0; v < NV; ++v)
      bv[v] = (__m512bh)_mm512_maskz_loadu_epi32(v == NV - 1 ? last : __mmask16(0xffff),
                                                  b + kk * ldb + 16 * v);
    SPATTN_UNROLL for (int i = 0; i < MR; ++i) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(int(a[i * lda + kk]));
      SPATTN_UNROLL for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], av, bv[v]);
    }
  }
  SPATTN_UNROLL for (int i = 0; i < MR; ++i)
    SPATTN_UNROLL for (int v = 0; v < NV; ++v)
      _mm512_mask_storeu_ps(c + i * ldc + 16 * v, v == NV - 1 ? last : __mmask16(0xffff),
                            acc[i][v]);
}

template <int MR>
inline void micro_bf16_cols(int nv, int64_t k2, const uint32_t* a, int64_t lda,
                            const uint32_t* b, int64_t ldb, float* c, int64_t ldc,
                            __mmask16 last, bool accumulate) {
  switch (nv) {
    case 1: micro_bf16<MR, 1>(k2, a, lda, b, ldb, c, ldc, last, accumulate); break;
    case 2: micro_bf16<MR, 2>(k2, a, lda, b, ldb, c, ldc, last, accumulate); break;
    case 3: micro_bf16<MR, 3>(k2, a, lda, b, ldb, c, ldc, last, accumulate); break;
    default: micro_bf16<MR, 4>(k2, a, lda, b, ldb, c, ldc, last, accumulate); break;
  }
}

inline void gemm_bf16(int64_t m, int64_t n, int64_t k2, const uint32_t* a, int64_t lda,
                      const uint32_t* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  constexpr int kRows = 6;
  for (int64_t j0 = 0; j0 < n; j0 += 64) {
    const int64_t cols = std::min<int64_t>(64, n - j0);
    const int nv = int((cols + 15) / 16);
    const __mmask16 last = tail_mask(cols - 16 * (nv - 1));
    int64_t i0 = 0;
    for (; i0 + kRows <= m; i0 += kRows)
      micro_bf16_cols<kRows>(nv, k2, a + i0 * lda, lda, b + j0, ldb, c + i0 * ldc + j0, ldc,
                             last, accumulate);
    const uint32_t* ar = a + i0 * lda;
    float* cr = c + i0 * ldc + j0;
    switch (m - i0) {
      case 5: micro_bf16_cols<5>(nv, k2, ar, lda, b + j0, ldb, cr, ldc, last, accumulate); break;
      case 4: micro_bf16_cols<4>(nv, k2, ar, lda, b + j0, ldb, cr, ldc, last, accumulate); break;
      case 3: micro_bf16_cols<3>(nv, k2, ar, lda, b + j0, ldb, cr, ldc, last, accumulate); break;
      case 2: micro_bf16_cols<2>(nv, k2, ar, lda, b + j0, ldb, cr, ldc, last, accumulate); break;
      case 1: micro_bf16_cols<1>(nv, k2, ar, lda, b + j0, ldb, cr, ldc, last, accumulate); break;
      default: break;
    }
  }
}

// dst (ceil(n / 2)) ← a float row of n rounded to bf16 (to nearest even) as pairs along the row,
// the A operand of a product over that row (P or dS times a row-pair-packed tile); a zero pads
// odd n.
inline void round_pairs_bf16(const float* src, int64_t n, uint32_t* dst) {
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + j + 16), _mm512_loadu_ps(src + j));
    _mm512_storeu_si512(dst + j / 2, (__m512i)h);
  }
  for (; j < n; j += 2) {
    const uint32_t lo = to_bfloat16(src[j]).bits;
    const uint32_t hi = j + 1 < n ? to_bfloat16(src[j + 1]).bits : 0u;
    dst[j / 2] = lo | (hi << 16);
  }
}
#else
inline constexpr bool kHaveBf16Dot = false;
#endif

// ---------------------------------------------------------------------------------------------
// exp2 over a row: x[j] = 2^(x[j] * mul - sub), returns the sum. -inf inputs give exactly 0.

#if defined(__AVX512F__)
// Horizontal sum / max by butterflies; GCC 12's _mm512_reduce_* trip -Wmaybe-uninitialized.
inline float hsum(__m512 x) {
  x = _mm512_add_ps(x, _mm512_shuffle_f32x4(x, x, _MM_SHUFFLE(1, 0, 3, 2)));
  x = _mm512_add_ps(x, _mm512_shuffle_f32x4(x, x, _MM_SHUFFLE(2, 3, 0, 1)));
  x = _mm512_add_ps(x, _mm512_permute_ps(x, _MM_SHUFFLE(1, 0, 3, 2)));
  x = _mm512_add_ps(x, _mm512_permute_ps(x, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm512_cvtss_f32(x);
}

inline float hmax(__m512 x) {
  x = _mm512_max_ps(x, _mm512_shuffle_f32x4(x, x, _MM_SHUFFLE(1, 0, 3, 2)));
  x = _mm512_max_ps(x, _mm512_shuffle_f32x4(x, x, _MM_SHUFFLE(2, 3, 0, 1)));
  x = _mm512_max_ps(x, _mm512_permute_ps(x, _MM_SHUFFLE(1, 0, 3, 2)));
  x = _mm512_max_ps(x, _mm512_permute_ps(x, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm512_cvtss_f32(x);
}

inline __m512 exp2_ps(__m512 t) {
  // Below -200 the result is 0 even after scaling a mantissa of up to sqrt(2); clamping also
  // turns -inf (masked scores) into an exact 0 instead of a NaN from -inf - round(-inf).
  t = _mm512_max_ps(t, _mm512_set1_ps(-200.0f));
  t = _mm512_min_ps(t, _mm512_set1_ps(128.0f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);  // [-0.5, 0.5]
  // Taylor series of 2^f to degree 7: truncation error < 1e-8 relative on [-0.5, 0.5].
  __m512 p = _mm512_set1_ps(1.5252734e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline float exp2_row(float* x, int64_t n, float mul, float sub) {
  const __m512 vm = _mm512_set1_ps(mul), vs = _mm512_set1_ps(sub);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + j);
    const __m512 e = exp2_ps(_mm512_fmsub_ps(v, vm, vs));
    _mm512_mask_storeu_ps(x + j, m, e);
    sum = _mm512_mask_add_ps(sum, m, sum, e);
  }
  return hsum(sum);
}

// x[j] = 2^(x[j] * mul - sub[j]): the backward's transposed tiles subtract a per-query lse.
inline void exp2_row_sub(float* x, int64_t n, float mul, const float* sub) {
  const __m512 vm = _mm512_set1_ps(mul);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + j);
    _mm512_mask_storeu_ps(x + j, m,
                          exp2_ps(_mm512_fmsub_ps(v, vm, _mm512_maskz_loadu_ps(m, sub + j))));
  }
}

inline float max_row(const float* x, int64_t n) {
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += 16)
    mx = _mm512_mask_max_ps(mx, tail_mask(n - j), mx, _mm512_maskz_loadu_ps(tail_mask(n - j), x + j));
  return hmax(mx);
}
#endif

// Scalar row operations: float64 always, and float32 where AVX-512 is not available (the
// non-template float overloads above take precedence when it is).
template <class T>
inline T exp2_row(T* x, int64_t n, T mul, T sub) {
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp2(x[j] * mul - sub);
    sum += x[j];
  }
  return sum;
}

template <class T>
inline void exp2_row_sub(T* x, int64_t n, T mul, const T* sub) {
  for (int64_t j = 0; j < n; ++j) x[j] = std::exp2(x[j] * mul - sub[j]);
}

template <class T>
inline T max_row(const T* x, int64_t n) {
  T mx = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, x[j]);
  return mx;
}

// ---------------------------------------------------------------------------------------------
// Conversions between a storage dtype S and the accumulation type A, over contiguous runs.

template <class S, class A>
inline void load_row(const S* src, A* dst, int64_t n) {
  if constexpr (std::is_same_v<S, A>) {
    std::memcpy(dst, src, size_t(n) * sizeof(A));
  } else if constexpr (std::is_same_v<S, bfloat16> && std::is_same_v<A, float>) {
    int64_t j = 0;
#if defined(__AVX512F__)
    for (; j + 16 <= n; j += 16) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j));
      _mm512_storeu_ps(dst + j,
                       _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    }
#endif
    for (; j < n; ++j) dst[j] = to_float(src[j]);
  } else if constexpr (std::is_same_v<S, float16> && std::is_same_v<A, float>) {
    int64_t j = 0;
#if defined(__AVX512F__)
    for (; j + 16 <= n; j += 16)
      _mm512_storeu_ps(dst + j, _mm512_cvtph_ps(_mm256_loadu_si256(
                                    reinterpret_cast<const __m256i*>(src + j))));
#endif
    for (; j < n; ++j) dst[j] = to_float(src[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = A(load_as_float(src[j]));
  }
}

// Scaled store: dst[j] = src[j] * mul, rounded to S.
template <class S, class A>
inline void store_row(const A* src, S* dst, int64_t n, A mul) {
  if constexpr (std::is_same_v<S, A>) {
    for (int64_t j = 0; j < n; ++j) dst[j] = src[j] * mul;
  } else if constexpr (std::is_same_v<S, float16> || std::is_same_v<S, bfloat16>) {
    // Scalar rounding keeps one well-tested conversion (dtype.hpp); outputs are O(N·D).
    for (int64_t j = 0; j < n; ++j) dst[j] = store_from_float<S>(float(src[j] * mul));
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = S(src[j] * mul);
  }
}

}  // namespace spattn::cpu::kernel
