// What the forward and backward passes share: which tiles to visit (plan or dense geometry),
// which elements of a partial tile the rule keeps, and moving tiles between strided (B, H, N, D)
// views and row-major per-thread buffers.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>

#include "core/problem.hpp"
#include "cpu/kernels.hpp"
#include "spattn/plan.hpp"

namespace spattn::cpu {

// Tile sizes when no plan fixes them. block_k = 64 keeps a K tile (64 × D floats) and the score
// tile (block_q × 64) in L1/L2 while block_q = 128 amortises packing K and V over 128 queries.
inline constexpr int kDenseBlockQ = 128;
inline constexpr int kDenseBlockK = 64;

inline PlanGeometry tile_geometry(const detail::AttentionProblem& p) {
  if (p.plan != nullptr) return p.plan->geo;
  PlanGeometry g;
  g.q_len = p.q_len;
  g.k_len = p.k_len;
  g.block_q = kDenseBlockQ;
  g.block_k = kDenseBlockK;
  g.rule = p.rule;
  return g;
}

// Threads for one call: the caller's choice, else OpenMP's default — except that problems too
// small to repay waking a thread team run on one thread (on a busy machine a team wake-up was
// measured at milliseconds against ~0.1 ms of work for a (1, 2, 64, 64, 32) call).
inline constexpr double kSerialWorkLimit = double(1 << 22);  // multiply-adds, ~0.2 ms on one core

inline int thread_count(const detail::AttentionProblem& p) {
  if (p.num_threads > 0) return p.num_threads;
  const double work = double(p.batch) * double(p.heads_q) * double(p.q_len) * double(p.k_len) *
                      double(p.dim_qk + p.dim_v);
  return work < kSerialWorkLimit ? 1 : omp_get_max_threads();
}

// Calls fn(kb, partial) for each kv block that query block qb of (b, hq) visits, full tiles first.
template <class Fn>
void for_each_kv_tile(const detail::AttentionProblem& p, const PlanGeometry& geo, int64_t b,
                      int64_t hq, int64_t qb, Fn&& fn) {
  if (p.plan != nullptr) {
    const PlanView& plan = *p.plan;
    const int64_t r = plan.row(b, plan.head_for(hq, p.heads_q), qb);
    const int32_t* idx = plan.kv_index + r * plan.capacity;
    const int32_t nf = plan.num_full[r], np = plan.num_partial[r];
    for (int32_t s = 0; s < nf + np; ++s) fn(int64_t(idx[s]), s >= nf);
    return;
  }
  const int64_t nkb = geo.num_k_blocks();
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const TileKind kind = geo.classify(qb, kb);
    if (kind != TileKind::empty) fn(kb, kind == TileKind::partial);
  }
}

// Calls fn(qb, partial) for each query block of (b, hq) that visits kv block kb.
template <class Fn>
void for_each_q_tile(const detail::AttentionProblem& p, const PlanGeometry& geo,
                     const TransposedPlanView* tplan, int64_t b, int64_t hq, int64_t kb, Fn&& fn) {
  if (tplan != nullptr) {
    const int64_t r = tplan->row(b, tplan->head_for(hq, p.heads_q), kb);
    const int32_t* idx = tplan->q_index + r * tplan->capacity;
    const int32_t nf = tplan->num_full[r], np = tplan->num_partial[r];
    for (int32_t s = 0; s < nf + np; ++s) fn(int64_t(idx[s]), s >= nf);
    return;
  }
  const int64_t nqb = geo.num_q_blocks();
  for (int64_t qb = 0; qb < nqb; ++qb) {
    const TileKind kind = geo.classify(qb, kb);
    if (kind != TileKind::empty) fn(qb, kind == TileKind::partial);
  }
}

// Keys [lo, hi) that query i may see, clipped to [k0, k1). Offsets are saturated at +-2^62 so
// the sums below cannot overflow for any real sequence length.
inline void allowed_keys(const MaskRule& rule, int64_t i, int64_t q_len, int64_t k_len,
                         int64_t k0, int64_t k1, int64_t& lo, int64_t& hi) {
  const int64_t pos = i + k_len - q_len;
  lo = std::max(k0, pos + rule.min_offset());
  hi = std::min(k1, pos + rule.max_offset() + 1);
  if (hi < lo) hi = lo;
}

// Queries [lo, hi) that may see key j, clipped to [q0, q1).
inline void allowed_queries(const MaskRule& rule, int64_t j, int64_t q_len, int64_t k_len,
                            int64_t q0, int64_t q1, int64_t& lo, int64_t& hi) {
  const int64_t base = j - (k_len - q_len);  // d = base - i
  lo = std::max(q0, base - rule.max_offset());
  hi = std::min(q1, base - rule.min_offset() + 1);
  if (hi < lo) hi = lo;
}

