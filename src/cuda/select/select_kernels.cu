// GPU hybrid Top-k ∪ Top-p selector and dense-under-rule plan writer.
//
// Two launches per selection, both stream-ordered and free of host synchronisation:
//   pool    q (B, Hq, Nq, D) -> qbar (B, Hq, nqb, D) and k (B, Hkv, Nk, D) -> kbar_t (B, Hkv, D, nkb)
//           in one launch: a CTA pools one block at a time, staging up to 32 KiB of it (tokens x
//           dims) in shared memory with asynchronous 16-byte copies, then thread d sums column d
//           over the staged tokens in ascending order;
//   select  one CTA per (b, plan head, rows_per_cta query blocks): scores for those rows against
//           the kv blocks the rule allows them (pooled keys read once per CTA), softmax, then
//           per row (one warp), over the row's allowed interval only: a search on the ordered
//           key bits (two bits per pass) finds a small candidate set {key >= v} that holds the
//           Top-k blocks and (with a rounding margin) the Top-p mass, only the candidates are
//           sorted (in registers up to 64), the Top-p prefix is summed in ranked order, and the
//           row is written as the ascending full run followed by the ascending partial run.
// Every float operation that decides a plan follows the orders of docs/selectors.md with
// explicitly rounded intrinsics (__fadd_rn, __fmul_rn, __fdiv_rn, fmaf) so that nvcc cannot
// contract or reorder them: plans equal the CPU selector's except where expf rounds differently
// (documented).
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

// Copies tokens [0, nt) x dims [0, D) of `base` (16-byte aligned rows, unit dim stride) into
// stage (nt, D) as they are, with asynchronous 16-byte copies: no registers hold the data, so
// every thread issues all of its copies (16 for a 128-token bf16 block of D = 128) back to back
// and the CTA keeps the whole stretch of the block in flight.
template <class T>
__device__ __forceinline__ void stage_raw(const T* base, int64_t token_stride, int nt, int D,
                                          unsigned char* stage) {
  constexpr int kVec = int(16 / sizeof(T));
  const int chunks = D / kVec, total = nt * chunks;
  for (int e = threadIdx.x; e < total; e += kPoolThreads) {
    const int t = e / chunks, c = e - t * chunks;
    const T* src = base + t * token_stride + c * kVec;
    // Chunk (t, c) lands at byte 16 e = (t D + c kVec) sizeof(T): the (nt, D) layout.
    const uint32_t dst = uint32_t(__cvta_generic_to_shared(stage + size_t(e) * 16));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
  }
  asm volatile("cp.async.commit_group;\n" ::: "memory");
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

// Converts tokens [0, nt) x dims [0, D) of `base` (any strides) into stage (nt, D) float32. Each
// thread first issues kLoads independent loads, then converts and stores them.
template <class T>
__device__ __forceinline__ void stage_converted(const T* base, int64_t token_stride,
                                                int64_t elem_stride, int nt, int D, float* stage) {
  constexpr int kLoads = 8;
  const int total = nt * D;
  for (int e0 = 0; e0 < total; e0 += kLoads * kPoolThreads) {
    T raw[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int e = e0 + u * kPoolThreads + int(threadIdx.x);
      if (e < total) {
        const int t = e / D, d = e - t * D;
        raw[u] = base[t * token_stride + d * elem_stride];
      }
    }
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int e = e0 + u * kPoolThreads + int(threadIdx.x);
      if (e < total) stage[e] = to_f32(raw[u]);
    }
  }
}

// sum[j] += column (threadIdx.x + j kPoolThreads) of stage (nt, D), tokens in ascending order.
template <class U>
__device__ __forceinline__ void add_columns(const U* stage, int nt, int D, float (&sum)[2]) {
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int d = int(threadIdx.x) + j * kPoolThreads;
    if (d < D) {
      float acc = sum[j];
#pragma unroll 8
      for (int t = 0; t < nt; ++t) acc = __fadd_rn(acc, to_f32(stage[t * D + d]));
      sum[j] = acc;
    }
  }
}

template <class T>
__device__ __forceinline__ void sum_block(const PoolArgs& a, const void* block_base, int count,
                                          unsigned char* stage, float (&sum)[2]) {
  const T* base = static_cast<const T*>(block_base);
  const int D = a.dim;
  const int per_stage = max(1, kPoolStageBytes / (D * int(a.vectorized ? sizeof(T) : 4)));
  for (int t0 = 0; t0 < count; t0 += per_stage) {
    const int nt = min(per_stage, count - t0);
    const T* p = base + int64_t(t0) * a.stride[2];
    if (a.vectorized) {
      stage_raw<T>(p, a.stride[2], nt, D, stage);
      __syncthreads();
      add_columns(reinterpret_cast<const T*>(stage), nt, D, sum);
    } else {
      stage_converted<T>(p, a.stride[2], a.stride[3], nt, D, reinterpret_cast<float*>(stage));
      __syncthreads();
      add_columns(reinterpret_cast<const float*>(stage), nt, D, sum);
    }
    __syncthreads();  // the next stage overwrites the buffer
  }
}

