// GPU hybrid Top-k ∪ Top-p selector and dense-under-rule plan writer.
//
// Two launches per selection, both stream-ordered and free of host synchronisation:
//   pool    q (B, Hq, Nq, D) -> qbar (B, Hq, nqb, D); k (B, Hkv, Nk, D) -> kbar_t (B, Hkv, D, nkb)
//           one thread per (block, 16-byte column chunk): the tokens of a block are summed in
//           ascending order, so every input byte is read once with 16-byte loads;
//   select  one CTA per (b, plan head, rows_per_cta query blocks): scores for those rows against
//           every kv block (pooled keys read once per CTA), softmax, rank (bitonic sort of
//           (key, index) pairs, one warp per row), Top-k ∪ Top-p, sinks and band, then the row is
//           written as the ascending full run followed by the ascending partial run.
// Every float operation follows the orders of docs/selectors.md with explicitly rounded
// intrinsics (__fadd_rn, __fmul_rn, __fdiv_rn, fmaf) so that nvcc cannot contract or reorder
// them: plans equal the CPU selector's except where expf rounds differently (documented).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "cuda/select/select_params.hpp"

namespace spattn::cuda::select {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kMaxDevices = 64;

// ---- pooling --------------------------------------------------------------------------------

template <class T> __device__ __forceinline__ float to_f32(T x);
template <> __device__ __forceinline__ float to_f32(float x) { return x; }
template <> __device__ __forceinline__ float to_f32(double x) { return __double2float_rn(x); }
template <> __device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

// VEC elements from p (16 bytes when VEC * sizeof(T) == 16, else element by element).
template <class T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, int64_t elem_stride, float (&out)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
    // Unpacked from the 32-bit words (no round trip through a local array of T).
    if constexpr (sizeof(T) == 2) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if constexpr (std::is_same_v<T, __nv_bfloat16>) {
          out[2 * i] = __uint_as_float(w[i] << 16);  // bf16 -> f32 is exact: the top half
          out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        } else {
          out[2 * i] = __half2float(__ushort_as_half(uint16_t(w[i] & 0xffffu)));
          out[2 * i + 1] = __half2float(__ushort_as_half(uint16_t(w[i] >> 16)));
        }
      }
    } else if constexpr (sizeof(T) == 4) {
#pragma unroll
      for (int i = 0; i < 4; ++i) out[i] = __uint_as_float(w[i]);
    } else {
      out[0] = __double2float_rn(__hiloint2double(int(w[1]), int(w[0])));
      out[1] = __double2float_rn(__hiloint2double(int(w[3]), int(w[2])));
    }
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) out[v] = to_f32(p[v * elem_stride]);
  }
}

// Thread (slice bh, block, chunk c) sums dims [c*VEC, c*VEC + VEC) over the block's tokens in
// ascending order, then divides once by the token count (tail blocks: their real tokens).
template <class T, int VEC>
__global__ void __launch_bounds__(256) pool_kernel(PoolArgs a) {
  const int chunks = a.dim / VEC;
  const int64_t gid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t total = int64_t(a.batch) * a.heads * a.blocks * chunks;
  if (gid >= total) return;
  const int c = int(gid % chunks);
  const int64_t blk = (gid / chunks) % a.blocks;
  const int64_t bh = gid / (int64_t(chunks) * a.blocks);
  const int64_t b = bh / a.heads, h = bh % a.heads;
  const int64_t n0 = blk * a.block;
  const int count = int(min(int64_t(a.block), a.len - n0));
  const T* base = static_cast<const T*>(a.src) + b * a.stride[0] + h * a.stride[1] +
                  n0 * a.stride[2] + int64_t(c) * VEC * a.stride[3];
  float sum[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) sum[v] = 0.0f;
  // Loads of U tokens are issued before their additions so that several 16-byte requests are
  // in flight per thread; the additions stay in token order.
  constexpr int U = 8;
  int t = 0;
  for (; t + U <= count; t += U) {
    float x[U][VEC];
#pragma unroll
    for (int u = 0; u < U; ++u) load_vec<T, VEC>(base + int64_t(t + u) * a.stride[2], a.stride[3], x[u]);
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int v = 0; v < VEC; ++v) sum[v] = __fadd_rn(sum[v], x[u][v]);
  }
  for (; t < count; ++t) {
    float x[VEC];
    load_vec<T, VEC>(base + int64_t(t) * a.stride[2], a.stride[3], x);
#pragma unroll
    for (int v = 0; v < VEC; ++v) sum[v] = __fadd_rn(sum[v], x[v]);
  }
  const float n = float(count);
  if (!a.transposed) {
    float* dst = a.dst + (bh * a.blocks + blk) * a.dim + c * VEC;
#pragma unroll
    for (int v = 0; v < VEC; ++v) dst[v] = __fdiv_rn(sum[v], n);
  } else {
    float* dst = a.dst + (bh * a.dim + int64_t(c) * VEC) * a.blocks + blk;
#pragma unroll
    for (int v = 0; v < VEC; ++v) dst[int64_t(v) * a.blocks] = __fdiv_rn(sum[v], n);
  }
}

