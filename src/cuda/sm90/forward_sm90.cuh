// Block-sparse attention forward for Hopper (sm_90a): wgmma + TMA, FlashAttention-3 style.
//
// One CTA per (128 query rows, query head, batch) = one row of a 128 x 64 plan. The row's
// 64-key tiles (plan order: full run, then partial run) are taken two at a time: a step of 128
// keys gathers tiles 2u and 2u + 1, which need not be adjacent, into one K (and V) stage, so
// the softmax bookkeeping and the barriers are paid once per 128 keys. An odd last tile is a
// half step with 64-key products. At head dim 256 a step is one tile (O alone holds 128
// registers per thread) and the ring two stages. Three warpgroups:
//   warpgroup 0 (producer): one thread issues TMA copies: Q once, then per step the K and V
//     rows of its two tiles into a kStages-deep ring; setmaxnreg gives its registers to the
//     consumers.
//   warpgroups 1, 2 (consumers): 64 query rows each. Per step:
//     S = Q K^T   wgmma m64n128k16, A = Q and B = K from 128B-swizzled shared memory
//     online softmax in registers (log2 units, ex2.approx); the element mask only on tiles the
//       plan marks partial (or, dense, tiles the rule cuts)
//     O += P V    wgmma m64n{D}k16 over the step's keys, A = P from registers, B = V (N-major)
//   Inside a consumer the products overlap the softmax: S of step u+1 and P V of step u are in
//   flight while the softmax of u+1 runs (FlashAttention-3's intra-warpgroup pipelining).
// The epilogue stages O through the consumer's half of the Q buffer for 16-byte stores.
#pragma once

#include <cfloat>
#include <type_traits>

#include "cuda/device_common.cuh"
#include "cuda/forward_kernel.cuh"  // KeyTileWalk, make_key_walk: the same tile order and masks
#include "cuda/sm90/sm90_primitives.cuh"