// Block `item` (slice-major) of one input: per dim, the float32 sum of the block's tokens in
// ascending order (inputs converted to float32 first), then one division by the token count
// (tail blocks: their real tokens). Called by every thread of the CTA (it synchronises).
__device__ __forceinline__ void pool_block(const PoolArgs& a, int64_t item, unsigned char* stage) {
  static_assert(2 * kPoolThreads >= 256, "a thread owns at most two dims (D <= 256)");
  const int64_t blk = item % a.blocks, bh = item / a.blocks;
  const int64_t b = bh / a.heads, h = bh % a.heads;
  const int64_t n0 = blk * a.block;
  const int count = int(min(int64_t(a.block), a.len - n0));
  const int D = a.dim, tid = threadIdx.x;
  const int64_t es = a.dtype == InDType::f64 ? 8 : a.dtype == InDType::f32 ? 4 : 2;
  const void* base = static_cast<const char*>(a.src) +
                     (b * a.stride[0] + h * a.stride[1] + n0 * a.stride[2]) * es;
  float sum[2] = {0.0f, 0.0f};
  switch (a.dtype) {
    case InDType::f32: sum_block<float>(a, base, count, stage, sum); break;
    case InDType::bf16: sum_block<__nv_bfloat16>(a, base, count, stage, sum); break;
    case InDType::f16: sum_block<__half>(a, base, count, stage, sum); break;
    case InDType::f64: sum_block<double>(a, base, count, stage, sum); break;
  }
  const float n = float(count);
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int d = tid + j * kPoolThreads;
    if (d >= D) continue;
    const float mean = __fdiv_rn(sum[j], n);
    if (!a.transposed)
      a.dst[(bh * a.blocks + blk) * D + d] = mean;
    else
      a.dst[(bh * D + d) * a.blocks + blk] = mean;
  }
}

// Blocks of q first (they are the larger ones when block_q > block_k), then blocks of k.
__global__ void __launch_bounds__(kPoolThreads) pool_kernel(const PoolArgs q, const PoolArgs k) {
  __shared__ __align__(16) unsigned char stage[kPoolStageBytes];
  const int64_t q_items = int64_t(q.batch) * q.heads * q.blocks;
  const int64_t items = q_items + int64_t(k.batch) * k.heads * k.blocks;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    if (item < q_items)
      pool_block(q, item, stage);
    else
      pool_block(k, item - q_items, stage);
  }
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

// Writes one plan row from n entries in ascending block order, entry i being block id(i) with
// tile kind kind(i) (0 = not listed, 1 partial, 2 full): the full run then the partial run,
// each ascending. One warp.
template <class Kind, class Id>
__device__ void write_row(Kind kind, int n, int32_t* index, int32_t* num_full,
                          int32_t* num_partial, int lane, Id id) {
  int nf = 0;
  for (int base = 0; base < n; base += 32) {
    const int i = base + lane;
    const bool f = i < n && kind(i) == 2;
    const unsigned m = __ballot_sync(kFull, f);
    if (f) index[nf + __popc(m & ((1u << lane) - 1))] = id(i);
    nf += __popc(m);
  }
  int np = 0;
  for (int base = 0; base < n; base += 32) {
    const int i = base + lane;
    const bool p = i < n && kind(i) == 1;
    const unsigned m = __ballot_sync(kFull, p);
    if (p) index[nf + np + __popc(m & ((1u << lane) - 1))] = id(i);
    np += __popc(m);
  }
  if (lane == 0) {
    *num_full = nf;
    *num_partial = np;
  }
}

// ---- selection ------------------------------------------------------------------------------