template <class T>
cudaError_t launch_pool_typed(const PoolArgs& a, cudaStream_t stream) {
  constexpr int kVec = int(16 / sizeof(T));
  const int vec = a.vectorized ? kVec : 1;
  const int64_t threads = int64_t(a.batch) * a.heads * a.blocks * (a.dim / vec);
  if (threads == 0) return cudaSuccess;
  const unsigned grid = unsigned((threads + 255) / 256);
  if (a.vectorized)
    pool_kernel<T, kVec><<<grid, 256, 0, stream>>>(a);
  else
    pool_kernel<T, 1><<<grid, 256, 0, stream>>>(a);
  return cudaGetLastError();
}

// ---- tile classification (PlanGeometry::classify) ---------------------------------------------
// 0 empty, 1 partial, 2 full.
__device__ __forceinline__ int classify(int64_t qb, int64_t kb, int block_q, int block_k,
                                        int64_t q_len, int64_t k_len, int64_t lo, int64_t hi) {
  const int64_t q0 = qb * block_q, q1 = min(q_len, q0 + block_q);
  const int64_t k0 = kb * block_k, k1 = min(k_len, k0 + block_k);
  if (q0 >= q1 || k0 >= k1) return 0;
  const int64_t shift = k_len - q_len;
  const int64_t d_lo = k0 - (q1 - 1) - shift, d_hi = (k1 - 1) - q0 - shift;
  if (d_hi < lo || d_lo > hi) return 0;
  const bool cut = d_lo < lo || d_hi > hi || q1 - q0 < block_q || k1 - k0 < block_k;
  return cut ? 1 : 2;
}

// Writes one plan row from per-kv-block tile kinds (kind(kb): 0 = not listed, 1 partial,
// 2 full): the full run then the partial run, each ascending. One warp.
template <class Kind>
__device__ void write_row(Kind kind, int nkb, int32_t* index, int32_t* num_full,
                          int32_t* num_partial, int lane) {
  int nf = 0;
  for (int base = 0; base < nkb; base += 32) {
    const int kb = base + lane;
    const bool f = kb < nkb && kind(kb) == 2;
    const unsigned m = __ballot_sync(kFull, f);
    if (f) index[nf + __popc(m & ((1u << lane) - 1))] = kb;
    nf += __popc(m);
  }
  int np = 0;
  for (int base = 0; base < nkb; base += 32) {
    const int kb = base + lane;
    const bool p = kb < nkb && kind(kb) == 1;
    const unsigned m = __ballot_sync(kFull, p);
    if (p) index[nf + np + __popc(m & ((1u << lane) - 1))] = kb;
    np += __popc(m);
  }
  if (lane == 0) {
    *num_full = nf;
    *num_partial = np;
  }
}

// ---- selection ------------------------------------------------------------------------------

// Order-preserving map of a float to uint32 (+0 and -0 merged: they compare equal on the CPU).
__device__ __forceinline__ uint32_t ordered_bits(float f) {
  const uint32_t u = __float_as_uint(f == 0.0f ? 0.0f : f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float from_ordered_bits(uint32_t u) {
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}
// (key descending, index ascending) as one descending uint64; 0 = no block (sorts last).
__device__ __forceinline__ uint64_t rank_key(float key, int kb) {
  return (uint64_t(ordered_bits(key)) << 32) | uint64_t(0xffffffffu - uint32_t(kb));
}
__device__ __forceinline__ int rank_index(uint64_t k) { return int(0xffffffffu - uint32_t(k)); }
__device__ __forceinline__ float rank_value(uint64_t k) { return from_ordered_bits(uint32_t(k >> 32)); }

// Descending bitonic sort of n (a power of two) keys in shared memory by one warp.
__device__ void warp_bitonic_sort_desc(uint64_t* x, int n, int lane) {
  for (int k = 2; k <= n; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int t = lane; t < n / 2; t += 32) {
        const int i = 2 * j * (t / j) + (t % j);  // lower element of the pair, bit j clear
        const int p = i + j;
        const uint64_t a = x[i], b = x[p];
        const bool desc = (i & k) == 0;  // this run ends up descending
        if (desc ? a < b : a > b) {
          x[i] = b;
          x[p] = a;
        }
      }
      __syncwarp();
    }
  }
}

