// Block-sparse attention backward on mma.sync, deterministic (no floating-point atomics):
//   1. backward_prepare_kernel: delta = rowsum(dout * out) and lse in log2 units, per query row.
//   2. attention_dq_kernel: per (query tile of 128 rows (64 at D = 256), head, batch), walks
//      the forward plan's row and accumulates dq = scale * dS K in registers (recomputing S
//      and dP).
//   3. attention_dkdv_kernel: per (key tile of 64, kv head, batch; at D = 256 per half of the
//      dk/dv columns as well), walks the transposed plan over the query heads of its GQA group
//      and accumulates dk, dv in registers.
// Passes 2 and 3 both recompute S and P; that costs two extra matrix products over
// FlashAttention-2's atomic dq but makes every gradient a fixed-order sum.
#pragma once

#include "cuda/device_common.cuh"
#include "cuda/forward_kernel.cuh"

namespace spattn::cuda {

__device__ __forceinline__ void cp_async4(uint32_t smem, const void* gmem, bool valid) {
  const int bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem), "l"(gmem),
               "r"(bytes));
}

// x = A1 B1^T and y = A2 B2^T for this warp's 16 rows of A1, A2 (shared-memory tiles with D
// columns) against 64 rows of B1, B2: the paired products of both backward passes (S and dP, or
// S^T and dP^T), issued together so each k-step's fragments are loaded once.
template <class T, int D>
__device__ __forceinline__ void two_products_nt(float (&x)[8][4], float (&y)[8][4], uint32_t sA1,
                                                uint32_t sA2, uint32_t sB1, uint32_t sB2,
                                                int warp, int lane) {
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) x[n][e] = y[n][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a1[4], a2[4];
    frag_a<D>(a1, sA1, warp * 16, kk * 16, lane);
    frag_a<D>(a2, sA2, warp * 16, kk * 16, lane);
#pragma unroll
    for (int n = 0; n < 8; n += 2) {
      uint32_t b1[4], b2[4];
      frag_b_nt<D>(b1, sB1, n * 8, kk * 16, lane);
      frag_b_nt<D>(b2, sB2, n * 8, kk * 16, lane);
      mma16816<T>(x[n], a1, b1[0], b1[1]);
      mma16816<T>(x[n + 1], a1, b1[2], b1[3]);
      mma16816<T>(y[n], a2, b2[0], b2[1]);
      mma16816<T>(y[n + 1], a2, b2[2], b2[3]);
    }
  }
}

// ---- 1. per-row preparation ----------------------------------------------------------------------
// Per (b, hq, i) row: delta (float32) and lse2 (lse_log2). Workspace is (B, Hq, Nq) contiguous.
// One group of D / 8 lanes per query row, each lane one 16-byte vector of out and of dout, so
// every load is a full vector and a warp keeps 1-4 rows in flight.
template <int D>
struct PrepareTraits {
  static constexpr int kLanesPerRow = D / 8;
  static constexpr int kRowsPerWarp = 32 / kLanesPerRow;
  static constexpr int kThreads = 256;
  static constexpr int kRowsPerBlock = kThreads / 32 * kRowsPerWarp;
  static_assert(kLanesPerRow <= 32 && 32 % kLanesPerRow == 0, "prepare: D / 8 must divide 32");
};