// Order-preserving map of a float to uint32 (+0 and -0 merged: they compare equal on the CPU).
// Every non-NaN float maps to a value >= 0x007fffff, so 0 is free to mark "not allowed".
__device__ __forceinline__ uint32_t ordered_bits(float f) {
  const uint32_t u = __float_as_uint(f == 0.0f ? 0.0f : f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float from_ordered_bits(uint32_t u) {
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}
// (key descending, index ascending) as one descending uint64; 0 = no block (sorts last).
__device__ __forceinline__ uint64_t rank_key(uint32_t key_bits, int kb) {
  return (uint64_t(key_bits) << 32) | uint64_t(0xffffffffu - uint32_t(kb));
}
__device__ __forceinline__ int rank_index(uint64_t k) { return int(0xffffffffu - uint32_t(k)); }
__device__ __forceinline__ float rank_value(uint64_t k) { return from_ordered_bits(uint32_t(k >> 32)); }

// Descending bitonic sort of n (a power of two) keys in shared memory by one warp.
__device__ __forceinline__ void warp_bitonic_sort_desc(uint64_t* x, int n, int lane) {
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

// Float32 sum of x[0, len) in ascending order (len a multiple of 8, x 16-byte aligned), computed
// identically by every lane: the reads are broadcasts and independent of the running sum, so
// the next eight values are loaded before the current eight are added and the dependent chain
// of additions never waits for shared memory.
__device__ __forceinline__ float ordered_sum(const float* x, int len) {
  const float4* x4 = reinterpret_cast<const float4*>(x);
  const int n4 = len / 4;
  float total = 0.0f;
  if (n4 == 0) return total;
  float4 a = x4[0], b = x4[1];
  for (int i = 0; i < n4; i += 2) {
    const int next = i + 2 < n4 ? i + 2 : i;  // the last step reloads its own values
    const float4 na = x4[next], nb = x4[next + 1];
    total = __fadd_rn(total, a.x);
    total = __fadd_rn(total, a.y);
    total = __fadd_rn(total, a.z);
    total = __fadd_rn(total, a.w);
    total = __fadd_rn(total, b.x);
    total = __fadd_rn(total, b.y);
    total = __fadd_rn(total, b.z);
    total = __fadd_rn(total, b.w);
    a = na;
    b = nb;
  }
  return total;
}

// Length of the shortest prefix of w[0, len) whose float32 sum (ascending order) is >= threshold,
// or -1 when the whole range stays below it. Identical in every lane.
__device__ __forceinline__ int ranked_prefix(const float* w, int len, float threshold) {
  float cum = 0.0f;
  for (int base = 0; base < len; base += 8) {
    float x[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) x[u] = base + u < len ? w[base + u] : 0.0f;
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      if (base + u < len) {
        cum = __fadd_rn(cum, x[u]);
        if (cum >= threshold) return base + u + 1;
      }
    }
  }
  return -1;
}

// Butterfly reduction over the warp: every lane ends with op over all 32 values.
template <class V, class Op>
__device__ __forceinline__ V warp_reduce(V v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  return warp_reduce(v, [](float a, float b) { return fmaxf(a, b); });
}
__device__ __forceinline__ int warp_sum(int v) {
  return warp_reduce(v, [](int a, int b) { return a + b; });
}
__device__ __forceinline__ uint32_t warp_min(uint32_t v) {
  return warp_reduce(v, [](uint32_t a, uint32_t b) { return min(a, b); });
}
__device__ __forceinline__ uint32_t warp_max(uint32_t v) {
  return warp_reduce(v, [](uint32_t a, uint32_t b) { return max(a, b); });
}

// For three thresholds c[0..2] at once: the number of blocks with key bits >= c[i] and (when
// `mass`) their weight sum, in any order: only used to choose the candidate set, never to decide
// the plan. bits and w have len entries (a multiple of 4, 16-byte aligned); entries outside the
// allowed interval hold bits 0 and weight 0. One pass settles two bits of the search, and the
// five warp reductions are independent, so they overlap instead of adding up.
__device__ __forceinline__ void count_above3(const uint32_t* bits, const float* w, int len,
                                             const uint32_t (&c)[3], bool mass, int lane,
                                             int (&count)[3], float (&weight)[3]) {
  const uint4* b4 = reinterpret_cast<const uint4*>(bits);
  const float4* w4 = reinterpret_cast<const float4*>(w);
  int n01 = 0, n2 = 0;  // counts 0 and 1 packed in 16-bit halves (a row has <= 8192 blocks)
  float s[3] = {0.0f, 0.0f, 0.0f};
  for (int i = lane; i < len / 4; i += 32) {
    const uint4 k = b4[i];
    const uint32_t kk[4] = {k.x, k.y, k.z, k.w};
    float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (mass) {
      const float4 x4 = w4[i];
      x[0] = x4.x;
      x[1] = x4.y;
      x[2] = x4.z;
      x[3] = x4.w;
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      n01 += int(kk[u] >= c[0]) + (int(kk[u] >= c[1]) << 16);
      n2 += int(kk[u] >= c[2]);
      if (mass) {
#pragma unroll
        for (int t = 0; t < 3; ++t) s[t] += kk[u] >= c[t] ? x[u] : 0.0f;
      }
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    n01 += __shfl_xor_sync(kFull, n01, o);
    n2 += __shfl_xor_sync(kFull, n2, o);
    if (mass) {
#pragma unroll
      for (int t = 0; t < 3; ++t) s[t] += __shfl_xor_sync(kFull, s[t], o);
    }
  }
  count[0] = n01 & 0xffff;
  count[1] = n01 >> 16;
  count[2] = n2;
#pragma unroll
  for (int t = 0; t < 3; ++t) weight[t] = mass ? s[t] : 0.0f;
}

// Smallest kb in [0, n) with pred(kb), or n when none; pred must be monotone (false, then true).
// A 32-way search on the warp: each round probes 32 evenly spaced blocks, so 1024 blocks take
// two rounds of one test per lane instead of a test of every block. Identical in every lane.
template <class Pred>
__device__ __forceinline__ int warp_first_true(Pred pred, int n, int lane) {
  int lo = 0, hi = n;  // the answer lies in [lo, hi]
  while (lo < hi) {
    const int step = (hi - lo + 31) / 32;
    const int t = lo + lane * step;
    const unsigned m = __ballot_sync(kFull, t >= hi || pred(t));
    if (m == 0) {
      lo += 31 * step + 1;  // 32 steps cover [lo, hi): the answer is past the last probe
    } else {
      const int f = __ffs(m) - 1;
      hi = min(hi, lo + f * step);
      if (f > 0) lo += (f - 1) * step + 1;
    }
  }
  return lo;
}

// Descending bitonic sort of up to 64 keys held in registers, x[0] at lane i is element i and
// x[1] element 32 + i: shuffles instead of shared memory round trips and warp barriers.
template <int kPerLane>
__device__ __forceinline__ void warp_register_sort_desc(uint64_t (&x)[2], int lane) {
  constexpr int n = 32 * kPerLane;
#pragma unroll
  for (int k = 2; k <= n; k <<= 1) {
#pragma unroll
    for (int j = k >> 1; j > 0; j >>= 1) {
      if (j == 32) {  // pairs (i, i + 32) sit in one lane; k == 64, so the run is descending
        const uint64_t a = x[0], b = x[1];
        x[0] = a > b ? a : b;
        x[1] = a > b ? b : a;
        continue;
      }
#pragma unroll
      for (int u = 0; u < kPerLane; ++u) {
        const uint64_t y = __shfl_xor_sync(kFull, x[u], j);
        const bool lower = (lane & j) == 0;                 // this element is i of the pair (i, i + j)
        const bool desc = ((lane + 32 * u) & k) == 0;       // its run ends up descending
        const bool take_max = lower == desc;
        x[u] = take_max ? (x[u] > y ? x[u] : y) : (x[u] < y ? x[u] : y);
      }
    }
  }
}

// The candidate set {key >= v} must hold the whole Top-p prefix; it is chosen with weight sums
// taken in another order than the ranked one, so it must carry at least this much more mass
// than the threshold. Both sums are within n * 2^-24 (relative) of the exact mass, n <= 8192,
// so 2^-7 leaves a wide margin; a miss is still caught and redone over every allowed block.
constexpr float kMassMargin = 1.0f + 1.0f / 128.0f;
// The bisection stops once the candidate set is this small (or twice the Top-k count).
constexpr int kSmallCandidates = 64;

// Shared memory per CTA (R = rows_per_cta, P = npad):
//   s     (R, P)     float    scores of the current head; then the row's key bits (uint32, 0 =
//                             forbidden); at the end its tile kinds (int32)
//   wt    (R, P)     float    per head: softmax weights e = expf(s - m); later ranked weights
//   acc   (R, P)     float    group modes only: the combined probability row (its weights)
//   cand  (R, npow2) uint64   candidate (key, index) pairs, sorted
//   qs    (R, D)     float    pooled queries of the current query head
__global__ void __launch_bounds__(kSelectThreads, 3) select_kernel(const SelectArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int R = a.rows_per_cta, D = a.dim, nkb = a.nkb, P = a.npad;
  const bool grouped = a.gqa != 0;
  float* s = reinterpret_cast<float*>(smem);
  float* wt = s + size_t(R) * P;
  float* acc = wt + size_t(R) * P;
  uint64_t* cand = reinterpret_cast<uint64_t*>(acc + (grouped ? size_t(R) * P : 0));
  float* qs = reinterpret_cast<float*>(cand + size_t(R) * a.npow2);

  const int qb0 = blockIdx.x * R;
  const int h = blockIdx.y;  // plan head
  const int b = blockIdx.z;
  const int rows = min(R, a.nqb - qb0);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  constexpr int kWarps = kSelectThreads / 32;
  const int heads_here = grouped ? a.group : 1;
  const int hkv = grouped ? h : h / a.group;
  // The allowed kv blocks of a query block form one interval [first, last] (empty when
  // first > last): for a real tile (q0 < q1, k0 < k1) classify is non-zero iff d_hi >= lo and
  // d_lo <= hi, and both offsets only grow with kb, so each end is where a monotone test turns.
  // Both ends only grow with qb, so the rows of this CTA together allow [first(qb0),
  // last(last row)].
  const int64_t shift = a.k_len - a.q_len;
  auto allowed_range = [&](int64_t qb) {
    const int64_t q0 = qb * a.block_q, q1 = min(a.q_len, q0 + a.block_q);
    const int first = warp_first_true(
        [&](int kb) {
          const int64_t k1 = min(a.k_len, int64_t(kb) * a.block_k + a.block_k);
          return (k1 - 1) - q0 - shift >= a.d_lo;
        },
        nkb, lane);
    const int past = warp_first_true(
        [&](int kb) { return int64_t(kb) * a.block_k - (q1 - 1) - shift > a.d_hi; }, nkb, lane);
    return make_int2(first, past - 1);
  };
  // Row loops run over whole 32-block chunks around the interval (entries outside it hold key
  // bits 0 and weight 0), never over the forbidden rest of the row.
  auto chunk_bounds = [](int2 range) {
    return range.x > range.y ? make_int2(0, 0) : make_int2(range.x & ~31, (range.y + 32) & ~31);
  };
  const int kb_begin = allowed_range(qb0).x;
  const int kb_end = allowed_range(qb0 + rows - 1).y + 1;  // scores only where a row needs one

  for (int g = 0; g < heads_here; ++g) {
    const int hq = grouped ? h * a.group + g : h;
    // Pooled queries of this head's rows.
    const float* qsrc = a.qbar + ((int64_t(b) * a.heads_q + hq) * a.nqb + qb0) * D;
    for (int i = tid; i < rows * D; i += kSelectThreads) qs[i] = qsrc[i];
    __syncthreads();

    // Scores: acc = fma(q̄[d], k̄[d], acc) for d ascending from 0, then × scale. kbar_t is
    // (D, nkb), so a warp reads consecutive kv blocks.
    const float* kt = a.kbar_t + (int64_t(b) * a.heads_kv + hkv) * int64_t(D) * nkb;
    if (R == 8 && (D & 3) == 0) {
      // Every shape attention runs: a thread owns two kv blocks and eight rows, q̄ comes as
      // 16-byte broadcasts. Rows past `rows` (the last tile of query blocks) read unset q̄
      // and are never used.
      for (int kb0 = kb_begin + tid; kb0 < kb_end; kb0 += 2 * kSelectThreads) {
        const int kb1 = kb0 + kSelectThreads;
        const bool second = kb1 < kb_end;
        const int kb1_read = second ? kb1 : kb0;  // loads stay in bounds
        float sc0[8], sc1[8];
#pragma unroll
        for (int r = 0; r < 8; ++r) sc0[r] = sc1[r] = 0.0f;
        // The pooled keys of step d + 4 are loaded before the FMAs of step d, so their L2
        // latency overlaps arithmetic instead of stalling every step.
        float k0[4], k1[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          k0[i] = kt[int64_t(i) * nkb + kb0];
          k1[i] = kt[int64_t(i) * nkb + kb1_read];
        }
        for (int d = 0; d < D; d += 4) {
          const int dn = d + 4 < D ? d + 4 : d;  // the last step reloads its own (unused) keys
          float n0[4], n1[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            n0[i] = kt[int64_t(dn + i) * nkb + kb0];
            n1[i] = kt[int64_t(dn + i) * nkb + kb1_read];
          }
#pragma unroll
          for (int r = 0; r < 8; ++r) {
            const float4 qv = *reinterpret_cast<const float4*>(qs + r * D + d);
            sc0[r] = fmaf(qv.x, k0[0], sc0[r]);
            sc0[r] = fmaf(qv.y, k0[1], sc0[r]);
            sc0[r] = fmaf(qv.z, k0[2], sc0[r]);
            sc0[r] = fmaf(qv.w, k0[3], sc0[r]);
            sc1[r] = fmaf(qv.x, k1[0], sc1[r]);
            sc1[r] = fmaf(qv.y, k1[1], sc1[r]);
            sc1[r] = fmaf(qv.z, k1[2], sc1[r]);
            sc1[r] = fmaf(qv.w, k1[3], sc1[r]);
          }
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            k0[i] = n0[i];
            k1[i] = n1[i];
          }
        }
#pragma unroll
        for (int r = 0; r < 8; ++r) {
          s[r * P + kb0] = __fmul_rn(sc0[r], a.scale);
          if (second) s[r * P + kb1] = __fmul_rn(sc1[r], a.scale);
        }
      }
    } else {
      for (int kb = kb_begin + tid; kb < kb_end; kb += kSelectThreads)
        for (int r = 0; r < rows; ++r) {
          float x = 0.0f;
          for (int d = 0; d < D; ++d) x = fmaf(qs[r * D + d], kt[int64_t(d) * nkb + kb], x);
          s[r * P + kb] = __fmul_rn(x, a.scale);
        }
    }
    __syncthreads();

    if (grouped) {
      // Per row: the head's softmax P = e / z (z summed in ascending block order), combined
      // into acc in ascending head order (sum, later / G; or fmaxf).
      for (int r = warp; r < rows; r += kWarps) {
        const int64_t qb = qb0 + r;
        const float* sr = s + r * P;
        float* er = wt + r * P;
        float* ar = acc + r * P;
        const int2 range = allowed_range(qb);
        const int2 cb = chunk_bounds(range);
        auto allowed = [range](int kb) { return kb >= range.x && kb <= range.y; };
        float m = -INFINITY;
        for (int kb = cb.x + lane; kb < cb.y; kb += 32)
          if (allowed(kb)) m = fmaxf(m, sr[kb]);
        m = warp_max(m);
        for (int kb = cb.x + lane; kb < cb.y; kb += 32)
          er[kb] = allowed(kb) ? expf(__fsub_rn(sr[kb], m)) : 0.0f;
        __syncwarp();
        // Forbidden blocks add +0 (no partial sum changes), so the sum skips the rest of the row.
        const float z = ordered_sum(er + cb.x, cb.y - cb.x);
        for (int kb = cb.x + lane; kb < cb.y; kb += 32) {
          if (!allowed(kb)) continue;
          const float pr = __fdiv_rn(er[kb], z);
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
    float* sr = s + r * P;
    uint32_t* bits = reinterpret_cast<uint32_t*>(sr);  // replaces the scores in place
    float* w = grouped ? acc + r * P : wt + r * P;
    uint64_t* cr = cand + size_t(r) * a.npow2;
    const int2 range = allowed_range(qb);
    const int2 cb = chunk_bounds(range);
    const int clen = cb.y - cb.x;
    auto allowed = [range](int kb) { return kb >= range.x && kb <= range.y; };

    // Per head the key is the score and the weight e = expf(s - m); per group both are the
    // combined probability. Key bits, weights, the count n of allowed blocks and the key range.
    float m = -INFINITY;
    if (!grouped) {
      for (int kb = cb.x + lane; kb < cb.y; kb += 32)
        if (allowed(kb)) m = fmaxf(m, sr[kb]);
      m = warp_max(m);
    }
    int n_local = 0;
    uint32_t kmin = 0xffffffffu, kmax = 0;
    for (int kb = cb.x + lane; kb < cb.y; kb += 32) {
      const bool ok = allowed(kb);
      float key = 0.0f, weight = 0.0f;
      if (ok) {
        if (grouped) {
          key = a.gqa == 1 ? __fdiv_rn(w[kb], float(a.group)) : w[kb];
          weight = key;
        } else {
          key = sr[kb];
          weight = expf(__fsub_rn(key, m));
        }
      }
      const uint32_t kbits = ok ? ordered_bits(key) : 0u;
      w[kb] = weight;
      bits[kb] = kbits;
      if (ok) {
        ++n_local;
        kmin = min(kmin, kbits);
        kmax = max(kmax, kbits);
      }
    }
    const uint32_t lane_max = kmax;  // 0 when the lane holds no allowed block
    const int n = warp_sum(n_local);
    kmin = warp_min(kmin);
    kmax = warp_max(kmax);
    __syncwarp();

    const double tk = a.num_top_k == 1 ? a.top_k[0] : a.top_k[h];
    const double tp = a.num_top_p == 1 ? a.top_p[0] : a.top_p[h];
    int count = 0;
    // k·n within 1e-9 of an integer counts as that integer (as on the CPU); explicit rounding
    // keeps nvcc from contracting the product and the difference into one fma.
    if (n > 0 && tk > 0.0) count = min(max(int(ceil(__dsub_rn(__dmul_rn(tk, double(n)), 1e-9))), 1), n);
    if (n > 0 && tp >= 1.0) count = n;
    const bool mass = n > 0 && tp > 0.0 && count < n;
    // The plan row is the first `kept` blocks of the ranking: max(Top-k count, Top-p count).
    int kept = count;

    if (n > 0 && count < n && (mass || count > 0)) {
      float threshold = 0.0f, threshold_margin = 0.0f;
      if (mass) {
        // Top-p threshold: p × (sum of the weights over allowed blocks, ascending block order).
        threshold = __fmul_rn(float(tp), ordered_sum(w + cb.x, clen));
        threshold_margin = __fmul_rn(threshold, kMassMargin);
      }
      // Candidates {key bits >= v}: a prefix of the ranking (equal keys enter together). v is
      // raised only while the set still holds `need` blocks and (Top-p) the threshold's mass
      // with margin, and stops once the set is small.
      const int need = max(count, mass ? 1 : 0);
      const int enough = max(kSmallCandidates, 2 * need);
      uint32_t v = 0;
      int cand_count = n;
      // A threshold c keeps the conditions when every allowed block reaches it (the set is
      // unchanged) or when its set still holds the blocks and the mass.
      auto keeps = [&](uint32_t c, int cnt, float weight) {
        return c <= kmin || (cnt >= need && (!mass || weight >= threshold_margin));
      };
      if (need <= 32 && cand_count > enough) {
        // First guess: the need-th largest of the lanes' maxima, found on 32 values by ballots.
        // At least `need` blocks reach it; on peaked rows usually few more, so one pass over
        // the row often settles the candidates.
        uint32_t x = 0;
        for (int bit = 31; bit >= 0; --bit) {
          const uint32_t c = x | (1u << bit);
          if (__popc(__ballot_sync(kFull, lane_max >= c)) >= need) x = c;
        }
        if (x > kmin) {
          const uint32_t c3[3] = {x, x, x};
          int cnt[3];
          float weight[3];
          count_above3(bits + cb.x, w + cb.x, clen, c3, mass, lane, cnt, weight);
          if (keeps(x, cnt[0], weight[0])) {
            v = x;
            cand_count = cnt[0];
          }
        }
      }
      // Then two bits at a time from the top, three thresholds per pass: the same v as trying
      // the higher bit and then the lower one. Any v that keeps the conditions is correct, a
      // larger one only leaves fewer candidates to sort.
      for (int bit = 31; bit >= 0 && cand_count > enough; bit -= 2) {
        const uint32_t hi_bit = 1u << bit, lo_bit = bit > 0 ? 1u << (bit - 1) : 0u;
        // c[0] = both bits, c[1] = the higher, c[2] = the lower.
        const uint32_t c[3] = {v | hi_bit | lo_bit, v | hi_bit, v | lo_bit};
        if (c[0] == v) continue;                // v already has both bits
        if (min(c[1], c[2]) > kmax) continue;   // no block reaches any of them: too few
        int cnt[3] = {n, n, n};
        float weight[3] = {0.0f, 0.0f, 0.0f};
        if (c[0] > kmin) count_above3(bits + cb.x, w + cb.x, clen, c, mass, lane, cnt, weight);
        if (keeps(c[1], cnt[1], weight[1])) {
          const bool both = keeps(c[0], cnt[0], weight[0]);
          v = both ? c[0] : c[1];
          cand_count = both ? cnt[0] : cnt[1];
        } else if (keeps(c[2], cnt[2], weight[2])) {
          v = c[2];
          cand_count = cnt[2];
        }
      }

      kept = -1;
      for (int attempt = 0; attempt < 2 && kept < 0; ++attempt) {
        // Gather the candidates as ranking keys and sort them descending: up to 64 in
        // registers, more padded to a power of two in shared memory.
        const uint32_t v_min = max(v, 1u);  // 0 marks forbidden blocks
        int c = 0;
        for (int base = cb.x; base < cb.y; base += 32) {
          const uint32_t kbits = bits[base + lane];
          const bool in = kbits >= v_min;
          const unsigned ballot = __ballot_sync(kFull, in);
          if (in) cr[c + __popc(ballot & ((1u << lane) - 1))] = rank_key(kbits, base + lane);
          c += __popc(ballot);
        }
        __syncwarp();
        if (c <= 64) {
          uint64_t x[2] = {lane < c ? cr[lane] : 0ull, lane + 32 < c ? cr[lane + 32] : 0ull};
          __syncwarp();
          // Only the c ranked entries are stored: the buffer may be shorter than 64.
          if (c <= 32)
            warp_register_sort_desc<1>(x, lane);
          else
            warp_register_sort_desc<2>(x, lane);
          if (lane < c) cr[lane] = x[0];
          if (lane + 32 < c) cr[lane + 32] = x[1];
          __syncwarp();
        } else {
          int width = 2;
          while (width < c) width <<= 1;
          for (int i = c + lane; i < width; i += 32) cr[i] = 0ull;
          __syncwarp();
          warp_bitonic_sort_desc(cr, width, lane);
        }
        if (!mass) {
          kept = count;  // c >= count: the bisection kept at least `need` blocks
          break;
        }
        // Ranked weights (recomputed from the keys: the same expf of the same operands), then
        // the prefix sums in ranked order, as on the CPU.
        for (int i = lane; i < c; i += 32) {
          const float key = rank_value(cr[i]);
          w[i] = grouped ? key : expf(__fsub_rn(key, m));
        }
        __syncwarp();
        const int cp = ranked_prefix(w, c, threshold);
        __syncwarp();
        if (cp > 0)
          kept = max(count, cp);
        else if (c == n)
          kept = n;  // float rounding left the threshold unreached: keep every block
        else
          v = 0;     // the candidates fell short of the threshold: redo with every block
      }
    }
    __syncwarp();

    // Kept blocks: the ranked prefix, the sinks, the band, marked in the row (over the key
    // bits), then listed in ascending order so that the rule's classify runs once per listed
    // block rather than once per block of the row.
    int32_t* mark = reinterpret_cast<int32_t*>(sr);
    const bool keep_all = n > 0 && kept >= n;
    for (int kb = lane; kb < nkb; kb += 32) mark[kb] = keep_all && allowed(kb) ? 1 : 0;
    __syncwarp();
    if (!keep_all)
      for (int i = lane; i < kept; i += 32) mark[rank_index(cr[i])] = 1;
    __syncwarp();
    const int64_t sinks = min(a.sink_blocks, int64_t(nkb));
    for (int kb = lane; kb < sinks; kb += 32) mark[kb] = 1;
    if (a.local_blocks >= 0) {
      // diagonal_band(geo, qb, local_blocks)
      const int64_t q0 = qb * a.block_q, q1 = min(a.q_len, q0 + a.block_q);
      const int64_t lo = max(q0 + shift, int64_t(0)), hi = min(q1 - 1 + shift, a.k_len - 1);
      if (q0 < q1 && lo <= hi) {
        const int64_t first = max(lo / a.block_k - a.local_blocks, int64_t(0));
        const int64_t last = min(hi / a.block_k + a.local_blocks, int64_t(nkb - 1));
        for (int64_t kb = first + lane; kb <= last; kb += 32) mark[kb] = 1;
      }
    }
    __syncwarp();
    // The list (in the candidate buffer, no longer needed): kb | tile kind << 16.
    int32_t* list = reinterpret_cast<int32_t*>(cr);
    int len = 0;
    for (int base = 0; base < nkb; base += 32) {
      const bool in = base + lane < nkb && mark[base + lane] != 0;
      const unsigned ballot = __ballot_sync(kFull, in);
      if (in) list[len + __popc(ballot & ((1u << lane) - 1))] = base + lane;
      len += __popc(ballot);
    }
    __syncwarp();
    for (int i = lane; i < len; i += 32) {
      const int kb = list[i];
      list[i] = kb | (classify(qb, kb, a.block_q, a.block_k, a.q_len, a.k_len, a.d_lo, a.d_hi) << 16);
    }
    __syncwarp();
    const int64_t row = (int64_t(b) * a.plan_heads + h) * a.nqb + qb;
    write_row([list](int i) { return list[i] >> 16; }, len, a.kv_index + row * a.capacity,
              a.num_full + row, a.num_partial + row, lane, [list](int i) { return list[i] & 0xffff; });
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
      a.nkb, a.kv_index + row * a.capacity, a.num_full + row, a.num_partial + row, lane,
      [](int kb) { return kb; });
}

}  // namespace

cudaError_t launch_pool(const PoolArgs& q, const PoolArgs& k, cudaStream_t stream) {
  for (const PoolArgs* a : {&q, &k})
    if (a->dim < 1 || a->dim > 2 * kPoolThreads) return cudaErrorInvalidValue;
  const int64_t items =
      int64_t(q.batch) * q.heads * q.blocks + int64_t(k.batch) * k.heads * k.blocks;
  if (items == 0) return cudaSuccess;
  // The kernel strides over blocks, so any count fits the grid limit.
  const unsigned grid = unsigned(min(items, int64_t(0x7fffffff)));
  pool_kernel<<<grid, kPoolThreads, 0, stream>>>(q, k);
  return cudaGetLastError();
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