namespace spattn::cuda::sm90 {

template <int D>
struct ForwardSm90Traits {
  static constexpr int kBlockQ = 128;  // = plan block_q: one CTA per plan row
  static constexpr int kBlockK = 64;   // = plan block_k: the TMA box of one tile
  // Keys per step: two tiles; one at D = 256, where O alone takes 128 registers per thread.
  static constexpr int kTilesPerStep = D == 256 ? 1 : 2;
  static constexpr int kStepK = kTilesPerStep * kBlockK;
  static constexpr int kConsumers = 2;  // warpgroups of 64 query rows (wgmma M = 64)
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kSlab = 64;     // columns per 128-byte swizzle row (16-bit elements)
  static constexpr int kSlabs = D / kSlab;
  static constexpr int kStages = D == 256 ? 2 : D == 128 ? 3 : 4;
  static constexpr int kQSlabBytes = kBlockQ * 128;      // 128 rows x 64 columns
  static constexpr int kQBytes = kSlabs * kQSlabBytes;
  static constexpr int kKVSlabBytes = kStepK * 128;      // kStepK rows x 64 columns
  static constexpr int kKVBytes = kSlabs * kKVSlabBytes; // one K (or V) stage: kStepK keys
  static constexpr int kTileSlabBytes = kBlockK * 128;   // one tile's rows in a slab
  static constexpr int kTileBytes = kSlabs * kTileSlabBytes;  // one tile of K (or V)
  static constexpr int kBarriers = 1 + 3 * kStages;      // q_full, k_full[], v_full[], empty[]
  // Q, the K ring, the V ring, barriers, and slack to align the base to 1024 bytes (the
  // 128-byte swizzle atom).
  static constexpr int kSmemBytes = kQBytes + 2 * kStages * kKVBytes + 8 * kBarriers + 1024;
  static_assert(kSmemBytes <= 227 * 1024, "sm90 forward shared memory over the per-block limit");
  static_assert(D == 64 || D == 128 || D == 256, "sm90 forward takes head dims 64, 128, 256");
  // Register split: the producer warpgroup keeps 24, each consumer gets 240
  // (128 x 24 + 256 x 240 = 64512 of the SM's 65536).
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
  static_assert(128 * kProducerRegs + 128 * kConsumers * kConsumerRegs <= 65536,
                "register split over the register file");
};

// TMA descriptors of Q, K, V: 4-d (d, row, head, batch) maps with boxes of 64 columns by 128
// (Q) or 64 (K, V) rows, 128-byte swizzle. Passed as one __grid_constant__ kernel parameter.
struct TensorMaps {
  CUtensorMap q, k, v;
};

// The keys of a forward step whose score registers are the array X (sc, or sh for a half
// step): one wgmma accumulator holds two columns per thread.
template <class X>
constexpr int kStepKeys = 2 * int(std::extent_v<std::remove_reference_t<X>>);

// kPingPong: the two consumers take turns on the tensor cores (FlashAttention-3's warpgroup
// ping-pong): a consumer issues its products only after the other has issued its own, so one
// warpgroup's softmax runs while the other's products execute.
template <class T, int D, bool kPingPong>
__global__ void __launch_bounds__(ForwardSm90Traits<D>::kThreads, 1)
    attention_forward_sm90_kernel(const __grid_constant__ AttnParams p,
                                  const __grid_constant__ TensorMaps maps) {
  using Tr = ForwardSm90Traits<D>;
  constexpr int S = Tr::kStages;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t sQ = (smem_addr(smem_raw) + 1023u) & ~1023u;
  const uint32_t sK = sQ + Tr::kQBytes;             // stage s at sK + s * kKVBytes
  const uint32_t sV = sK + S * Tr::kKVBytes;        // stage s at sV + s * kKVBytes
  const uint32_t bars = sV + S * Tr::kKVBytes;
  const uint32_t q_full = bars;
  auto k_full = [&](int s) { return bars + 8u * (1 + s); };
  auto v_full = [&](int s) { return bars + 8u * (1 + S + s); };
  auto empty = [&](int s) { return bars + 8u * (1 + 2 * S + s); };

  // Heaviest query tiles (causal: the last ones) first.
  const int qt = gridDim.x - 1 - blockIdx.x;
  const int hq = blockIdx.y, b = blockIdx.z;
  const int hk = hq / p.group;
  const int q0 = qt * Tr::kBlockQ;
  const int nq = min(Tr::kBlockQ, p.q_len - q0);
  const KeyTileWalk walk = make_key_walk(p, b, hq, q0);
  const int wg = threadIdx.x / 128;

  if (threadIdx.x == 0) {
    mbar_init(q_full, 1);
    for (int s = 0; s < S; ++s) {
      mbar_init(k_full(s), 1);
      mbar_init(v_full(s), 1);
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
      mbar_arrive_expect_tx(q_full, Tr::kQBytes);
#pragma unroll
      for (int sl = 0; sl < Tr::kSlabs; ++sl)
        tma_load_4d(sQ + sl * Tr::kQSlabBytes, &maps.q, q_full, sl * Tr::kSlab, q0, hq, b);
      constexpr int kTiles = Tr::kTilesPerStep;
      const int steps = (walk.count + kTiles - 1) / kTiles;
      for (int u = 0; u < steps; ++u) {
        const int s = u % S;
        if (u >= S) mbar_wait(empty(s), ((u / S) - 1) & 1);  // consumers released step u - S
        // An odd last step (half step) holds one tile; its other rows are never read.
        const int tiles = min(kTiles, walk.count - kTiles * u);
        int k0[kTiles];
        bool masked;
#pragma unroll
        for (int h = 0; h < kTiles; ++h)
          if (h < tiles) walk.at(p, kTiles * u + h, q0, nq, k0[h], masked);
        // Tile h of the step fills rows 64h .. 64h + 63 of every slab of the stage.
        auto load_stage = [&](uint32_t stage, const CUtensorMap* map, uint32_t bar) {
          mbar_arrive_expect_tx(bar, tiles * Tr::kTileBytes);
#pragma unroll
          for (int h = 0; h < kTiles; ++h)
            if (h < tiles) {
#pragma unroll
              for (int sl = 0; sl < Tr::kSlabs; ++sl)
                tma_load_4d(stage + sl * Tr::kKVSlabBytes + h * Tr::kTileSlabBytes, map, bar,
                            sl * Tr::kSlab, k0[h], hk, b);
            }
        };
        load_stage(sK + s * Tr::kKVBytes, &maps.k, k_full(s));
        load_stage(sV + s * Tr::kKVBytes, &maps.v, v_full(s));
      }
    }
    return;
  }

  // ---- consumers ----
  regs_alloc<Tr::kConsumerRegs>();
  const int c = wg - 1;  // rows 64c .. 64c + 63 of the CTA's query tile
  const int tid = threadIdx.x & 127, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, tq = lane & 3;
  const int row0 = q0 + 64 * c + 16 * warp + g;  // this thread's rows: row0, row0 + 8

  // Descriptors. Q (A, K-major): 64 rows of this consumer, k-step kk = 16 columns.
  auto desc_q = [&](int kk) {
    return smem_desc(sQ + (kk / 4) * Tr::kQSlabBytes + c * 64 * 128 + (kk % 4) * 32, 16, 1024);
  };
  // K (B, K-major): the step's kStepK keys x 16 columns.
  auto desc_k = [&](int s, int kk) {
    return smem_desc(sK + s * Tr::kKVBytes + (kk / 4) * Tr::kKVSlabBytes + (kk % 4) * 32, 16,
                     1024);
  };
  // V (B, N-major): keys 16kk .. 16kk + 15 of the step x D columns; the next 64 columns are
  // the next slab.
  auto desc_v = [&](int s, int kk) {
    return smem_desc(sV + s * Tr::kKVBytes + kk * 16 * 128, Tr::kKVSlabBytes, 1024);
  };

  constexpr int kTiles = Tr::kTilesPerStep, kStepK = Tr::kStepK;
  float o[D / 2];             // O accumulator, 64 x D per warpgroup
  float sc[kStepK / 2];       // S (then P in float32), 64 x kStepK per warpgroup
  float sh[Tr::kBlockK / 2];  // the same for a half step (64 keys)
  uint32_t pf[kStepK / 4];    // P as A fragments: kStepK / 16 k-steps x 4 registers
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
#pragma unroll
  for (int i = 0; i < kStepK / 2; ++i) sc[i] = 0.f;
#pragma unroll
  for (int i = 0; i < kStepK / 4; ++i) pf[i] = 0u;
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 units
  float row_sum[2] = {0.f, 0.f};              // this thread's partial sums

  // A lane-0 shuffle tells the compiler the count is warp-uniform, so the loop counter, ring
  // position and wgmma descriptors derived from it live in uniform registers.
  const int count = __shfl_sync(0xffffffffu, walk.count, 0);  // 64-key tiles
  const int steps = (count + kTiles - 1) / kTiles;
  // An odd count (kTiles == 2) ends in a half step: its products cover 64 keys, and its scores
  // go to their own registers (sh), since wgmma shapes that differ writing the same
  // accumulators make the compiler insert waits that serialise the pipeline.
  const bool half_last = kTiles == 2 && (count & 1);
  const int full_steps = half_last ? steps - 1 : steps;
  // P V widths in tiles, as types so the product count is compile-time.
  using FullStep = std::integral_constant<int, kTiles>;
  using HalfStep = std::integral_constant<int, 1>;
  auto issue_s = [&](auto& x, int s) {
    constexpr int kN = kStepKeys<decltype(x)>;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      Wgmma<T, kN>::template ss<0>(x, desc_q(kk), desc_k(s, kk), kk > 0 ? 1 : 0);
    wgmma_commit();
  };
  // O += P V in products of at most 128 columns (D = 256: two, on O's halves; the flat
  // accumulator layout is the same as one 256-column product's). Half n of V starts 2n slabs
  // further on; the descriptor holds its start address in 16-byte units in its low bits.
  constexpr int kPvN = D > 128 ? 128 : D;
  auto issue_pv = [&](int s, auto tiles) {
    constexpr int kN = decltype(tiles)::value * Tr::kBlockK;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk)
#pragma unroll
      for (int n = 0; n < D / kPvN; ++n)
        Wgmma<T, kPvN>::template rs<1>(o + n * (kPvN / 2), pf + 4 * kk,
                                       desc_v(s, kk) + ((2 * n * Tr::kKVSlabBytes) >> 4));
    wgmma_commit();
  };
  // Mask (partial tiles only), online softmax of step u in place: x (sc or sh) becomes P
  // (float32). Accumulator block j (8 columns) belongs to tile kTiles * u + j / 8.
  // The running max moves lazily (update_row_max): most steps skip the O rescale. Returns
  // whether O must be rescaled by alpha (warp-uniform).
  auto softmax = [&](auto& x, int u, float (&alpha)[2]) -> bool {
    constexpr int kN = kStepKeys<decltype(x)>;
#pragma unroll
    for (int h = 0; h < kN / Tr::kBlockK; ++h) {
      int k0;
      bool masked;
      walk.at(p, kTiles * u + h, q0, nq, k0, masked);
      if (masked) mask_block64(p, row0, k0, tq, x + 32 * h);
    }
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < kN / 8; ++j) {
      mx[0] = fmaxf(mx[0], fmaxf(x[4 * j], x[4 * j + 1]));
      mx[1] = fmaxf(mx[1], fmaxf(x[4 * j + 2], x[4 * j + 3]));
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      mx[r] *= p.scale_log2;
    }
    float base[2];
    const bool moved = update_row_max(mx, row_max, row_sum, alpha, base);
#pragma unroll
    for (int j = 0; j < kN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const float pv = exp2_approx(fmaf(x[4 * j + e], p.scale_log2, -base[r]));
        x[4 * j + e] = pv;
        row_sum[r] += pv;
      }
    return moved;
  };
  // P (accumulator layout) -> A fragments: k-step kk covers accumulator blocks 2kk, 2kk + 1.
  auto pack_p = [&](auto& x) {
    constexpr int kN = kStepKeys<decltype(x)>;
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        pf[4 * kk + i] = Elem<T>::pack(x[8 * kk + 2 * i], x[8 * kk + 2 * i + 1]);
  };
  auto rescale_o = [&](const float* alpha) {
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] *= alpha[(i >> 1) & 1];
  };
  // Each consumer warp arrives once: the producer may refill the stage.
  auto release = [&](int s) {
    if (lane == 0) mbar_arrive(empty(s));
  };

  // Turn-taking: consumer c waits on named barrier 3 + c (its 128 threads plus the other
  // consumer's 128 arrivals) before issuing, and arrives on the other's after issuing. Consumer
  // 0 goes first; consumer 1 skips its last arrival, so every barrier phase completes.
  int turns_left = steps + 1;  // issue points: S_0, (S_u, PV_{u-1}) for u >= 1, PV_last
  auto turn_begin = [&] {
    if constexpr (kPingPong) asm volatile("bar.sync %0, 256;\n" ::"r"(3 + c) : "memory");
  };
  auto turn_end = [&] {
    if constexpr (kPingPong) {
      --turns_left;
      if (c == 0 || turns_left > 0) asm volatile("bar.arrive %0, 256;\n" ::"r"(4 - c) : "memory");
    }
  };
  if constexpr (kPingPong) {
    if (c == 1 && steps > 0) asm volatile("bar.arrive 3, 256;\n" ::: "memory");
  }

  // Step 0 (x: its score registers): S_0 = Q K_0, its softmax, P_0 packed.
  float alpha[2];
  auto first_step = [&](auto& x) {
    mbar_wait(k_full(0), 0);
    turn_begin();
    issue_s(x, 0);
    turn_end();
    wgmma_wait<0>();
    fence_regs(x);
    softmax(x, 0, alpha);
    pack_p(x);
  };
  // Step u > 0: S_u = Q K_u issued with O += P_{u-1} V_{u-1} (a full step's), the softmax of u
  // while P V runs, then O rescaled if the max moved and P_u packed.
  auto next_step = [&](auto& x, int u) {
    const int s = u % S, ps = (u - 1) % S;
    mbar_wait(k_full(s), (u / S) & 1);
    mbar_wait(v_full(ps), ((u - 1) / S) & 1);
    turn_begin();
    issue_s(x, s);
    issue_pv(ps, FullStep{});
    turn_end();
    wgmma_wait<1>();  // S_u is done; P V may still run
    fence_regs(x);
    const bool moved = softmax(x, u, alpha);
    wgmma_wait<0>();
    fence_regs(o);
    fence_regs(pf);
    release(ps);
    if (moved) rescale_o(alpha);
    pack_p(x);
  };

  mbar_wait(q_full, 0);
  if (full_steps > 0) {
    first_step(sc);
    for (int u = 1; u < full_steps; ++u) next_step(sc, u);
  }
  if constexpr (kTiles == 2) {
    if (half_last) {
      if (full_steps == 0)
        first_step(sh);
      else
        next_step(sh, full_steps);
    }
  }
  if (steps > 0) {
    const int ls = (steps - 1) % S;
    mbar_wait(v_full(ls), ((steps - 1) / S) & 1);
    turn_begin();
    if (half_last)
      issue_pv(ls, HalfStep{});
    else
      issue_pv(ls, FullStep{});
    turn_end();
    wgmma_wait<0>();
    fence_regs(o);
    fence_regs(pf);
    release(ls);
  }

  // ---- epilogue: normalise, stage O in this consumer's rows of the Q buffer, store ----
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
    inv[r] = row_sum[r] > 0.f ? 1.f / row_sum[r] : 0.f;
  }
  // Every warp of this consumer is done reading its Q rows (its products have completed).
  warpgroup_sync(1 + c);
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int R = 64 * c + 16 * warp + g + 8 * r;  // row in the CTA tile
      const uint32_t addr = swizzled_chunk(sQ, Tr::kQSlabBytes, R, j) + tq * 4;
      st_shared_u32(addr, Elem<T>::pack(o[4 * j + 2 * r] * inv[r], o[4 * j + 2 * r + 1] * inv[r]));
    }
  warpgroup_sync(1 + c);
  T* ob = row_ptr_mut<T>(p.out, p.o_stride, b, hq);
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
#pragma unroll
  for (int it = 0; it < 64 * kChunks / 128; ++it) {
    const int idx = it * 128 + tid;
    const int r = idx / kChunks, ch = idx % kChunks;
    const int R = 64 * c + r;
    const int i = q0 + R;
    if (i < p.q_len) {
      const uint4 v = ld_shared_v4(swizzled_chunk(sQ, Tr::kQSlabBytes, R, ch));
      *reinterpret_cast<uint4*>(ob + int64_t(i) * p.o_stride[2] + ch * 8) = v;
    }
  }
  if (tq == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = row0 + 8 * r;
      if (i < p.q_len) {
        const float lse = row_sum[r] > 0.f ? (row_max[r] + log2f(row_sum[r])) * 0.69314718056f
                                           : -INFINITY;
        p.lse[int64_t(b) * p.lse_stride[0] + int64_t(hq) * p.lse_stride[1] +
              int64_t(i) * p.lse_stride[2]] = lse;
      }
    }
  }
}

}  // namespace spattn::cuda::sm90

