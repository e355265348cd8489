// Block-sparse attention backward for Hopper (sm_90a): wgmma + TMA, deterministic.
//
// The passes of the mma.sync backward (backward_kernel.cuh), with the matrix products on wgmma;
// its first pass (backward_prepare_kernel: delta and lse in log2 units) is folded into the dq
// pass, which has the dO tile in shared memory anyway:
//   1. attention_dq_sm90_kernel: one CTA per (128 query rows, query head, batch), walking the
//      forward plan row like the forward. It first computes delta = rowsum(dO * O) and lse2
//      of its rows and writes them to the workspace for pass 2. Per 64-key tile, consumer c
//      (64 rows):
//        S  = Q K^T    wgmma m64n64k16, A = Q, B = K (K-major), shared memory
//        dP = dO V^T   wgmma m64n64k16, A = dO, B = V (K-major), shared memory
//        dS = P * (dP - delta), P = exp2(S * scale * log2e - lse2), in registers
//        dQ += dS K    wgmma m64n{D}k16, A = dS from registers, B = K (N-major)
//      S and dP of tile t+1 are issued before dQ of tile t, and dS of t+1 is computed while
//      dQ of t still runs.
//   2. attention_dkdv_sm90_kernel: one CTA per (64 or 128 keys, kv head, batch), walking the
//      transposed plan over the query heads of the GQA group in query steps (see "dk, dv"
//      below for the two CTA shapes); per step, each consumer:
//        S^T  = K Q^T    wgmma m64n64k16, A = K, B = Q (K-major)
//        dP^T = V dO^T   wgmma m64n64k16, A = V, B = dO (K-major)
//        P^T, dS^T = P^T * (dP^T - delta) in registers (delta, lse2 per column from the stage)
//        dV += P^T dO    wgmma m64n{D}k16, A = P^T from registers, B = dO (N-major)
//        dK += dS^T Q    wgmma m64n{D}k16, A = dS^T from registers, B = Q (N-major)
//      Narrow CTA: the two consumers' partial dK, dV are summed in a fixed order in the
//      epilogue; wide CTA: each consumer owns its keys' dK, dV.
// Every gradient element is a fixed-order sum: no floating-point atomics, bitwise reproducible.
// Producer warpgroup: one thread issues TMA copies into a ring with full/empty mbarriers; in
// the dk/dv kernel a second warp copies the step's lse2 and delta into the stage (the workspace
// rows are not 16-byte aligned for a bulk copy) and arrives on the same full barrier.
#pragma once

#include <type_traits>

#include "cuda/device_common.cuh"
#include "cuda/forward_kernel.cuh"  // KeyTileWalk, make_key_walk: the forward's tile order and masks
#include "cuda/sm90/backward_sm90.hpp"  // dkdv_shape
#include "cuda/sm90/sm90_primitives.cuh"
#include "cuda/sm90/tensor_map.hpp"

namespace spattn::cuda::sm90 {

// TMA descriptors: Q and dO with boxes of 64 columns x 128 rows, K and V with 64 x 64.
struct BackwardMaps {
  CUtensorMap q, k, v, dout;
};

__device__ __forceinline__ float2 bwd_ld_shared_f2(uint32_t addr) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ void bwd_st_shared_f32(uint32_t addr, float v) {
  asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(addr), "f"(v) : "memory");
}
__device__ __forceinline__ float bwd_ld_shared_f32(uint32_t addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(addr) : "memory");
  return v;
}
// Barrier among the 256 consumer threads (ids 0 and 1..2 are taken by __syncthreads and
// warpgroup_sync).
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 5, 256;\n" ::: "memory"); }

// 128B-swizzled operand descriptors (see smem_desc). K-major: `rows` x 16 columns at k-step kk
// of a tile whose 64-column slabs are `slab_bytes` apart. N-major: 16 rows (the k dim) from
// `row_addr`, all D columns (the next 64 are the next slab).
__device__ __forceinline__ uint64_t desc_kmajor(uint32_t tile, int slab_bytes, int kk) {
  return smem_desc(tile + (kk / 4) * slab_bytes + (kk % 4) * 32, 16, 1024);
}
__device__ __forceinline__ uint64_t desc_nmajor(uint32_t row_addr, int slab_bytes) {
  return smem_desc(row_addr, slab_bytes, 1024);
}

