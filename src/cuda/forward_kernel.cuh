// Block-sparse attention forward, FlashAttention-2 style on mma.sync (m16n8k16): one CTA per
// (query tile of 128 rows, query head, batch); 8 warps, each owning 16 query rows; key/value
// tiles of 64 rows double-buffered through cp.async; online softmax in registers.
#pragma once

#include <cfloat>

#include "cuda/device_common.cuh"

namespace spattn::cuda {

template <int D>
struct ForwardTraits {
  static constexpr int kBlockQ = 128;  // = the default plan block_q: one CTA per plan row
  static constexpr int kBlockK = 64;   // = the default plan block_k: one step per plan tile
  static constexpr int kWarps = kBlockQ / 16;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kStages = 2;
  // Q stays in registers for D <= 128 (32 registers per thread at D = 128).
  static constexpr bool kQInRegisters = D <= 128;
  static constexpr int kTileQBytes = kBlockQ * D * 2;
  static constexpr int kTileKBytes = kBlockK * D * 2;
  static constexpr int kSmemBytes = kTileQBytes + kStages * 2 * kTileKBytes;
  // Two CTAs per SM at D = 128 (2 x 96 KiB of the 227 KiB an H100 SM offers).
  static_assert(kSmemBytes <= 227 * 1024, "forward shared memory over the sm_90 budget");
  static_assert(D % 64 == 0, "head dim must be a multiple of 64");
};

// Walks the key tiles one CTA visits; index t in [0, count).
struct KeyTileWalk {
  TileSource source;
  const int32_t* index;  // native: the plan row's run (full, then partial)
  int num_full, sub;     // native: listed full tiles; kernel tiles per plan tile
  int sub_shift;         // native: log2(sub) when sub is a power of two (no division per tile), else -1
  int block_k, first;    // range sources: first kernel tile
  int rows;              // the CTA's query rows (range sources: which tiles are full)
  int count;