#include "cuda/sm90/tensor_map.hpp"

namespace spattn::cuda::sm90 {

// Host launcher, instantiated once per (dtype, head dim) in its own .cu file. Takes dense and
// native-plan problems (TileSource::generic stays on the mma.sync kernel) with k_len > 0.
template <class T, int D>
cudaError_t launch_forward_sm90(const AttnParams& p, cudaStream_t stream) {
  using Tr = ForwardSm90Traits<D>;
  if (p.source == TileSource::generic || p.k_len <= 0 || p.q_len <= 0)
    return cudaErrorNotSupported;
  constexpr bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  TensorMaps maps;
  if (!encode_map(&maps.q, p.q, p.q_stride, bf16, D, p.q_len, p.heads_q, p.batch, Tr::kBlockQ) ||
      !encode_map(&maps.k, p.k, p.k_stride, bf16, D, p.k_len, p.heads_kv, p.batch, Tr::kBlockK) ||
      !encode_map(&maps.v, p.v, p.v_stride, bf16, D, p.k_len, p.heads_kv, p.batch, Tr::kBlockK))
    return cudaErrorNotSupported;
  auto kernel = attention_forward_sm90_kernel<T, D, true>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       Tr::kSmemBytes);
  if (e != cudaSuccess) return e;
  const dim3 grid((p.q_len + Tr::kBlockQ - 1) / Tr::kBlockQ, p.heads_q, p.batch);
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p, maps);
  return cudaGetLastError();
}

}  // namespace spattn::cuda::sm90