// Writes -inf outside [lo, hi) of a row of n scores (lo, hi relative to the row).
template <class A>
inline void mask_outside(A* row, int64_t n, int64_t lo, int64_t hi) {
  const A ninf = -std::numeric_limits<A>::infinity();
  for (int64_t j = 0; j < std::min(lo, n); ++j) row[j] = ninf;
  for (int64_t j = std::max<int64_t>(hi, 0); j < n; ++j) row[j] = ninf;
}

// Scores of query i against keys [k0, k0 + n) in `row`: the ones the rule forbids become -inf
// (the mask of a partial tile, one row).
template <class A>
inline void mask_row(const MaskRule& rule, int64_t i, int64_t q_len, int64_t k_len, int64_t k0,
                     int64_t n, A* row) {
  int64_t lo, hi;
  allowed_keys(rule, i, q_len, k_len, k0, k0 + n, lo, hi);
  mask_outside(row, n, lo - k0, hi - k0);
}

// The transposed row: scores of key j against queries [q0, q0 + n) in `row` (a partial tile
// of the dk/dv pass).
template <class A>
inline void mask_column(const MaskRule& rule, int64_t j, int64_t q_len, int64_t k_len,
                        int64_t q0, int64_t n, A* row) {
  int64_t lo, hi;
  allowed_queries(rule, j, q_len, k_len, q0, q0 + n, lo, hi);
  mask_outside(row, n, lo - q0, hi - q0);
}

// Element pointer of row (b, h, n) of a (B, H, N, D) view.
template <class S>
inline S* row_ptr(const TensorRef& t, int64_t b, int64_t h, int64_t n) {
  return t.ptr<S>() + b * t.stride[0] + h * t.stride[1] + n * t.stride[2];
}

// dst (rows, ld) ← rows [n0, n0 + rows) of (b, h), first `cols` elements of each.
template <class S, class A>
inline void load_tile(const TensorRef& t, int64_t b, int64_t h, int64_t n0, int64_t rows,
                      int64_t cols, A* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r)
    kernel::load_row(row_ptr<const S>(t, b, h, n0 + r), dst + r * ld, cols);
}

// dst (cols, ld) ← the same rows transposed; `scratch` holds one row of `cols` values.
template <class S, class A>
inline void load_tile_transposed(const TensorRef& t, int64_t b, int64_t h, int64_t n0,
                                 int64_t rows, int64_t cols, A* dst, int64_t ld, A* scratch) {
  for (int64_t r = 0; r < rows; ++r) {
    kernel::load_row(row_ptr<const S>(t, b, h, n0 + r), scratch, cols);
    for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = scratch[c];
  }
}

// Per-thread scratch: 64-byte aligned, uninitialised.
template <class T>
struct Buffer {
  std::unique_ptr<T[], void (*)(T*)> data{nullptr, [](T* x) { std::free(x); }};
  explicit Buffer(int64_t n) {
    const size_t bytes = (size_t(std::max<int64_t>(n, 1)) * sizeof(T) + 63) / 64 * 64;
    T* ptr = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (ptr == nullptr) throw std::bad_alloc();
    data.reset(ptr);
  }
  T* get() const { return data.get(); }
};

// Grow-only storage, per calling thread, for the packed operands of one call (`slot` tells the
// arrays of one call apart). Reusing it across calls of the same size avoids faulting in fresh
// pages on every call, which in a VM cost about as much as a 5%-dense forward at N = 8192.
// The memory (O(B·H·N·D) per slot) is kept until the calling thread exits.
template <class T>
T* workspace(int slot, int64_t n) {
  struct Slot {
    void* ptr = nullptr;
    size_t bytes = 0;
    ~Slot() { std::free(ptr); }
  };
  thread_local Slot slots[8];
  Slot& s = slots[slot];
  const size_t bytes = (size_t(std::max<int64_t>(n, 1)) * sizeof(T) + 63) / 64 * 64;
  if (bytes > s.bytes) {
    std::free(s.ptr);
    s.ptr = std::aligned_alloc(64, bytes);
    if (s.ptr == nullptr) {
      s.bytes = 0;
      throw std::bad_alloc();
    }
    s.bytes = bytes;
  }
  return static_cast<T*>(s.ptr);
}

// Every block of `block` rows of each (b, h) of a (B, H, N, D) view, converted to A and packed
// once per call so that tasks revisiting a block (one per query block, or per kv block) only read
// it: (B, H, num_blocks, block, D) row-major, or (B, H, num_blocks, D, block) transposed.
template <class A>
struct PackedBlocks {
  A* data = nullptr;
  int64_t heads = 0, num_blocks = 0, tile = 0;
  const A* at(int64_t b, int64_t h, int64_t blk) const {
    return data + ((b * heads + h) * num_blocks + blk) * tile;
  }
};