// ---- dq --------------------------------------------------------------------------------------------
template <int D>
struct DqSm90Traits {
  static constexpr int kBlockQ = 128;   // = plan block_q: one CTA per forward plan row
  static constexpr int kBlockK = 64;    // = plan block_k
  static constexpr int kConsumers = 2;  // warpgroups of 64 query rows
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kSlabs = D / 64;
  // Sparse plans visit K/V tiles in random order, mostly L2 hits but some from DRAM: a deep
  // ring keeps several tiles in flight (D = 64 has the room for one more).
  static constexpr int kStages = D == 128 ? 4 : 5;
  static constexpr int kQSlabBytes = kBlockQ * 128;
  static constexpr int kQBytes = kSlabs * kQSlabBytes;
  static constexpr int kKVSlabBytes = kBlockK * 128;
  static constexpr int kKVBytes = kSlabs * kKVSlabBytes;
  static constexpr int kBarriers = 1 + 2 * kStages;  // qd_full, full[] (K and V), empty[]
  // Q, dO, the K/V ring, barriers, 1024 bytes to align the base to the swizzle atom.
  // D = 128: 32 + 32 + 4 x 32 KiB = 192 KiB.
  static constexpr int kSmemBytes = 2 * kQBytes + 2 * kStages * kKVBytes + 8 * kBarriers + 1024;
  static_assert(kSmemBytes <= 227 * 1024, "sm90 dq shared memory over the per-block limit");
  static_assert(D == 64 || D == 128, "sm90 backward takes head dims 64 and 128");
  // Producer 40 registers (it walks the plan), consumers 232: 128 x 40 + 256 x 232 = 64512.
  static constexpr int kProducerRegs = 40, kConsumerRegs = 232;
  static_assert(128 * kProducerRegs + 128 * kConsumers * kConsumerRegs <= 65536,
                "register split over the register file");
};