template <class T, int D>
__global__ void backward_prepare_kernel(const __grid_constant__ AttnParams p) {
  using Tr = PrepareTraits<D>;
  const int64_t rows = int64_t(p.batch) * p.heads_q * p.q_len;
  const int lane = threadIdx.x & 31;
  const int64_t r = int64_t(blockIdx.x) * Tr::kRowsPerBlock +
                    (threadIdx.x >> 5) * Tr::kRowsPerWarp + lane / Tr::kLanesPerRow;
  const int c = (lane % Tr::kLanesPerRow) * 8;  // this lane's 8 columns
  float sum = 0.f;
  const bool live = r < rows;
  int i = 0, hq = 0, b = 0;
  if (live) {
    i = int(r % p.q_len);
    hq = int((r / p.q_len) % p.heads_q);
    b = int(r / (int64_t(p.q_len) * p.heads_q));
    const uint4 o = *reinterpret_cast<const uint4*>(row_ptr<T>(p.out, p.o_stride, b, hq) +
                                                    int64_t(i) * p.o_stride[2] + c);
    const uint4 d = *reinterpret_cast<const uint4*>(row_ptr<T>(p.dout, p.do_stride, b, hq) +
                                                    int64_t(i) * p.do_stride[2] + c);
    sum = dot_chunk<T>(o, d);
  }
  // Reduce over the row's lanes (aligned groups of kLanesPerRow; every lane takes part).
#pragma unroll
  for (int m = Tr::kLanesPerRow / 2; m > 0; m >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, m);
  if (live && c == 0) {
    p.delta[r] = sum;
    p.lse2[r] = lse_log2(p, b, hq, i);
  }
}

// ---- 2. dq ----------------------------------------------------------------------------------------
template <int D>
struct DqTraits {
  // 128 query rows (one plan row); 64 at head dim 256, where 128 rows of Q and dO with a
  // double-buffered K/V tile would not fit in shared memory.
  static constexpr int kBlockQ = D > 128 ? 64 : 128;
  static constexpr int kBlockK = 64;
  static constexpr int kWarps = kBlockQ / 16;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kTileQBytes = kBlockQ * D * 2;
  static constexpr int kTileKBytes = kBlockK * D * 2;
  // Q and dout resident, K and V double-buffered.
  static constexpr int kSmemBytes = 2 * kTileQBytes + 2 * 2 * kTileKBytes;
  static_assert(kSmemBytes <= 227 * 1024, "dq shared memory over the sm_90 budget");
};

