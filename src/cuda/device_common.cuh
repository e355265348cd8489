// Device building blocks shared by the attention kernels: element types, the m16n8k16 tensor-core
// instruction, ldmatrix, cp.async, the swizzled shared-memory tile layout and the tile walkers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "cuda/params.hpp"

namespace spattn::cuda {

// ---- element types ----------------------------------------------------------------------------
template <class T> struct Elem;
template <> struct Elem<__nv_bfloat16> {
  __device__ static uint32_t pack(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static float2 unpack(uint32_t u) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&u));
  }
};
template <> struct Elem<__half> {
  __device__ static uint32_t pack(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static float2 unpack(uint32_t u) {
    return __half22float2(*reinterpret_cast<__half2*>(&u));
  }
};

// ---- tensor-core matrix multiply-accumulate ------------------------------------------------------
// D(16x8, f32) += A(16x16, row) * B(16x8, col). Fragments per lane (g = lane / 4, t = lane % 4):
//   a[0] (g, 2t..2t+1)  a[1] (g+8, 2t..)  a[2] (g, 2t+8..)  a[3] (g+8, 2t+8..)
//   b[0] (k 2t..2t+1, n g)  b[1] (k 2t+8.., n g)
//   c[0..1] (g, 2t..2t+1)  c[2..3] (g+8, 2t..2t+1)
template <class T>
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float* c, const uint32_t* a, uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float* c, const uint32_t* a, uint32_t b0,
                                                 uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 2^x with the hardware approximation (MUFU.EX2, ~2 ulp): the softmax runs it once per score,
// and exp2f's accurate path costs several instructions more. ex2(-inf) = +0.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Online-softmax max update for a thread's two rows, lazy: the running maxima (log2 units) move
// only when some row of the warp sees a scaled score more than kMaxSlack above its max. Then
// 2^(score - max) stays <= 2^kMaxSlack (exact in float32, and in 16-bit P, whose precision is
// relative) and most steps skip rescaling O; the result is unchanged, since row_sum and O are
// taken against the same max. mx: the step's scaled row maxima, already reduced over the row's
// lanes. Sets base, what to subtract before exp2 (the max, or 0 for a row with nothing allowed
// yet, so exp2 gives 0, not NaN). Returns whether the maxima moved (warp-uniform); then row_sum
// has been scaled by alpha and the caller must scale O by it too.
constexpr float kMaxSlack = 8.f;
__device__ __forceinline__ bool update_row_max(const float (&mx)[2], float (&row_max)[2],
                                               float (&row_sum)[2], float (&alpha)[2],
                                               float (&base)[2]) {
  const bool grow = mx[0] > row_max[0] + kMaxSlack || mx[1] > row_max[1] + kMaxSlack;
  const bool moved = __any_sync(0xffffffffu, grow);  // false while a row's max and mx are -inf
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (moved) {
      const float new_max = fmaxf(row_max[r], mx[r]);
      alpha[r] = exp2_approx(row_max[r] - (new_max == -INFINITY ? 0.f : new_max));
      row_max[r] = new_max;
      row_sum[r] *= alpha[r];
    }
    base[r] = row_max[r] == -INFINITY ? 0.f : row_max[r];
  }
  return moved;
}

// ---- cp.async ------------------------------------------------------------------------------------
// 16-byte global -> shared copy; `valid == false` zero-fills (rows past the sequence end), so
// tails never feed garbage (possibly NaN) into the products.
__device__ __forceinline__ void cp_async16(uint32_t smem, const void* gmem, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem),
               "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- shared-memory tiles ---------------------------------------------------------------------------
// A tile of ROWS x D 16-bit elements, rows of D/8 16-byte chunks. Chunk c of row r is stored at
// chunk c ^ (r & 7): the 8 rows one ldmatrix phase reads then hit 8 distinct bank groups.
template <int D>
struct SwizzledTile {
  static constexpr int kChunks = D / 8;
  static_assert(kChunks % 8 == 0, "head dim must be a multiple of 64 for the swizzle");
  __device__ static uint32_t offset_bytes(int row, int chunk) {
    return uint32_t(row * D + ((chunk ^ (row & 7)) << 3)) * 2u;
  }
};