// Float32 sum of v over kb ascending, v = 0 where !valid (adding +0 changes no partial sum),
// computed identically by every lane of the warp: the values are exchanged by shuffles and
// each lane adds all of them in order.
template <class F>
__device__ float warp_ordered_sum(int nkb, int lane, F value) {
  float total = 0.0f;
  for (int base = 0; base < nkb; base += 32) {
    const float v = base + lane < nkb ? value(base + lane) : 0.0f;
    const int len = min(32, nkb - base);
    for (int j = 0; j < len; ++j) total = __fadd_rn(total, __shfl_sync(kFull, v, j));
  }
  return total;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// Shared memory per CTA (R = rows_per_cta):
//   keys  (R, npow2) uint64   ranking keys, then sorted
//   qs    (R, D)     float    pooled queries of the current query head
//   s     (R, nkb)   float    scores of the current head; later the row's tile kinds (int32)
//   acc   (R, nkb)   float    group modes: the combined probability row
__global__ void __launch_bounds__(kSelectThreads) select_kernel(const SelectArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int R = a.rows_per_cta, D = a.dim, nkb = a.nkb;
  uint64_t* keys = reinterpret_cast<uint64_t*>(smem);
  float* qs = reinterpret_cast<float*>(keys + size_t(R) * a.npow2);
  float* s = qs + size_t(R) * D;
  float* acc = s + size_t(R) * nkb;

  const int qb0 = blockIdx.x * R;
  const int h = blockIdx.y;  // plan head
  const int b = blockIdx.z;
  const int rows = min(R, a.nqb - qb0);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  constexpr int kWarps = kSelectThreads / 32;
  const bool grouped = a.gqa != 0;
  const int heads_here = grouped ? a.group : 1;
  const int hkv = grouped ? h : h / a.group;

  for (int g = 0; g < heads_here; ++g) {
    const int hq = grouped ? h * a.group + g : h;
    // Pooled queries of this head's rows.
    const float* qsrc = a.qbar + ((int64_t(b) * a.heads_q + hq) * a.nqb + qb0) * D;
    for (int i = tid; i < rows * D; i += kSelectThreads) qs[i] = qsrc[i];
    __syncthreads();

    // Scores: thread per kv block, R accumulators; acc = fma(q̄[d], k̄[d], acc) for d ascending
    // from 0, then × scale. kbar_t is (D, nkb), so a warp reads consecutive kv blocks.
    const float* kt = a.kbar_t + (int64_t(b) * a.heads_kv + hkv) * int64_t(D) * nkb;
    for (int kb = tid; kb < nkb; kb += kSelectThreads) {
      float sc[8];
#pragma unroll
      for (int r = 0; r < 8; ++r) sc[r] = 0.0f;
      // R == 8 with D % 4 == 0 (every shape attention runs): 16-byte reads of q̄. Rows past
      // `rows` (the last tile of query blocks) read unset q̄ and are never used.
      if (R == 8 && (D & 3) == 0) {
#pragma unroll 2
        for (int d = 0; d < D; d += 4) {
          const float k0 = kt[int64_t(d) * nkb + kb], k1 = kt[int64_t(d + 1) * nkb + kb];
          const float k2 = kt[int64_t(d + 2) * nkb + kb], k3 = kt[int64_t(d + 3) * nkb + kb];
#pragma unroll
          for (int r = 0; r < 8; ++r) {
            const float4 qv = *reinterpret_cast<const float4*>(qs + r * D + d);
            sc[r] = fmaf(qv.x, k0, sc[r]);
            sc[r] = fmaf(qv.y, k1, sc[r]);
            sc[r] = fmaf(qv.z, k2, sc[r]);
            sc[r] = fmaf(qv.w, k3, sc[r]);
          }
        }
#pragma unroll
        for (int r = 0; r < 8; ++r) s[r * nkb + kb] = __fmul_rn(sc[r], a.scale);
      } else {
        for (int r = 0; r < rows; ++r) {
          float x = 0.0f;
          for (int d = 0; d < D; ++d) x = fmaf(qs[r * D + d], kt[int64_t(d) * nkb + kb], x);
          s[r * nkb + kb] = __fmul_rn(x, a.scale);
        }
      }
    }
    __syncthreads();

    if (grouped) {
      // Per row: the head's softmax P = e / z (z summed in ascending block order), combined
      // into acc in ascending head order (sum, later / G; or fmaxf).
      for (int r = warp; r < rows; r += kWarps) {
        const int64_t qb = qb0 + r;
        float* sr = s + r * nkb;
        float* ar = acc + r * nkb;
        float m = -INFINITY;
        for (int kb = lane; kb < nkb; kb += 32)
          if (classify(qb, kb, a.block_q, a.block_k, a.q_len, a.k_len, a.d_lo, a.d_hi))
            m = fmaxf(m, sr[kb]);
        m = warp_max(m);
        const float z = warp_ordered_sum(nkb, lane, [&](int kb) {
          return classify(qb, kb, a.block_q, a.block_k, a.q_len, a.k_len, a.d_lo, a.d_hi)
                     ? expf(__fsub_rn(sr[kb], m))
                     : 0.0f;
        });
        for (int kb = lane; kb < nkb; kb += 32) {
          if (!classify(qb, kb, a.block_q, a.block_k, a.q_len, a.k_len, a.d_lo, a.d_hi)) continue;
          const float pr = __fdiv_rn(expf(__fsub_rn(sr[kb], m)), z);
          if (g == 0)
            ar[kb] = pr;  // mean: 0 + pr == pr; max: fmaxf(-inf, pr) == pr
          else
            ar[kb] = a.gqa == 1 ? __fadd_rn(ar[kb], pr) : fmaxf(ar[kb], pr);
        }
      }
      __syncthreads();  // qs and s are overwritten by the next head
    }
  }

  // Ranking and selection, one warp per row.
  for (int r = warp; r < rows; r += kWarps) {
    const int64_t qb = qb0 + r;
    float* sr = s + r * nkb;
    float* ar = acc + r * nkb;
    uint64_t* kr = keys + size_t(r) * a.npow2;
    int32_t* kind = reinterpret_cast<int32_t*>(sr);  // reuses the score row once keys are built

    // Keys of allowed blocks (score per head; combined probability per group), their count n
    // and the per-head softmax max m.
    int n_local = 0;
    float m = -INFINITY;
    for (int kb = lane; kb < a.npow2; kb += 32) {
      const bool ok = kb < nkb &&
                      classify(qb, kb, a.block_q, a.block_k, a.q_len, a.k_len, a.d_lo, a.d_hi);
      float key = 0.0f;
      if (ok) {
        if (grouped) {
          key = a.gqa == 1 ? __fdiv_rn(ar[kb], float(a.group)) : ar[kb];
          ar[kb] = key;
        } else {
          key = sr[kb];
        }
        m = fmaxf(m, key);
        ++n_local;
      }
      kr[kb] = ok ? rank_key(key, kb) : 0ull;
    }
    const int n = warp_sum(n_local);
    m = warp_max(m);
    __syncwarp();

    const int hopt = h;
    const double tk = a.num_top_k == 1 ? a.top_k[0] : a.top_k[hopt];
    const double tp = a.num_top_p == 1 ? a.top_p[0] : a.top_p[hopt];
    int count = 0;
    // k·n within 1e-9 of an integer counts as that integer (as on the CPU); explicit rounding
    // keeps nvcc from contracting the product and the difference into one fma.
    if (n > 0 && tk > 0.0) count = min(max(int(ceil(__dsub_rn(__dmul_rn(tk, double(n)), 1e-9))), 1), n);
    if (n > 0 && tp >= 1.0) count = n;
    const bool mass = n > 0 && tp > 0.0 && count < n;

    int kept = count;
    if (n > 0 && (count < n || mass)) {
      float threshold = 0.0f;
      if (mass) {
        // Top-p threshold: p × (sum of the weights over allowed blocks, ascending block order).
        const float total = warp_ordered_sum(nkb, lane, [&](int kb) {
          if (!classify(qb, kb, a.block_q, a.block_k, a.q_len, a.k_len, a.d_lo, a.d_hi))
            return 0.0f;
          return grouped ? ar[kb] : expf(__fsub_rn(sr[kb], m));
        });
        threshold = __fmul_rn(float(tp), total);
      }
      __syncwarp();
      warp_bitonic_sort_desc(kr, a.npow2, lane);
      if (mass) {
        // Prefix sums of the weights in ranked order; stop at the first prefix >= threshold.
        int cp = n;  // float rounding may leave the threshold unreached: keep every block
        float cum = 0.0f;
        bool reached = false;
        for (int base = 0; base < n && !reached; base += 32) {
          float w = 0.0f;
          if (base + lane < n) {
            const float key = rank_value(kr[base + lane]);
            w = grouped ? key : expf(__fsub_rn(key, m));
          }
          const int len = min(32, n - base);
          for (int j = 0; j < len; ++j) {
            cum = __fadd_rn(cum, __shfl_sync(kFull, w, j));
            if (cum >= threshold) {
              cp = base + j + 1;
              reached = true;
              break;
            }
          }
        }
        kept = max(count, cp);
      }
    }
    __syncwarp();

    // Tile kinds of the kept blocks: the ranked prefix, the sinks, the band; the rule filters.
    for (int kb = lane; kb < nkb; kb += 32) kind[kb] = 0;
    __syncwarp();
    if (kept == n) {
      for (int kb = lane; kb < nkb; kb += 32) kind[kb] = 1;  // every allowed block
    } else {
      for (int i = lane; i < kept; i += 32) kind[rank_index(kr[i])] = 1;
    }
    __syncwarp();
    const int64_t sinks = min(a.sink_blocks, int64_t(nkb));
    for (int kb = lane; kb < sinks; kb += 32) kind[kb] = 1;
    if (a.local_blocks >= 0) {
      // diagonal_band(geo, qb, local_blocks)
      const int64_t q0 = qb * a.block_q, q1 = min(a.q_len, q0 + a.block_q);
      const int64_t shift = a.k_len - a.q_len;
      const int64_t lo = max(q0 + shift, int64_t(0)), hi = min(q1 - 1 + shift, a.k_len - 1);
      if (q0 < q1 && lo <= hi) {
        const int64_t first = max(lo / a.block_k - a.local_blocks, int64_t(0));
        const int64_t last = min(hi / a.block_k + a.local_blocks, int64_t(nkb - 1));
        for (int64_t kb = first + lane; kb <= last; kb += 32) kind[kb] = 1;
      }
    }
    __syncwarp();
    for (int kb = lane; kb < nkb; kb += 32)
      if (kind[kb]) kind[kb] = classify(qb, kb, a.block_q, a.block_k, a.q_len, a.k_len, a.d_lo, a.d_hi);
    __syncwarp();
    const int64_t row = (int64_t(b) * a.plan_heads + h) * a.nqb + qb;
    write_row([kind](int kb) { return kind[kb]; }, nkb, a.kv_index + row * a.capacity,
              a.num_full + row, a.num_partial + row, lane);
  }
}

// One warp per row: every tile the rule leaves non-empty.
__global__ void __launch_bounds__(256) dense_kernel(const DenseArgs a) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * 8 + warp;
  if (row >= a.rows) return;
  const int64_t qb = row % a.nqb;
  write_row(
      [&](int kb) {
        return classify(qb, kb, a.block_q, a.block_k, a.q_len, a.k_len, a.d_lo, a.d_hi);
      },
      a.nkb, a.kv_index + row * a.capacity, a.num_full + row, a.num_partial + row, lane);
}

}  // namespace