template <class T, int D>
__global__ void __launch_bounds__(DqTraits<D>::kThreads, 1)
    attention_dq_kernel(const __grid_constant__ AttnParams p) {
  using Tr = DqTraits<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, tq = lane & 3;
  const int qt = gridDim.x - 1 - blockIdx.x;
  const int hq = blockIdx.y, b = blockIdx.z;
  const int hk = hq / p.group;
  const int q0 = qt * Tr::kBlockQ;
  const int nq = min(Tr::kBlockQ, p.q_len - q0);

  const uint32_t sQ = smem_addr(smem);
  const uint32_t sDO = sQ + Tr::kTileQBytes;
  const uint32_t sK0 = sDO + Tr::kTileQBytes;
  const T* kb = row_ptr<T>(p.k, p.k_stride, b, hk);
  const T* vb = row_ptr<T>(p.v, p.v_stride, b, hk);
  const KeyTileWalk walk = make_key_walk(p, b, hq, q0, Tr::kBlockQ);

  load_tile<Tr::kBlockQ, D, Tr::kThreads>(sQ, row_ptr<T>(p.q, p.q_stride, b, hq), p.q_stride[2],
                                          q0, p.q_len);
  load_tile<Tr::kBlockQ, D, Tr::kThreads>(sDO, row_ptr<T>(p.dout, p.do_stride, b, hq),
                                          p.do_stride[2], q0, p.q_len);
  cp_async_commit();
  auto issue_kv = [&](int t) { load_kv_stage<Tr, D>(p, walk, t, q0, nq, sK0, kb, vb); };
  if (walk.count > 0) issue_kv(0);
  const int64_t generic_row = generic_plan_row(p, b, hq, q0, warp);
  // Per-row statistics for rows g and g + 8 of this warp (rows past the end: P = 0).
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = q0 + warp * 16 + g + r * 8;
    const int64_t w = (int64_t(b) * p.heads_q + hq) * p.q_len + i;
    lse2[r] = i < p.q_len ? p.lse2[w] : INFINITY;
    delta[r] = i < p.q_len ? p.delta[w] : 0.f;
  }

  float acc_dq[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) acc_dq[i][0] = acc_dq[i][1] = acc_dq[i][2] = acc_dq[i][3] = 0.f;

  for (int t = 0; t < walk.count; ++t) {
    if (t + 1 < walk.count) {
      issue_kv(t + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    int k0;
    bool masked;
    walk.at(p, t, q0, nq, k0, masked);
    const uint32_t sK = sK0 + (t & 1) * 2 * Tr::kTileKBytes;
    const uint32_t sV = sK + Tr::kTileKBytes;

    // S = Q K^T and dP = dout V^T: (16 rows, 64 keys) per warp.
    float s[8][4], dp[8][4];
    two_products_nt<T, D>(s, dp, sQ, sDO, sK, sV, warp, lane);
    if (masked) {
      const uint64_t listed = p.source == TileSource::generic
                                  ? listed_columns(p.plan, generic_row, k0, p.plan.block_k)
                                  : ~uint64_t(0);
      const int i0 = q0 + warp * 16 + g;
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = n * 8 + 2 * tq + (e & 1);
          if (!((listed >> c) & 1) || !rule_allows(p, i0 + (e >> 1) * 8, k0 + c))
            s[n][e] = -INFINITY;
        }
    }
    // dS = P * (dP - delta), as A fragments for dq += dS K.
    uint32_t ds_frag[4][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      float v[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const float pr = exp2_approx(fmaf(s[n][e], p.scale_log2, -lse2[r]));
        v[e] = pr * (dp[n][e] - delta[r]);
      }
      ds_frag[n >> 1][(n & 1) * 2 + 0] = Elem<T>::pack(v[0], v[1]);
      ds_frag[n >> 1][(n & 1) * 2 + 1] = Elem<T>::pack(v[2], v[3]);
    }
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int n = 0; n < D / 8; n += 2) {
        uint32_t bf[4];
        frag_b_t<D>(bf, sK, kk * 16, n * 8, lane);
        mma16816<T>(acc_dq[n], ds_frag[kk], bf[0], bf[1]);
        mma16816<T>(acc_dq[n + 1], ds_frag[kk], bf[2], bf[3]);
      }
    }
    __syncthreads();
  }

  T* dqb = row_ptr_mut<T>(p.dq, p.dq_stride, b, hq);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = q0 + warp * 16 + g + r * 8;
    if (i >= p.q_len) continue;
    T* row = dqb + int64_t(i) * p.dq_stride[2];
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<uint32_t*>(row + n * 8 + 2 * tq) =
          Elem<T>::pack(acc_dq[n][2 * r] * p.scale, acc_dq[n][2 * r + 1] * p.scale);
  }
}

// ---- 3. dk, dv ------------------------------------------------------------------------------------
template <int D>
struct DkdvTraits {
  static constexpr int kBlockK = 64;  // = the default plan block_k: one CTA per transposed row
  static constexpr int kBlockQ = 64;  // query sub-tile; a 128-row plan block is two steps
  // Columns of dK and dV one CTA accumulates: all D up to 128; at D = 256 two CTAs per key tile
  // take 128 columns each (both compute S^T and dP^T over all of D), since 16 keys x 256
  // columns of dK and dV would be 256 registers per thread.
  static constexpr int kOutD = D > 128 ? 128 : D;
  static constexpr int kSlices = D / kOutD;
  static constexpr int kWarps = kBlockK / 16;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kTileKBytes = kBlockK * D * 2;
  static constexpr int kTileQBytes = kBlockQ * D * 2;
  static constexpr int kStatBytes = kBlockQ * 4;
  // K, V resident; per stage: Q, dout, lse2, delta.
  static constexpr int kStageBytes = 2 * kTileQBytes + 2 * kStatBytes;
  static constexpr int kSmemBytes = 2 * kTileKBytes + 2 * kStageBytes;
  // Two CTAs per SM at D = 128 (2 x 97 KiB).
  static_assert(kSmemBytes <= 227 * 1024, "dk/dv shared memory over the sm_90 budget");
};