  __device__ void at(const AttnParams& p, int t, int q0, int nq, int& k0, bool& masked) const {
    if (source == TileSource::native) {
      const int pi = sub_shift >= 0 ? t >> sub_shift : t / sub;
      k0 = index[pi] * block_k + (t - pi * sub) * 64;
      masked = pi >= num_full;
    } else {
      k0 = (first + t) * 64;
      const int nk = min(64, p.k_len - k0);
      masked = source == TileSource::generic || !tile_is_full(p, q0, nq, k0, nk, rows, 64);
    }
  }
};

// The walk of the CTA whose query rows are [q0, q0 + rows) (rows: 128, or 64 for the head-dim
// 256 dq pass). Native plans have block_q >= 128, so the rows lie in one plan row; generic
// plans are looked up per warp (generic_plan_row).
__device__ __forceinline__ KeyTileWalk make_key_walk(const AttnParams& p, int b, int hq, int q0,
                                                     int rows = 128) {
  KeyTileWalk w{};
  w.source = p.source;
  w.block_k = p.plan.block_k;
  w.rows = rows;
  const int q1 = min(q0 + rows, p.q_len);
  if (p.source == TileSource::native) {
    const int hp = plan_head(p.plan, hq, p.heads_q);
    const int64_t row = plan_row(p.plan, b, hp, q0 / p.plan.block_q);
    w.index = p.plan.index + row * p.plan.capacity;
    w.num_full = p.plan.num_full[row];
    w.sub = p.plan.block_k / 64;
    w.sub_shift = (w.sub & (w.sub - 1)) == 0 ? __ffs(w.sub) - 1 : -1;
    w.count = (w.num_full + p.plan.num_partial[row]) * w.sub;
  } else {
    const int2 r = key_tile_range(p, q0, q1, 64);
    w.first = r.x;
    w.count = r.y - r.x;
  }
  return w;
}

// cp.async of key tile t of `walk` (K, then V right after it) into double-buffer stage t & 1
// at sK0, as one commit group. Tr: the kernel's traits (kBlockK, kThreads, kTileKBytes).
template <class Tr, int D, class T>
__device__ __forceinline__ void load_kv_stage(const AttnParams& p, const KeyTileWalk& walk, int t,
                                              int q0, int nq, uint32_t sK0, const T* kb,
                                              const T* vb) {
  int k0;
  bool masked;
  walk.at(p, t, q0, nq, k0, masked);
  const uint32_t sk = sK0 + (t & 1) * 2 * Tr::kTileKBytes;
  load_tile<Tr::kBlockK, D, Tr::kThreads>(sk, kb, p.k_stride[2], k0, p.k_len);
  load_tile<Tr::kBlockK, D, Tr::kThreads>(sk + Tr::kTileKBytes, vb, p.v_stride[2], k0, p.k_len);
  cp_async_commit();
}

// Generic plans: the plan row of this warp's 16 query rows (block_q >= 16 keeps them in one
// row); 0 for other tile sources.
__device__ __forceinline__ int64_t generic_plan_row(const AttnParams& p, int b, int hq, int q0,
                                                    int warp) {
  if (p.source != TileSource::generic) return 0;
  const int hp = plan_head(p.plan, hq, p.heads_q);
  const int pr = min((q0 + warp * 16) / p.plan.block_q, p.plan.rows - 1);
  return plan_row(p.plan, b, hp, pr);
}

template <class T, int D>
__global__ void __launch_bounds__(ForwardTraits<D>::kThreads, 1)
    attention_forward_kernel(const __grid_constant__ AttnParams p) {
  using Tr = ForwardTraits<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, tq = lane & 3;
  // Heaviest query tiles (causal: the last ones) first.
  const int qt = gridDim.x - 1 - blockIdx.x;
  const int hq = blockIdx.y, b = blockIdx.z;
  const int hk = hq / p.group;
  const int q0 = qt * Tr::kBlockQ;
  const int nq = min(Tr::kBlockQ, p.q_len - q0);

  const uint32_t sQ = smem_addr(smem);
  const uint32_t sK0 = sQ + Tr::kTileQBytes;
  // Stage s: K at sK0 + s * 2 * tile, V right after it.
  const T* qb = row_ptr<T>(p.q, p.q_stride, b, hq);
  const T* kb = row_ptr<T>(p.k, p.k_stride, b, hk);
  const T* vb = row_ptr<T>(p.v, p.v_stride, b, hk);

  const KeyTileWalk walk = make_key_walk(p, b, hq, q0);

  load_tile<Tr::kBlockQ, D, Tr::kThreads>(sQ, qb, p.q_stride[2], q0, p.q_len);
  cp_async_commit();
  auto issue_kv = [&](int t) { load_kv_stage<Tr, D>(p, walk, t, q0, nq, sK0, kb, vb); };
  if (walk.count > 0) issue_kv(0);
  const int64_t generic_row = generic_plan_row(p, b, hq, q0, warp);

  float acc_o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) acc_o[i][0] = acc_o[i][1] = acc_o[i][2] = acc_o[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 units, rows g and g + 8
  float row_sum[2] = {0.f, 0.f};               // this lane's partial sums

  uint32_t q_frag[Tr::kQInRegisters ? D / 16 : 1][4];
  if (walk.count > 0) cp_async_wait<1>(); else cp_async_wait<0>();
  __syncthreads();
  if constexpr (Tr::kQInRegisters) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) frag_a<D>(q_frag[kk], sQ, warp * 16, kk * 16, lane);
  }

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

    // S = Q K^T: (16 rows, 64 keys) per warp, 8 n-blocks of 8 keys.
    float s[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a_tmp[4];
      const uint32_t* a;
      if constexpr (Tr::kQInRegisters) {
        a = q_frag[kk];
      } else {
        frag_a<D>(a_tmp, sQ, warp * 16, kk * 16, lane);
        a = a_tmp;
      }
#pragma unroll
      for (int n = 0; n < 8; n += 2) {
        uint32_t bf[4];
        frag_b_nt<D>(bf, sK, n * 8, kk * 16, lane);
        mma16816<T>(s[n], a, bf[0], bf[1]);
        mma16816<T>(s[n + 1], a, bf[2], bf[3]);
      }
    }

    // Element masking only inside partial tiles: the rule, both tails, and (generic plans)
    // whether each column's plan tile is listed for this warp's plan row.
    if (masked) {
      const uint64_t listed = p.source == TileSource::generic
                                  ? listed_columns(p.plan, generic_row, k0, p.plan.block_k)
                                  : ~uint64_t(0);
      const int i0 = q0 + warp * 16 + g;
#pragma unroll
      for (int n = 0; n < 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = n * 8 + 2 * tq + (e & 1);
          const int i = i0 + (e >> 1) * 8;
          if (!((listed >> c) & 1) || !rule_allows(p, i, k0 + c)) s[n][e] = -INFINITY;
        }
      }
    }

    // Online softmax in log2 units.
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      tile_max[0] = fmaxf(tile_max[0], fmaxf(s[n][0], s[n][1]));
      tile_max[1] = fmaxf(tile_max[1], fmaxf(s[n][2], s[n][3]));
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      tile_max[r] *= p.scale_log2;
    }
    float alpha[2], base[2];
    if (update_row_max(tile_max, row_max, row_sum, alpha, base)) {
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
        acc_o[i][0] *= alpha[0];
        acc_o[i][1] *= alpha[0];
        acc_o[i][2] *= alpha[1];
        acc_o[i][3] *= alpha[1];
      }
    }
    uint32_t p_frag[4][4];  // P as A fragments, one per 16-key step
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      const float p0 = exp2_approx(fmaf(s[n][0], p.scale_log2, -base[0]));
      const float p1 = exp2_approx(fmaf(s[n][1], p.scale_log2, -base[0]));
      const float p2 = exp2_approx(fmaf(s[n][2], p.scale_log2, -base[1]));
      const float p3 = exp2_approx(fmaf(s[n][3], p.scale_log2, -base[1]));
      row_sum[0] += p0 + p1;
      row_sum[1] += p2 + p3;
      p_frag[n >> 1][(n & 1) * 2 + 0] = Elem<T>::pack(p0, p1);
      p_frag[n >> 1][(n & 1) * 2 + 1] = Elem<T>::pack(p2, p3);
    }

    // O += P V: (16 rows, D) per warp.
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int n = 0; n < D / 8; n += 2) {
        uint32_t bf[4];
        frag_b_t<D>(bf, sV, kk * 16, n * 8, lane);
        mma16816<T>(acc_o[n], p_frag[kk], bf[0], bf[1]);
        mma16816<T>(acc_o[n + 1], p_frag[kk], bf[2], bf[3]);
      }
    }
    __syncthreads();  // the next iteration's prefetch overwrites this stage
  }

  // Epilogue: normalise, write out (B, Hq, Nq, D) and lse (natural log; -inf for empty rows).
  T* ob = row_ptr_mut<T>(p.out, p.o_stride, b, hq);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
    const int i = q0 + warp * 16 + g + r * 8;
    const float inv = row_sum[r] > 0.f ? 1.f / row_sum[r] : 0.f;
    if (i < p.q_len) {
      T* orow = ob + int64_t(i) * p.o_stride[2];
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        *reinterpret_cast<uint32_t*>(orow + n * 8 + 2 * tq) =
            Elem<T>::pack(acc_o[n][2 * r] * inv, acc_o[n][2 * r + 1] * inv);
      }
      if (tq == 0) {
        const float lse = row_sum[r] > 0.f ? (row_max[r] + log2f(row_sum[r])) * 0.69314718056f
                                           : -INFINITY;
        p.lse[int64_t(b) * p.lse_stride[0] + int64_t(hq) * p.lse_stride[1] +
              int64_t(i) * p.lse_stride[2]] = lse;
      }
    }
  }
}

// Host launcher, instantiated once per (dtype, head dim) in its own .cu file.
template <class T, int D>
cudaError_t launch_forward(const AttnParams& p, cudaStream_t stream) {
  using Tr = ForwardTraits<D>;
  auto kernel = attention_forward_kernel<T, D>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       Tr::kSmemBytes);
  if (e != cudaSuccess) return e;
  const dim3 grid((p.q_len + Tr::kBlockQ - 1) / Tr::kBlockQ, p.heads_q, p.batch);
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace spattn::cuda