// Copies rows [row0, row0 + ROWS) of a (N, D) matrix with row stride `stride` (elements) into a
// swizzled tile; rows >= n are zero-filled. All THREADS threads take part.
template <int ROWS, int D, int THREADS, class T>
__device__ __forceinline__ void load_tile(uint32_t smem, const T* base, int64_t stride, int row0,
                                          int n) {
  constexpr int kChunks = D / 8;
  constexpr int kTotal = ROWS * kChunks;
  static_assert(kTotal % THREADS == 0, "tile chunks must divide evenly among threads");
#pragma unroll
  for (int it = 0; it < kTotal / THREADS; ++it) {
    const int idx = it * THREADS + threadIdx.x;
    const int r = idx / kChunks, c = idx % kChunks;
    const int row = row0 + r;
    const bool valid = row < n;
    const T* src = base + (valid ? int64_t(row) * stride : 0) + c * 8;
    cp_async16(smem + SwizzledTile<D>::offset_bytes(r, c), src, valid);
  }
}

// A-operand fragment (16 rows x 16 k) from a row-major swizzled tile at (row0, k0).
template <int D>
__device__ __forceinline__ void frag_a(uint32_t* a, uint32_t tile, int row0, int k0, int lane) {
  const int r = row0 + (lane & 15);
  const int c = (k0 >> 3) + (lane >> 4);
  ldmatrix_x4(a, tile + SwizzledTile<D>::offset_bytes(r, c));
}
// B fragments for two n-blocks (n0..n0+15) and one k-step (k0..k0+15) from a tile stored as
// B^T (rows = n, k contiguous), e.g. K for S = Q K^T. b[0], b[1]: n-block 0; b[2], b[3]: 1.
template <int D>
__device__ __forceinline__ void frag_b_nt(uint32_t* b, uint32_t tile, int n0, int k0, int lane) {
  const int r = n0 + (lane & 7) + ((lane >> 4) << 3);
  const int c = (k0 >> 3) + ((lane >> 3) & 1);
  ldmatrix_x4(b, tile + SwizzledTile<D>::offset_bytes(r, c));
}
// Same, from a tile stored as B (rows = k, n contiguous), e.g. V for O = P V.
template <int D>
__device__ __forceinline__ void frag_b_t(uint32_t* b, uint32_t tile, int k0, int n0, int lane) {
  const int r = k0 + (lane & 15);
  const int c = (n0 >> 3) + (lane >> 4);
  ldmatrix_x4_trans(b, tile + SwizzledTile<D>::offset_bytes(r, c));
}

// ---- tile selection ---------------------------------------------------------------------------------
// Whether a plan row lists block `blk` (binary search in its full run, then its partial run).
__device__ __forceinline__ bool plan_row_lists(const int32_t* idx, int nf, int np, int blk) {
  int lo = 0, hi = nf;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (idx[mid] < blk) lo = mid + 1; else hi = mid;
  }
  if (lo < nf && idx[lo] == blk) return true;
  lo = nf;
  hi = nf + np;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (idx[mid] < blk) lo = mid + 1; else hi = mid;
  }
  return lo < nf + np && idx[lo] == blk;
}

__device__ __forceinline__ int64_t plan_row(const PlanArgs& p, int b, int h, int r) {
  const int pb = p.batch == 1 ? 0 : b;
  const int ph = p.heads == 1 ? 0 : h;
  return (int64_t(pb) * p.heads + ph) * p.rows + r;
}

// Plan head serving query head hq (PlanView::head_for).
__device__ __forceinline__ int plan_head(const PlanArgs& p, int hq, int heads_q) {
  return p.heads == heads_q ? hq : p.heads == 1 ? 0 : hq / (heads_q / p.heads);
}

// Bits of the 64 columns [c0, c0 + 64) of a tile whose plan block (of size `blk`) is listed in
// plan row `row`. Used by TileSource::generic only.
__device__ __forceinline__ uint64_t listed_columns(const PlanArgs& p, int64_t row, int c0,
                                                   int blk) {
  const int32_t* idx = p.index + row * p.capacity;
  const int nf = p.num_full[row], np = p.num_partial[row];
  uint64_t bits = 0;
  for (int c = 0; c < 64; c += (blk < 64 ? blk : 64)) {
    const int first = (c0 + c) / blk;
    if (plan_row_lists(idx, nf, np, first)) {
      const int width = blk < 64 ? blk : 64;
      const uint64_t run = width == 64 ? ~uint64_t(0) : ((uint64_t(1) << width) - 1);
      bits |= run << c;
    }
  }
  return bits;
}