// Walks (query head of the group, query tile of 64) pairs for one key tile.
struct QueryTileWalk {
  TileSource source;
  int first, range_count;  // range sources: same query tiles for every head
  int b, k0, group, hk;

  __device__ int count(const AttnParams& p, int h) const {
    if (source != TileSource::native) return range_count;
    const int hq = hk * group + h;
    const int hp = plan_head(p.tplan, hq, p.heads_q);
    const int64_t row = plan_row(p.tplan, b, hp, k0 / p.tplan.block_k);
    return (p.tplan.num_full[row] + p.tplan.num_partial[row]) * (p.tplan.block_q / 64);
  }
  // Moves (h, t) forward to the next existing pair; false when done.
  __device__ bool settle(const AttnParams& p, int& h, int& t) const {
    while (h < group && t >= count(p, h)) {
      ++h;
      t = 0;
    }
    return h < group;
  }
  __device__ void at(const AttnParams& p, int h, int t, int nk, int& q0, bool& masked) const {
    if (source == TileSource::native) {
      const int hq = hk * group + h;
      const int hp = plan_head(p.tplan, hq, p.heads_q);
      const int64_t row = plan_row(p.tplan, b, hp, k0 / p.tplan.block_k);
      const int sub = p.tplan.block_q / 64;
      const int pi = t / sub;
      q0 = p.tplan.index[row * p.tplan.capacity + pi] * p.tplan.block_q + (t - pi * sub) * 64;
      masked = pi >= p.tplan.num_full[row];
    } else {
      q0 = (first + t) * 64;
      const int nq = min(64, p.q_len - q0);
      masked = source == TileSource::generic || !tile_is_full(p, q0, nq, k0, nk, 64, 64);
    }
  }
};