template <class T, int D>
__global__ void __launch_bounds__(DqSm90Traits<D>::kThreads, 1)
    attention_dq_sm90_kernel(const __grid_constant__ AttnParams p,
                             const __grid_constant__ BackwardMaps maps) {
  using Tr = DqSm90Traits<D>;
  constexpr int S = Tr::kStages;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t sQ = (smem_addr(smem_raw) + 1023u) & ~1023u;
  const uint32_t sDO = sQ + Tr::kQBytes;
  const uint32_t sKV = sDO + Tr::kQBytes;  // stage s: K at sKV + 2s * kKVBytes, V right after
  const uint32_t bars = sKV + 2 * S * Tr::kKVBytes;
  const uint32_t qd_full = bars;
  auto full = [&](int s) { return bars + 8u * (1 + s); };
  auto empty = [&](int s) { return bars + 8u * (1 + S + s); };
  auto stage_k = [&](int s) { return sKV + 2u * s * Tr::kKVBytes; };

  const int qt = gridDim.x - 1 - blockIdx.x;  // heaviest (causal: last) query tiles first
  const int hq = blockIdx.y, b = blockIdx.z;
  const int hk = hq / p.group;
  const int q0 = qt * Tr::kBlockQ;
  const int nq = min(Tr::kBlockQ, p.q_len - q0);
  const KeyTileWalk walk = make_key_walk(p, b, hq, q0);
  const int wg = threadIdx.x / 128;

  if (threadIdx.x == 0) {
    mbar_init(qd_full, 1);
    for (int s = 0; s < S; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), Tr::kConsumers * 4);  // one arrival per consumer warp
    }
    mbar_fence_init();
  }
  __syncthreads();

  if (wg == 0) {
    // ---- producer ----
    regs_dealloc<Tr::kProducerRegs>();
    if (threadIdx.x == 0) {
      tma_prefetch_map(&maps.k);
      tma_prefetch_map(&maps.v);
      mbar_arrive_expect_tx(qd_full, 2 * Tr::kQBytes);
#pragma unroll
      for (int sl = 0; sl < Tr::kSlabs; ++sl) {
        tma_load_4d(sQ + sl * Tr::kQSlabBytes, &maps.q, qd_full, sl * 64, q0, hq, b);
        tma_load_4d(sDO + sl * Tr::kQSlabBytes, &maps.dout, qd_full, sl * 64, q0, hq, b);
      }
      for (int t = 0; t < walk.count; ++t) {
        const int s = t % S;
        if (t >= S) mbar_wait(empty(s), ((t / S) - 1) & 1);
        int k0;
        bool masked;
        walk.at(p, t, q0, nq, k0, masked);
        mbar_arrive_expect_tx(full(s), 2 * Tr::kKVBytes);
#pragma unroll
        for (int sl = 0; sl < Tr::kSlabs; ++sl) {
          tma_load_4d(stage_k(s) + sl * Tr::kKVSlabBytes, &maps.k, full(s), sl * 64, k0, hk, b);
          tma_load_4d(stage_k(s) + Tr::kKVBytes + sl * Tr::kKVSlabBytes, &maps.v, full(s),
                      sl * 64, k0, hk, b);
        }
      }
    }
  } else {
    // ---- consumers ----
    regs_alloc<Tr::kConsumerRegs>();
    const int c = wg - 1;  // rows 64c .. 64c + 63 of the CTA's query tile
    const int tid = threadIdx.x & 127, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, tq = lane & 3;
    const int row0 = q0 + 64 * c + 16 * warp + g;  // this thread's rows: row0, row0 + 8

    // This pass also does the preparation kernel's work for the dk/dv pass: lse in log2 units
    // and delta = rowsum(dO * O) of this thread's two rows. O comes from global memory, its
    // loads in flight while the producer's Q/dO copies land; dO from the shared tile. Each of
    // a row's four threads takes every fourth 16-byte chunk of it.
    constexpr int kMyChunks = D / 8 / 4;
    float lse2[2], delta[2];
    uint4 o_chunk[2][kMyChunks];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = row0 + 8 * r;
      const T* orow = row_ptr<T>(p.out, p.o_stride, b, hq) + int64_t(i) * p.o_stride[2];
#pragma unroll
      for (int m = 0; m < kMyChunks; ++m)
        o_chunk[r][m] = i < p.q_len ? *reinterpret_cast<const uint4*>(orow + 8 * (tq + 4 * m))
                                    : make_uint4(0u, 0u, 0u, 0u);
      lse2[r] = i < p.q_len ? lse_log2(p, b, hq, i) : INFINITY;  // +inf: P = 0 past the end
    }

    float dq[D / 2];   // 64 x D per warpgroup
    float sc[32];      // S, then dS in float32, 64 x 64
    float dp[32];      // dP, 64 x 64
    uint32_t dsf[16];  // dS as A fragments: 4 k-steps x 4 registers
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dq[i] = 0.f;
#pragma unroll
    for (int i = 0; i < 32; ++i) sc[i] = dp[i] = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) dsf[i] = 0u;

    const uint32_t sQc = sQ + c * 64 * 128, sDOc = sDO + c * 64 * 128;
    auto issue_sdp = [&](int s) {
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        Wgmma<T, 64>::template ss<0>(sc, desc_kmajor(sQc, Tr::kQSlabBytes, kk),
                                     desc_kmajor(stage_k(s), Tr::kKVSlabBytes, kk), kk > 0);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        Wgmma<T, 64>::template ss<0>(dp, desc_kmajor(sDOc, Tr::kQSlabBytes, kk),
                                     desc_kmajor(stage_k(s) + Tr::kKVBytes, Tr::kKVSlabBytes, kk),
                                     kk > 0);
      wgmma_commit();
    };
    auto issue_dq = [&](int s) {
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        Wgmma<T, D>::template rs<1>(dq, dsf + 4 * kk,
                                    desc_nmajor(stage_k(s) + kk * 16 * 128, Tr::kKVSlabBytes));
      wgmma_commit();
    };
    auto release = [&](int s) {
      if (lane == 0) mbar_arrive(empty(s));
    };

    // dS of tile t in float32, in place of S (the rule mask first, on partial tiles).
    auto ds_in_place = [&](int t) {
      int k0;
      bool masked;
      walk.at(p, t, q0, nq, k0, masked);
      if (masked) mask_block64(p, row0, k0, tq, sc);
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        const int r = (i >> 1) & 1;
        const float pr = exp2_approx(fmaf(sc[i], p.scale_log2, -lse2[r]));
        sc[i] = pr * (dp[i] - delta[r]);
      }
    };
    // Accumulator block j (columns 8j..8j+7) is half of A k-step j / 2.
    auto pack_ds = [&] {
#pragma unroll
      for (int j = 0; j < 16; ++j) dsf[j] = Elem<T>::pack(sc[2 * j], sc[2 * j + 1]);
    };

    // As in the forward: S/dP of tile t and dQ of t - 1 are issued together, and dS of t is
    // computed while that dQ still runs. The A fragments are packed only once it is done (a
    // register written while a wgmma reading registers is in flight makes the compiler
    // serialise the products), and nothing is in flight across the loop's back edge.
    mbar_wait(qd_full, 0);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = 64 * c + 16 * warp + g + 8 * r;  // in the CTA's tile
      float sum = 0.f;