template <class S, class A>
PackedBlocks<A> pack_blocks(const TensorRef& t, int64_t block, bool transposed, int threads,
                            int slot) {
  const int64_t B = t.shape[0], H = t.shape[1], N = t.shape[2], D = t.shape[3];
  const int64_t nb = (N + block - 1) / block;
  PackedBlocks<A> packed{workspace<A>(slot, B * H * nb * block * D), H, nb, block * D};
#pragma omp parallel num_threads(threads)
  {
    Buffer<A> scratch(D);
#pragma omp for schedule(static)
    for (int64_t idx = 0; idx < B * H * nb; ++idx) {
      const int64_t blk = idx % nb, h = (idx / nb) % H, b = idx / (nb * H);
      const int64_t n0 = blk * block, rows = std::min(block, N - n0);
      A* dst = packed.data + idx * packed.tile;
      if (transposed)
        load_tile_transposed<S>(t, b, h, n0, rows, D, dst, block, scratch.get());  // (D, block)
      else
        load_tile<S>(t, b, h, n0, rows, D, dst, D);  // (block, D)
    }
  }
  return packed;
}

#if defined(__AVX512BF16__)
// bf16 operands for vdpbf16ps, which multiplies pairs of bf16 held in one uint32 (low half
// first). Pairs run along the shared dimension of a product, so a tile is packed one of two ways.

// Bits of elements i and i + 1 of a row of n bf16, 0 past the end (a zero pads odd lengths).
inline uint32_t pair_bits(const bfloat16* x, int64_t i, int64_t n) {
  const uint32_t lo = i < n ? x[i].bits : 0u, hi = i + 1 < n ? x[i + 1].bits : 0u;
  return lo | (hi << 16);
}

// dst (rows, ld) ← rows [n0, n0 + rows) of (b, h) as pairs along D (ceil(D / 2) per row): the
// A operand of a product over D. On little-endian x86 a bf16 row already is that sequence.
inline void load_tile_pairs(const TensorRef& t, int64_t b, int64_t h, int64_t n0, int64_t rows,
                            int64_t cols, uint32_t* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const bfloat16* src = row_ptr<const bfloat16>(t, b, h, n0 + r);
    std::memcpy(dst + r * ld, src, size_t(cols / 2) * sizeof(uint32_t));
    if (cols % 2 != 0) dst[r * ld + cols / 2] = src[cols - 1].bits;
  }
}

enum class PairLayout {
  along_d,    // (ceil(D / 2), block): pairs along D per row of the view — B of a product over D
  row_pairs,  // (ceil(block / 2), D): rows 2·j and 2·j + 1 interleaved — B of a product over rows
};

// Every block of `block` rows of each (b, h) of a bf16 (B, H, N, D) view, packed once per call
// like pack_blocks: (B, H, num_blocks, tile) with the tile laid out as `layout` says.
inline PackedBlocks<uint32_t> pack_blocks_bf16(const TensorRef& t, int64_t block,
                                               PairLayout layout, int threads, int slot) {
  const int64_t B = t.shape[0], H = t.shape[1], N = t.shape[2], D = t.shape[3];
  const int64_t nb = (N + block - 1) / block, d2 = (D + 1) / 2, block2 = (block + 1) / 2;
  const int64_t tile = layout == PairLayout::along_d ? d2 * block : block2 * D;
  PackedBlocks<uint32_t> packed{workspace<uint32_t>(slot, B * H * nb * tile), H, nb, tile};
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t idx = 0; idx < B * H * nb; ++idx) {
    const int64_t blk = idx % nb, h = (idx / nb) % H, b = idx / (nb * H);
    const int64_t n0 = blk * block, rows = std::min(block, N - n0);
    uint32_t* dst = packed.data + idx * tile;
    if (layout == PairLayout::along_d) {
      for (int64_t j = 0; j < rows; ++j) {  // columns past `rows` are never read (masked loads)
        const bfloat16* src = row_ptr<const bfloat16>(t, b, h, n0 + j);
        for (int64_t c2 = 0; c2 < d2; ++c2) dst[c2 * block + j] = pair_bits(src, 2 * c2, D);
      }
      continue;
    }
    for (int64_t j2 = 0; j2 < (rows + 1) / 2; ++j2) {
      const uint16_t* r0 = &row_ptr<const bfloat16>(t, b, h, n0 + 2 * j2)->bits;
      const uint16_t* r1 =
          2 * j2 + 1 < rows ? &row_ptr<const bfloat16>(t, b, h, n0 + 2 * j2 + 1)->bits : nullptr;
      uint32_t* out = dst + j2 * D;
      int64_t c = 0;
      if (r1 != nullptr)
        for (; c + 16 <= D; c += 16) {
          const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(r0 + c)));
          const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(r1 + c)));
          _mm512_storeu_si512(out + c, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
      for (; c < D; ++c) out[c] = uint32_t(r0[c]) | (r1 ? uint32_t(r1[c]) << 16 : 0u);
    }
  }
  return packed;
}
#endif

}  // namespace spattn::cpu