template <class T, int D>
__global__ void __launch_bounds__(DkdvTraits<D>::kThreads, 2)
    attention_dkdv_kernel(const __grid_constant__ AttnParams p) {
  using Tr = DkdvTraits<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, tq = lane & 3;
  const int kt = blockIdx.x / Tr::kSlices, hk = blockIdx.y, b = blockIdx.z;
  const int c0 = (blockIdx.x % Tr::kSlices) * Tr::kOutD;  // first dK/dV column of this CTA
  const int k0 = kt * Tr::kBlockK;
  const int nk = min(Tr::kBlockK, p.k_len - k0);

  const uint32_t sK = smem_addr(smem);
  const uint32_t sV = sK + Tr::kTileKBytes;
  const uint32_t sStage0 = sV + Tr::kTileKBytes;
  // Stage layout: Q tile, dout tile, lse2[64], delta[64].
  const float* stats0 = reinterpret_cast<const float*>(smem + 2 * Tr::kTileKBytes + 2 * Tr::kTileQBytes);

  QueryTileWalk walk{};
  walk.source = p.source;
  walk.b = b;
  walk.k0 = k0;
  walk.group = p.group;
  walk.hk = hk;
  if (p.source != TileSource::native) {
    const int2 r = query_tile_range(p, k0, k0 + nk, 64);
    walk.first = r.x;
    walk.range_count = r.y - r.x;
  }

  load_tile<Tr::kBlockK, D, Tr::kThreads>(sK, row_ptr<T>(p.k, p.k_stride, b, hk), p.k_stride[2],
                                          k0, p.k_len);
  load_tile<Tr::kBlockK, D, Tr::kThreads>(sV, row_ptr<T>(p.v, p.v_stride, b, hk), p.v_stride[2],
                                          k0, p.k_len);
  cp_async_commit();

  auto issue_q = [&](int h, int t, int stage) {
    int q0;
    bool masked;
    walk.at(p, h, t, nk, q0, masked);
    const int hq = hk * p.group + h;
    const uint32_t base = sStage0 + stage * Tr::kStageBytes;
    load_tile<Tr::kBlockQ, D, Tr::kThreads>(base, row_ptr<T>(p.q, p.q_stride, b, hq),
                                            p.q_stride[2], q0, p.q_len);
    load_tile<Tr::kBlockQ, D, Tr::kThreads>(base + Tr::kTileQBytes,
                                            row_ptr<T>(p.dout, p.do_stride, b, hq),
                                            p.do_stride[2], q0, p.q_len);
    // Statistics; rows past the end read as 0, harmless because their Q and dout rows are 0.
    const int64_t w0 = (int64_t(b) * p.heads_q + hq) * p.q_len;
    for (int c = threadIdx.x; c < 2 * Tr::kBlockQ; c += Tr::kThreads) {
      const int col = c % Tr::kBlockQ;
      const bool valid = q0 + col < p.q_len;
      const float* src = (c < Tr::kBlockQ ? p.lse2 : p.delta) + (valid ? w0 + q0 + col : 0);
      cp_async4(base + 2 * Tr::kTileQBytes + c * 4, src, valid);
    }
    cp_async_commit();
  };

  float acc_dk[Tr::kOutD / 8][4], acc_dv[Tr::kOutD / 8][4];
#pragma unroll
  for (int i = 0; i < Tr::kOutD / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dk[i][e] = acc_dv[i][e] = 0.f;

  int h = 0, t = 0;
  bool have = walk.settle(p, h, t);
  if (have) issue_q(h, t, 0);
  int stage = 0;
  while (have) {
    int hn = h, tn = t + 1;
    const bool have_next = walk.settle(p, hn, tn);
    if (have_next) {
      issue_q(hn, tn, stage ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    int q0;
    bool masked;
    walk.at(p, h, t, nk, q0, masked);
    const uint32_t sQ = sStage0 + stage * Tr::kStageBytes;
    const uint32_t sDO = sQ + Tr::kTileQBytes;
    const float* lse2 = reinterpret_cast<const float*>(
        reinterpret_cast<const unsigned char*>(stats0) + stage * Tr::kStageBytes);
    const float* delta = lse2 + Tr::kBlockQ;

    // S^T = K Q^T and dP^T = V dout^T: (16 keys, 64 queries) per warp.
    float s[8][4], dp[8][4];
    two_products_nt<T, D>(s, dp, sK, sV, sQ, sDO, warp, lane);
    if (masked) {
      uint64_t listed = ~uint64_t(0);
      if (p.source == TileSource::generic) {
        // Column c (query q0 + c) counts when its plan row lists this warp's plan kv block.
        const int hq = hk * p.group + h;
        const int hp = plan_head(p.plan, hq, p.heads_q);
        const int kbp = (k0 + warp * 16) / p.plan.block_k;
        const int step = p.plan.block_q < 64 ? p.plan.block_q : 64;
        listed = 0;
        for (int c = 0; c < 64; c += step) {
          const int qb = min((q0 + c) / p.plan.block_q, p.plan.rows - 1);
          const int64_t row = plan_row(p.plan, b, hp, qb);
          if (plan_row_lists(p.plan.index + row * p.plan.capacity, p.plan.num_full[row],
                             p.plan.num_partial[row], kbp))
            listed |= (step == 64 ? ~uint64_t(0) : ((uint64_t(1) << step) - 1)) << c;
        }
      }
      const int j0 = k0 + warp * 16 + g;
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = n * 8 + 2 * tq + (e & 1);
          if (!((listed >> c) & 1) || !rule_allows(p, q0 + c, j0 + (e >> 1) * 8))
            s[n][e] = -INFINITY;
        }
    }
    // P^T and dS^T = P^T * (dP^T - delta) as A fragments (16 keys x 16 queries per step).
    uint32_t p_frag[4][4], ds_frag[4][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      const int c = n * 8 + 2 * tq;
      const float l0 = lse2[c], l1 = lse2[c + 1];
      const float d0 = delta[c], d1 = delta[c + 1];
      const float p0 = exp2_approx(fmaf(s[n][0], p.scale_log2, -l0));
      const float p1 = exp2_approx(fmaf(s[n][1], p.scale_log2, -l1));
      const float p2 = exp2_approx(fmaf(s[n][2], p.scale_log2, -l0));
      const float p3 = exp2_approx(fmaf(s[n][3], p.scale_log2, -l1));
      p_frag[n >> 1][(n & 1) * 2 + 0] = Elem<T>::pack(p0, p1);
      p_frag[n >> 1][(n & 1) * 2 + 1] = Elem<T>::pack(p2, p3);
      ds_frag[n >> 1][(n & 1) * 2 + 0] = Elem<T>::pack(p0 * (dp[n][0] - d0), p1 * (dp[n][1] - d1));
      ds_frag[n >> 1][(n & 1) * 2 + 1] = Elem<T>::pack(p2 * (dp[n][2] - d0), p3 * (dp[n][3] - d1));
    }
    // dV += P^T dout, dK += dS^T Q: (16 keys, this CTA's kOutD columns) per warp.
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int n = 0; n < Tr::kOutD / 8; n += 2) {
        uint32_t bd[4], bq[4];
        frag_b_t<D>(bd, sDO, kk * 16, c0 + n * 8, lane);
        frag_b_t<D>(bq, sQ, kk * 16, c0 + n * 8, lane);
        mma16816<T>(acc_dv[n], p_frag[kk], bd[0], bd[1]);
        mma16816<T>(acc_dv[n + 1], p_frag[kk], bd[2], bd[3]);
        mma16816<T>(acc_dk[n], ds_frag[kk], bq[0], bq[1]);
        mma16816<T>(acc_dk[n + 1], ds_frag[kk], bq[2], bq[3]);
      }
    }
    __syncthreads();
    h = hn;
    t = tn;
    have = have_next;
    stage ^= 1;
  }

  T* dkb = row_ptr_mut<T>(p.dk, p.dk_stride, b, hk);
  T* dvb = row_ptr_mut<T>(p.dv, p.dv_stride, b, hk);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = k0 + warp * 16 + g + r * 8;
    if (j >= p.k_len) continue;
    T* dkr = dkb + int64_t(j) * p.dk_stride[2] + c0;
    T* dvr = dvb + int64_t(j) * p.dv_stride[2] + c0;
#pragma unroll
    for (int n = 0; n < Tr::kOutD / 8; ++n) {
      *reinterpret_cast<uint32_t*>(dkr + n * 8 + 2 * tq) =
          Elem<T>::pack(acc_dk[n][2 * r] * p.scale, acc_dk[n][2 * r + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dvr + n * 8 + 2 * tq) =
          Elem<T>::pack(acc_dv[n][2 * r], acc_dv[n][2 * r + 1]);
    }
  }
}