#pragma unroll
      for (int m = 0; m < kMyChunks; ++m)
        sum += dot_chunk<T>(o_chunk[r][m],
                            ld_shared_v4(swizzled_chunk(sDO, Tr::kQSlabBytes, row, tq + 4 * m)));
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const int i = row0 + 8 * r;
      delta[r] = i < p.q_len ? sum : 0.f;
      if (tq == 0 && i < p.q_len) {
        const int64_t w = (int64_t(b) * p.heads_q + hq) * p.q_len + i;
        p.delta[w] = sum;
        p.lse2[w] = lse2[r];
      }
    }
    // Warp-uniform through a lane-0 shuffle, so that the loop state and the descriptors derived
    // from it live in uniform registers (as in the forward).
    const int count = __shfl_sync(0xffffffffu, walk.count, 0);
    if (count > 0) {
      mbar_wait(full(0), 0);
      issue_sdp(0);
      wgmma_wait<0>();
      fence_regs(sc);
      fence_regs(dp);
      ds_in_place(0);
      pack_ds();
      for (int t = 1; t < count; ++t) {
        const int s = t % S, ps = (t - 1) % S;
        mbar_wait(full(s), (t / S) & 1);
        issue_sdp(s);
        issue_dq(ps);
        wgmma_wait<1>();  // S/dP of t are done; dQ of t - 1 may still run
        fence_regs(sc);
        fence_regs(dp);
        ds_in_place(t);
        wgmma_wait<0>();
        fence_regs(dq);
        fence_regs(dsf);
        release(ps);
        pack_ds();
      }
      const int ls = (count - 1) % S;
      issue_dq(ls);
      wgmma_wait<0>();
      fence_regs(dq);
      fence_regs(dsf);
      release(ls);
    }

    T* dqb = row_ptr_mut<T>(p.dq, p.dq_stride, b, hq);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = row0 + 8 * r;
      if (i >= p.q_len) continue;
      T* row = dqb + int64_t(i) * p.dq_stride[2];
#pragma unroll
      for (int j = 0; j < D / 8; ++j)
        *reinterpret_cast<uint32_t*>(row + 8 * j + 2 * tq) =
            Elem<T>::pack(dq[4 * j + 2 * r] * p.scale, dq[4 * j + 2 * r + 1] * p.scale);
    }
  }
}

// ---- dk, dv ------------------------------------------------------------------------------------------
// Two CTA shapes, both with two consumer warpgroups:
//   narrow (kWide = false): 64 keys per CTA, steps of 128 query rows; consumer c takes rows
//     64c .. 64c + 63 of each step, so both hold partial dK, dV of all 64 keys, summed in the
//     epilogue. Any transposed plan whose block_q is a multiple of 128 (the 128 x 64 default).
//   wide (kWide = true): 128 keys per CTA, steps of 64 query rows read by both consumers;
//     consumer c owns keys 64c .. 64c + 63 outright. Per step it moves half the Q/dO bytes of
//     the narrow shape for the same products and needs no partial sums; it takes dense and
//     rule-only problems and plans whose block_k is a multiple of 128 (both halves of the CTA
//     then share one transposed plan row).
template <int D, bool kWide>
struct DkdvSm90Traits {
  static constexpr int kBlockK = kWide ? 128 : 64;  // keys per CTA
  static constexpr int kStepQ = kWide ? 64 : 128;   // query rows per step
  static constexpr int kConsumers = 2;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kSlabs = D / 64;
  static constexpr int kStages = kWide ? (D == 128 ? 4 : 6) : (D == 128 ? 2 : 3);
  static constexpr int kKVSlabBytes = kBlockK * 128;
  static constexpr int kKVBytes = kSlabs * kKVSlabBytes;
  static constexpr int kQSlabBytes = kStepQ * 128;
  static constexpr int kQBytes = kSlabs * kQSlabBytes;
  static constexpr int kStageBytes = 2 * kQBytes;    // Q, dO
  static constexpr int kStatBytes = 2 * kStepQ * 4;  // lse2[kStepQ], delta[kStepQ]
  static constexpr int kBarriers = 1 + 2 * kStages;  // kv_full, full[], empty[]
  // K, V, the Q/dO ring, the statistics ring, barriers, alignment slack.
  // D = 128: narrow 32 + 2 x 64 + 2 x 1 KiB = 162 KiB; wide 64 + 4 x 32 + 4 x 0.5 KiB = 195 KiB.
  static constexpr int kSmemBytes =
      2 * kKVBytes + kStages * (kStageBytes + kStatBytes) + 8 * kBarriers + 1024;
  static_assert(kSmemBytes <= 227 * 1024, "sm90 dk/dv shared memory over the per-block limit");
  // The narrow epilogue stages one consumer's dK and the other's dV partials (float32) in the
  // ring.
  static_assert(kWide || 2 * 128 * (D / 2) * 4 <= kStages * kStageBytes,
                "epilogue staging over the ring");
  static_assert(D == 64 || D == 128, "sm90 backward takes head dims 64 and 128");
  // Consumers hold dK and dV (2 x 64 at D = 128), S^T and dP^T (2 x 32) and the A fragments.
  static constexpr int kProducerRegs = 40, kConsumerRegs = 232;
  static_assert(128 * kProducerRegs + 128 * kConsumers * kConsumerRegs <= 65536,
                "register split over the register file");
  static constexpr int kStatWarp = 1;  // producer warp that copies lse2 and delta
};