// Offset bounds d = j - i - shift for one tile, compared against the rule: a tile is full when
// every pair is in range and inside both sequences.
__device__ __forceinline__ bool tile_is_full(const AttnParams& p, int q0, int nq, int k0, int nk,
                                             int bq, int bk) {
  if (nq < bq || nk < bk) return false;
  const int64_t shift = int64_t(p.k_len) - p.q_len;
  const int64_t dlo = int64_t(k0) - (q0 + nq - 1) - shift;
  const int64_t dhi = int64_t(k0 + nk - 1) - q0 - shift;
  return dlo >= p.d_lo && dhi <= p.d_hi;
}

// Key tiles of width BK that rows [q0, q1) may see under the rule: [first, last).
__device__ __forceinline__ int2 key_tile_range(const AttnParams& p, int q0, int q1, int bk) {
  const int64_t shift = int64_t(p.k_len) - p.q_len;
  int64_t jlo = int64_t(q0) + shift + p.d_lo;
  int64_t jhi = int64_t(q1 - 1) + shift + p.d_hi;  // inclusive
  if (jlo < 0) jlo = 0;
  if (jhi > p.k_len - 1) jhi = p.k_len - 1;
  if (q1 <= q0 || jhi < jlo) return make_int2(0, 0);
  return make_int2(int(jlo / bk), int(jhi / bk) + 1);
}
// Query tiles of height BQ that keys [k0, k1) are seen by: [first, last).
__device__ __forceinline__ int2 query_tile_range(const AttnParams& p, int k0, int k1, int bq) {
  const int64_t shift = int64_t(p.k_len) - p.q_len;
  int64_t ilo = int64_t(k0) - shift - p.d_hi;
  int64_t ihi = int64_t(k1 - 1) - shift - p.d_lo;
  if (ilo < 0) ilo = 0;
  if (ihi > p.q_len - 1) ihi = p.q_len - 1;
  if (k1 <= k0 || ihi < ilo) return make_int2(0, 0);
  return make_int2(int(ilo / bq), int(ihi / bq) + 1);
}

__device__ __forceinline__ bool rule_allows(const AttnParams& p, int i, int j) {
  const int d = j - i - (p.k_len - p.q_len);
  return i < p.q_len && j < p.k_len && d >= p.d_lo && d <= p.d_hi;
}

// Sets to -inf the entries of a 64-key accumulator block that the rule (or a tail) forbids.
// Layout of the m16n8 / wgmma float accumulators: acc[4j + e] is query row0 + 8 * (e / 2) and
// key k0 + 8j + 2 * tq + (e % 2).
__device__ __forceinline__ void mask_block64(const AttnParams& p, int row0, int k0, int tq,
                                             float* acc) {
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (!rule_allows(p, row0 + 8 * (e >> 1), k0 + 8 * j + 2 * tq + (e & 1)))
        acc[4 * j + e] = -INFINITY;
}

template <class T>
__device__ __forceinline__ const T* row_ptr(const void* base, const int64_t* stride, int b, int h) {
  return static_cast<const T*>(base) + int64_t(b) * stride[0] + int64_t(h) * stride[1];
}
template <class T>
__device__ __forceinline__ T* row_ptr_mut(void* base, const int64_t* stride, int b, int h) {
  return static_cast<T*>(base) + int64_t(b) * stride[0] + int64_t(h) * stride[1];
}

// ---- backward row statistics (the preparation kernel and the Hopper dq pass) ---------------------
// Sum of the products of two 16-byte vectors of 8 elements: one chunk of delta = rowsum(dO * O).
template <class T>
__device__ __forceinline__ float dot_chunk(uint4 a, uint4 b) {
  const uint32_t aw[4] = {a.x, a.y, a.z, a.w}, bw[4] = {b.x, b.y, b.z, b.w};
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 x = Elem<T>::unpack(aw[k]), y = Elem<T>::unpack(bw[k]);
    sum += x.x * y.x + x.y * y.y;
  }
  return sum;
}
// lse of query row i of (b, hq) in log2 units; +inf for a row with no key (lse = -inf), so its
// probabilities come out 0 and its gradients vanish.
__device__ __forceinline__ float lse_log2(const AttnParams& p, int b, int hq, int i) {
  const float lse = p.lse[int64_t(b) * p.lse_stride[0] + int64_t(hq) * p.lse_stride[1] +
                          int64_t(i) * p.lse_stride[2]];
  return lse == -INFINITY ? INFINITY : lse * 1.4426950408889634f;
}

}  // namespace spattn::cuda