template <class T, int D>
cudaError_t launch_backward_prepare(const AttnParams& p, cudaStream_t stream) {
  const int64_t rows = int64_t(p.batch) * p.heads_q * p.q_len;
  if (rows == 0) return cudaSuccess;
  using Tr = PrepareTraits<D>;
  backward_prepare_kernel<T, D>
      <<<unsigned((rows + Tr::kRowsPerBlock - 1) / Tr::kRowsPerBlock), Tr::kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <class T, int D>
cudaError_t launch_dq(const AttnParams& p, cudaStream_t stream) {
  using Tr = DqTraits<D>;
  auto kernel = attention_dq_kernel<T, D>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       Tr::kSmemBytes);
  if (e != cudaSuccess) return e;
  const dim3 grid((p.q_len + Tr::kBlockQ - 1) / Tr::kBlockQ, p.heads_q, p.batch);
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <class T, int D>
cudaError_t launch_dkdv(const AttnParams& p, cudaStream_t stream) {
  using Tr = DkdvTraits<D>;
  auto kernel = attention_dkdv_kernel<T, D>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       Tr::kSmemBytes);
  if (e != cudaSuccess) return e;
  const dim3 grid((p.k_len + Tr::kBlockK - 1) / Tr::kBlockK * Tr::kSlices, p.heads_kv, p.batch);
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace spattn::cuda