// The (query head h of the GQA group, query step t) pairs one key CTA visits, in a fixed order:
// heads ascending, then the transposed plan row (full run, then partial run) or the rule's
// query range, in steps of kStepQ rows. A cursor: begin() settles on the first pair, next() on
// the following one (both false when done), at() reads the current pair. What depends only on
// the head (the transposed plan row, its counts; integer divisions) is looked up when the head
// changes, so a step costs one index load and no division.
template <int kStepQ>
struct QueryStepWalk {
  TileSource source;
  int b, hk, k0, nk, bk;    // bk: the CTA's keys (masks of rule-only steps)
  int first, range_count;  // dense: the same steps for every head
  int h, t;                // the current pair
  int count;               // steps of head h
  int pi, rem;             // native: t = pi * sub + rem, pi the plan entry of the step
  int sub, num_full;       // native: steps per plan entry; full entries of head h's row
  const int32_t* run;      // native: head h's transposed plan row

  __device__ bool begin(const AttnParams& p) {
    h = 0;
    t = pi = rem = 0;
    if (source == TileSource::native) sub = p.tplan.block_q / kStepQ;
    enter_head(p);
    return settle(p);
  }
  __device__ bool next(const AttnParams& p) {
    ++t;
    if (source == TileSource::native && ++rem == sub) {
      rem = 0;
      ++pi;
    }
    return settle(p);
  }
  __device__ void at(const AttnParams& p, int& q0, bool& masked) const {
    if (source == TileSource::native) {
      q0 = run[pi] * p.tplan.block_q + rem * kStepQ;
      masked = pi >= num_full;
    } else {
      q0 = (first + t) * kStepQ;
      masked = !tile_is_full(p, q0, min(kStepQ, p.q_len - q0), k0, nk, kStepQ, bk);
    }
  }

 private:
  __device__ void enter_head(const AttnParams& p) {
    if (source != TileSource::native) {
      count = range_count;
      return;
    }
    const int hq = hk * p.group + h;
    const int64_t row = plan_row(p.tplan, b, plan_head(p.tplan, hq, p.heads_q), k0 / p.tplan.block_k);
    run = p.tplan.index + row * p.tplan.capacity;
    num_full = p.tplan.num_full[row];
    count = (num_full + p.tplan.num_partial[row]) * sub;
  }
  // Moves past heads with no steps left; false when done.
  __device__ bool settle(const AttnParams& p) {
    while (t >= count) {
      if (++h >= p.group) return false;
      t = pi = rem = 0;
      enter_head(p);
    }
    return true;
  }
};