cudaError_t launch_pool(const PoolArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case InDType::f32: return launch_pool_typed<float>(a, stream);
    case InDType::bf16: return launch_pool_typed<__nv_bfloat16>(a, stream);
    case InDType::f16: return launch_pool_typed<__half>(a, stream);
    case InDType::f64: return launch_pool_typed<double>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_select(const SelectArgs& a, size_t smem_bytes, cudaStream_t stream) {
  if (a.nqb == 0) return cudaSuccess;
  // Raised once per size (and device) seen, not on every call: the attribute is a host-side
  // setting, and repeating it would only cost time.
  static std::atomic<size_t> configured[kMaxDevices] = {};
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  if (smem_bytes > 48 * 1024 &&
      (device >= kMaxDevices || configured[device].load(std::memory_order_relaxed) < smem_bytes)) {
    e = cudaFuncSetAttribute(select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             int(smem_bytes));
    if (e != cudaSuccess) return e;
    if (device < kMaxDevices) configured[device].store(smem_bytes, std::memory_order_relaxed);
  }
  const dim3 grid(unsigned((a.nqb + a.rows_per_cta - 1) / a.rows_per_cta), unsigned(a.plan_heads),
                  unsigned(a.batch));
  select_kernel<<<grid, kSelectThreads, smem_bytes, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t launch_dense(const DenseArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  dense_kernel<<<unsigned((a.rows + 7) / 8), 256, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace spattn::cuda::select