template <class T, int D, bool kWide>
__global__ void __launch_bounds__(DkdvSm90Traits<D, kWide>::kThreads, 1)
    attention_dkdv_sm90_kernel(const __grid_constant__ AttnParams p,
                               const __grid_constant__ BackwardMaps maps) {
  using Tr = DkdvSm90Traits<D, kWide>;
  constexpr int S = Tr::kStages;
  constexpr int kStepQ = Tr::kStepQ;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t sK = (raw + 1023u) & ~1023u;
  const uint32_t sV = sK + Tr::kKVBytes;
  const uint32_t sRing = sV + Tr::kKVBytes;  // stage s: Q at sRing + s * kStageBytes, dO after
  const uint32_t sStats = sRing + S * Tr::kStageBytes;  // stage s: lse2[kStepQ], delta[kStepQ]
  const uint32_t bars = sStats + S * Tr::kStatBytes;
  const uint32_t kv_full = bars;
  auto full = [&](int s) { return bars + 8u * (1 + s); };
  auto empty = [&](int s) { return bars + 8u * (1 + S + s); };

  const int kt = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int k0 = kt * Tr::kBlockK;
  const int nk = min(Tr::kBlockK, p.k_len - k0);
  QueryStepWalk<kStepQ> walk{};
  walk.source = p.source;
  walk.b = b;
  walk.hk = hk;
  walk.k0 = k0;
  walk.nk = nk;
  walk.bk = Tr::kBlockK;
  if (p.source != TileSource::native) {
    const int2 r = query_tile_range(p, k0, k0 + nk, kStepQ);
    walk.first = r.x;
    walk.range_count = r.y - r.x;
  }
  const int wg = threadIdx.x / 128;

  if (threadIdx.x == 0) {
    mbar_init(kv_full, 1);
    for (int s = 0; s < S; ++s) {
      mbar_init(full(s), 1 + 32);  // the TMA thread's expect_tx + the statistics warp's lanes
      // Every consumer thread arrives: each read the statistics of the stage with its own
      // loads, and each arrival orders that thread's loads before the stage is refilled.
      mbar_init(empty(s), Tr::kConsumers * 128);
    }
    mbar_fence_init();
  }
  __syncthreads();

  if (wg == 0) {
    // ---- producer: thread 0 issues TMA, warp kStatWarp copies lse2 and delta ----
    regs_dealloc<Tr::kProducerRegs>();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const bool tma = threadIdx.x == 0, stats = warp == Tr::kStatWarp;
    if (tma) {
      tma_prefetch_map(&maps.q);
      tma_prefetch_map(&maps.dout);
      mbar_arrive_expect_tx(kv_full, 2 * Tr::kKVBytes);
#pragma unroll
      for (int sl = 0; sl < Tr::kSlabs; ++sl) {
        tma_load_4d(sK + sl * Tr::kKVSlabBytes, &maps.k, kv_full, sl * 64, k0, hk, b);
        tma_load_4d(sV + sl * Tr::kKVSlabBytes, &maps.v, kv_full, sl * 64, k0, hk, b);
      }
    }
    if (tma || stats) {
      int n = 0;
      for (bool have = walk.begin(p); have; ++n, have = walk.next(p)) {
        const int s = n % S;
        if (n >= S) mbar_wait(empty(s), ((n / S) - 1) & 1);
        int q0;
        bool masked;
        walk.at(p, q0, masked);
        const int hq = hk * p.group + walk.h;
        if (tma) {
          const uint32_t sQ = sRing + s * Tr::kStageBytes;
          mbar_arrive_expect_tx(full(s), Tr::kStageBytes);
#pragma unroll
          for (int sl = 0; sl < Tr::kSlabs; ++sl) {
            tma_load_4d(sQ + sl * Tr::kQSlabBytes, &maps.q, full(s), sl * 64, q0, hq, b);
            tma_load_4d(sQ + Tr::kQBytes + sl * Tr::kQSlabBytes, &maps.dout, full(s), sl * 64,
                        q0, hq, b);
          }
        } else {
          // Rows past the end: lse2 = +inf, so their P is 0 whatever S is.
          const int64_t w0 = (int64_t(b) * p.heads_q + hq) * p.q_len;
          const uint32_t st = sStats + s * Tr::kStatBytes;
#pragma unroll
          for (int i = lane; i < kStepQ; i += 32) {
            const bool valid = q0 + i < p.q_len;
            bwd_st_shared_f32(st + 4 * i, valid ? p.lse2[w0 + q0 + i] : INFINITY);
            bwd_st_shared_f32(st + 4 * (kStepQ + i), valid ? p.delta[w0 + q0 + i] : 0.f);
          }
          mbar_arrive(full(s));  // release: the stores above are visible to the waiters
        }
      }
    }
  } else {
    // ---- consumers ----
    regs_alloc<Tr::kConsumerRegs>();
    const int c = wg - 1;
    const int tid = threadIdx.x & 127, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, tq = lane & 3;
    // Wide: this consumer's 64 keys and every query row of the step. Narrow: all 64 keys and
    // query rows 64c .. 64c + 63 of the step.
    const int key_off = kWide ? 64 * c : 0, query_off = kWide ? 0 : 64 * c;
    const uint32_t sKc = sK + key_off * 128, sVc = sV + key_off * 128;
    const int key0 = k0 + key_off + 16 * warp + g;  // this thread's keys: key0, key0 + 8

    float dk[D / 2], dv[D / 2];  // 64 keys x D per warpgroup (narrow: this consumer's queries)
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;

    mbar_wait(kv_full, 0);
    int n = 0;
    for (bool have = walk.begin(p); have; ++n, have = walk.next(p)) {
      const int s = n % S;
      int q0;
      bool masked;
      walk.at(p, q0, masked);
      const uint32_t sQc = sRing + s * Tr::kStageBytes + query_off * 128;
      const uint32_t sDOc = sQc + Tr::kQBytes;
      const uint32_t st = sStats + s * Tr::kStatBytes + query_off * 4;
      mbar_wait(full(s), (n / S) & 1);

      float sc[32], dp[32];  // S^T and dP^T: 64 keys x 64 queries
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        Wgmma<T, 64>::template ss<0>(sc, desc_kmajor(sKc, Tr::kKVSlabBytes, kk),
                                     desc_kmajor(sQc, Tr::kQSlabBytes, kk), kk > 0);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        Wgmma<T, 64>::template ss<0>(dp, desc_kmajor(sVc, Tr::kKVSlabBytes, kk),
                                     desc_kmajor(sDOc, Tr::kQSlabBytes, kk), kk > 0);
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(sc);
      fence_regs(dp);

      if (masked) {
        const int i0 = q0 + query_off + 2 * tq;
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (!rule_allows(p, i0 + 8 * j + (e & 1), key0 + 8 * (e >> 1))) sc[4 * j + e] = -INFINITY;
      }
      // Column (query) statistics; accumulator block j holds columns 8j + 2tq, 8j + 2tq + 1.
      uint32_t pf[16], dsf[16];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float2 l = bwd_ld_shared_f2(st + 4 * (8 * j + 2 * tq));
        const float2 d = bwd_ld_shared_f2(st + 4 * (kStepQ + 8 * j + 2 * tq));
        float pv[4], ds[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float lv = (e & 1) ? l.y : l.x, dl = (e & 1) ? d.y : d.x;
          pv[e] = exp2_approx(fmaf(sc[4 * j + e], p.scale_log2, -lv));
          ds[e] = pv[e] * (dp[4 * j + e] - dl);
        }
        pf[2 * j] = Elem<T>::pack(pv[0], pv[1]);
        pf[2 * j + 1] = Elem<T>::pack(pv[2], pv[3]);
        dsf[2 * j] = Elem<T>::pack(ds[0], ds[1]);
        dsf[2 * j + 1] = Elem<T>::pack(ds[2], ds[3]);
      }
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        Wgmma<T, D>::template rs<1>(dv, pf + 4 * kk,
                                    desc_nmajor(sDOc + kk * 16 * 128, Tr::kQSlabBytes));
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        Wgmma<T, D>::template rs<1>(dk, dsf + 4 * kk,
                                    desc_nmajor(sQc + kk * 16 * 128, Tr::kQSlabBytes));
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(dv);
      fence_regs(dk);
      fence_regs(pf);
      fence_regs(dsf);
      mbar_arrive(empty(s));
    }

    // ---- epilogue ----
    auto store = [&](const float(&acc)[D / 2], T* base, int64_t rs, float mul) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int j = key0 + 8 * r;
        if (j >= p.k_len) continue;
        T* row = base + int64_t(j) * rs;
#pragma unroll
        for (int jj = 0; jj < D / 8; ++jj)
          *reinterpret_cast<uint32_t*>(row + 8 * jj + 2 * tq) =
              Elem<T>::pack(acc[4 * jj + 2 * r] * mul, acc[4 * jj + 2 * r + 1] * mul);
      }
    };
    T* const dk_base = row_ptr_mut<T>(p.dk, p.dk_stride, b, hk);
    T* const dv_base = row_ptr_mut<T>(p.dv, p.dv_stride, b, hk);
    if constexpr (kWide) {
      store(dk, dk_base, p.dk_stride[2], p.scale);
      store(dv, dv_base, p.dv_stride[2], 1.f);
    } else {
      // dK = dK_0 + dK_1 (consumer 0 stores), dV = dV_1 + dV_0 (consumer 1). Both consumers
      // are past their last products, so the Q/dO ring is free: consumer 1 stages its dK
      // partial, consumer 0 its dV partial, thread-interleaved (conflict-free).
      consumers_sync();
      const uint32_t part_dk = sRing, part_dv = sRing + 128 * (D / 2) * 4;
      // Register arrays are picked by branch, never through a pointer (which would put them
      // in local memory).
      auto stage_part = [&](const float(&src)[D / 2], uint32_t dst) {
#pragma unroll
        for (int i = 0; i < D / 2; ++i) bwd_st_shared_f32(dst + 4 * (i * 128 + tid), src[i]);
      };
      if (c == 1) stage_part(dk, part_dk);
      else stage_part(dv, part_dv);
      consumers_sync();
      auto add_part = [&](float(&acc)[D / 2], uint32_t other) {
#pragma unroll
        for (int i = 0; i < D / 2; ++i) acc[i] += bwd_ld_shared_f32(other + 4 * (i * 128 + tid));
      };
      if (c == 0) {
        add_part(dk, part_dk);
        store(dk, dk_base, p.dk_stride[2], p.scale);
      } else {
        add_part(dv, part_dv);
        store(dv, dv_base, p.dv_stride[2], 1.f);
      }
    }
  }
}

// ---- host launchers (instantiated once per dtype and head dim) --------------------------------------
// Both return cudaErrorNotSupported, launching nothing, for what they do not take (generic
// plans, empty sequences, transposed plans that fit neither dk/dv CTA shape) or when the driver
// refuses a tensor map; the dispatcher then runs the mma.sync kernel.
template <class T, int D>
bool backward_maps(const AttnParams& p, BackwardMaps* m, int q_box, int kv_box) {
  constexpr bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  return encode_map(&m->q, p.q, p.q_stride, bf16, D, p.q_len, p.heads_q, p.batch, q_box) &&
         encode_map(&m->dout, p.dout, p.do_stride, bf16, D, p.q_len, p.heads_q, p.batch, q_box) &&
         encode_map(&m->k, p.k, p.k_stride, bf16, D, p.k_len, p.heads_kv, p.batch, kv_box) &&
         encode_map(&m->v, p.v, p.v_stride, bf16, D, p.k_len, p.heads_kv, p.batch, kv_box);
}

template <class T, int D>
cudaError_t launch_dq_sm90(const AttnParams& p, cudaStream_t stream) {
  using Tr = DqSm90Traits<D>;
  if (p.source == TileSource::generic || p.k_len <= 0 || p.q_len <= 0) return cudaErrorNotSupported;
  BackwardMaps maps;
  if (!backward_maps<T, D>(p, &maps, Tr::kBlockQ, Tr::kBlockK)) return cudaErrorNotSupported;
  auto kernel = attention_dq_sm90_kernel<T, D>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       Tr::kSmemBytes);
  if (e != cudaSuccess) return e;
  const dim3 grid((p.q_len + Tr::kBlockQ - 1) / Tr::kBlockQ, p.heads_q, p.batch);
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p, maps);
  return cudaGetLastError();
}

template <class T, int D, bool kWide>
cudaError_t launch_dkdv_shape(const AttnParams& p, cudaStream_t stream) {
  using Tr = DkdvSm90Traits<D, kWide>;
  BackwardMaps maps;
  if (!backward_maps<T, D>(p, &maps, Tr::kStepQ, Tr::kBlockK)) return cudaErrorNotSupported;
  auto kernel = attention_dkdv_sm90_kernel<T, D, kWide>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       Tr::kSmemBytes);
  if (e != cudaSuccess) return e;
  const dim3 grid((p.k_len + Tr::kBlockK - 1) / Tr::kBlockK, p.heads_kv, p.batch);
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p, maps);
  return cudaGetLastError();
}

// The CTA shape dkdv_shape (backward_sm90.hpp) picks.
template <class T, int D>
cudaError_t launch_dkdv_sm90(const AttnParams& p, cudaStream_t stream) {
  switch (dkdv_shape(p)) {
    case DkdvShape::wide: return launch_dkdv_shape<T, D, true>(p, stream);
    case DkdvShape::narrow: return launch_dkdv_shape<T, D, false>(p, stream);
    case DkdvShape::none: break;
  }
  return cudaErrorNotSupported;
}

}  // namespace spattn::cuda::sm90
