// CPU backward in two deterministic passes that both recompute P = exp(S - lse) from the
// forward's lse, so no N × N matrix and no atomics are needed:
//   dq pass   — one task per (batch, query head, query block) over its kv tiles;
//   dk/dv pass — one task per (batch, kv head, kv block) over the transposed plan, summing the
//               query heads of its GQA group in a fixed order.
// Each output element is written by exactly one task, so results do not depend on threads.
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/cpu_attention.hpp"
#include "cpu/kernels.hpp"
#include "cpu/tiles.hpp"

namespace spattn::cpu {

namespace {

constexpr double kLog2e = 1.44269504088896340735992468100189214;

// lse in log2 units for rows [q0, q0 + rows) of (b, h); empty rows (lse = -inf) become +inf so
// that exp2(s - lse2) is exactly 0 for every score, masked or not.
template <class A>
void load_lse2(const TensorRef& lse, int64_t b, int64_t h, int64_t q0, int64_t rows, A* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t off = b * lse.stride[0] + h * lse.stride[1] + (q0 + i) * lse.stride[2];
    const A x = lse.dtype == DType::float64 ? A(lse.ptr<const double>()[off])
                                            : A(lse.ptr<const float>()[off]);
    dst[i] = x == -std::numeric_limits<A>::infinity() ? std::numeric_limits<A>::infinity()
                                                       : x * A(kLog2e);
  }
}

// delta (B, Hq, Nq) = rowsum(dout ∘ out), in A.
template <class S, class A>
std::vector<A> row_deltas(const detail::AttentionProblem& p, const TensorRef& out,
                          const TensorRef& dout) {
  std::vector<A> delta(size_t(p.batch * p.heads_q * p.q_len));
  const int64_t rows = p.batch * p.heads_q, n = p.q_len, dv = p.dim_v;
#pragma omp parallel num_threads(thread_count(p))
  {
    Buffer<A> o(dv), d(dv);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = r / p.heads_q, h = r % p.heads_q;
      for (int64_t i = 0; i < n; ++i) {
        kernel::load_row(row_ptr<const S>(out, b, h, i), o.get(), dv);
        kernel::load_row(row_ptr<const S>(dout, b, h, i), d.get(), dv);
        A acc = A(0);
        for (int64_t c = 0; c < dv; ++c) acc += o.get()[c] * d.get()[c];
        delta[size_t(r * n + i)] = acc;
      }
    }
  }
  return delta;
}

template <class S, class A>
void dq_pass(const detail::AttentionProblem& p, const PlanGeometry& geo, const TensorRef& q,
             const TensorRef& k, const TensorRef& v, const TensorRef& lse,
             const TensorRef& dout, const std::vector<A>& delta, const TensorRef& dq) {
  const int64_t bq = geo.block_q, bk = geo.block_k, nqb = geo.num_q_blocks();
  const int64_t D = p.dim_qk, Dv = p.dim_v, G = p.group_size();
  const int64_t tasks = p.batch * p.heads_q * nqb;
  const A scale_log2 = A(p.scale * kLog2e);
  const int threads = thread_count(p);
  const PackedBlocks<A> kt = pack_blocks<S, A>(k, bk, true, threads, 0);   // (B, Hkv, nkb, D, bk)
  const PackedBlocks<A> kr = pack_blocks<S, A>(k, bk, false, threads, 1);  // (B, Hkv, nkb, bk, D)
  const PackedBlocks<A> vt = pack_blocks<S, A>(v, bk, true, threads, 2);   // (B, Hkv, nkb, Dv, bk)

#pragma omp parallel num_threads(threads)
  {
    Buffer<A> qbuf(bq * D), dob(bq * Dv), s(bq * bk), dp(bq * bk), acc(bq * D), lse2(bq);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t qb = t % nqb, hq = (t / nqb) % p.heads_q, b = t / (nqb * p.heads_q);
      const int64_t hk = hq / G;
      const int64_t q0 = qb * bq, rows = std::min(bq, p.q_len - q0);
      const A* dl = delta.data() + (b * p.heads_q + hq) * p.q_len + q0;  // (rows)
      load_tile<S>(q, b, hq, q0, rows, D, qbuf.get(), D);       // (rows, D)
      load_tile<S>(dout, b, hq, q0, rows, Dv, dob.get(), Dv);   // (rows, Dv)
      load_lse2(lse, b, hq, q0, rows, lse2.get());
      std::fill(acc.get(), acc.get() + rows * D, A(0));

      for_each_kv_tile(p, geo, b, hq, qb, [&](int64_t kb, bool partial) {
        const int64_t k0 = kb * bk, cols = std::min(bk, p.k_len - k0);
        kernel::gemm(rows, cols, D, qbuf.get(), D, kt.at(b, hk, kb), bk, s.get(), bk, false);  // S
        kernel::gemm(rows, cols, Dv, dob.get(), Dv, vt.at(b, hk, kb), bk, dp.get(), bk,
                     false);  // dP
        for (int64_t i = 0; i < rows; ++i) {
          A* srow = s.get() + i * bk;
          if (partial) mask_row(p.rule, q0 + i, p.q_len, p.k_len, k0, cols, srow);
          kernel::exp2_row(srow, cols, scale_log2, lse2.get()[i]);  // P
          A* dprow = dp.get() + i * bk;
          const A di = dl[i];
          for (int64_t j = 0; j < cols; ++j) dprow[j] = srow[j] * (dprow[j] - di);  // dS
        }
        kernel::gemm(rows, D, cols, dp.get(), bk, kr.at(b, hk, kb), D, acc.get(), D,
                     true);  // dQ += dS K
      });
      for (int64_t i = 0; i < rows; ++i)
        kernel::store_row(acc.get() + i * D, row_ptr<S>(dq, b, hq, q0 + i), D, A(p.scale));
    }
  }
}

template <class S, class A>
void dkdv_pass(const detail::AttentionProblem& p, const PlanGeometry& geo,
               const TransposedPlanView* tplan, const TensorRef& q, const TensorRef& k,
               const TensorRef& v, const TensorRef& lse, const TensorRef& dout,
               const std::vector<A>& delta, const TensorRef& dk, const TensorRef& dv) {
  const int64_t bq = geo.block_q, bk = geo.block_k, nkb = geo.num_k_blocks();
  const int64_t D = p.dim_qk, Dv = p.dim_v, G = p.group_size();
  const int64_t tasks = p.batch * p.heads_kv * nkb;
  const A scale_log2 = A(p.scale * kLog2e);
  const int threads = thread_count(p);
  const PackedBlocks<A> qt = pack_blocks<S, A>(q, bq, true, threads, 3);      // (B, Hq, nqb, D, bq)
  const PackedBlocks<A> qr = pack_blocks<S, A>(q, bq, false, threads, 4);     // (B, Hq, nqb, bq, D)
  const PackedBlocks<A> dot = pack_blocks<S, A>(dout, bq, true, threads, 5);  // (B, Hq, nqb, Dv, bq)
  const PackedBlocks<A> dor = pack_blocks<S, A>(dout, bq, false, threads, 6); // (B, Hq, nqb, bq, Dv)
  // lse in log2 units (B, Hq, Nq), +inf for empty rows.
  A* lse2_all = workspace<A>(7, p.batch * p.heads_q * p.q_len);
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.heads_q; ++h)
      load_lse2(lse, b, h, 0, p.q_len, lse2_all + (b * p.heads_q + h) * p.q_len);

#pragma omp parallel num_threads(threads)
  {
    Buffer<A> kbuf(bk * D), vbuf(bk * Dv), s(bk * bq), dp(bk * bq), dk_acc(bk * D),
        dv_acc(bk * Dv);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t kb = t % nkb, hk = (t / nkb) % p.heads_kv, b = t / (nkb * p.heads_kv);
      const int64_t k0 = kb * bk, krows = std::min(bk, p.k_len - k0);
      load_tile<S>(k, b, hk, k0, krows, D, kbuf.get(), D);    // (krows, D)
      load_tile<S>(v, b, hk, k0, krows, Dv, vbuf.get(), Dv);  // (krows, Dv)
      std::fill(dk_acc.get(), dk_acc.get() + krows * D, A(0));
      std::fill(dv_acc.get(), dv_acc.get() + krows * Dv, A(0));

      for (int64_t hq = hk * G; hq < (hk + 1) * G; ++hq) {
        const A* dl_head = delta.data() + (b * p.heads_q + hq) * p.q_len;
        const A* lse2_head = lse2_all + (b * p.heads_q + hq) * p.q_len;
        for_each_q_tile(p, geo, tplan, b, hq, kb, [&](int64_t qb, bool partial) {
          const int64_t q0 = qb * bq, qcols = std::min(bq, p.q_len - q0);
          const A* dl = dl_head + q0;  // (qcols)
          const A* lse2 = lse2_head + q0;  // (qcols)
          kernel::gemm(krows, qcols, D, kbuf.get(), D, qt.at(b, hq, qb), bq, s.get(), bq,
                       false);  // Sᵀ (krows, qcols)
          kernel::gemm(krows, qcols, Dv, vbuf.get(), Dv, dot.at(b, hq, qb), bq, dp.get(), bq,
                       false);  // dPᵀ (krows, qcols)
          for (int64_t j = 0; j < krows; ++j) {
            A* srow = s.get() + j * bq;
            if (partial) mask_column(p.rule, k0 + j, p.q_len, p.k_len, q0, qcols, srow);
            kernel::exp2_row_sub(srow, qcols, scale_log2, lse2);  // Pᵀ
            A* dprow = dp.get() + j * bq;
            for (int64_t i = 0; i < qcols; ++i) dprow[i] = srow[i] * (dprow[i] - dl[i]);  // dSᵀ
          }
          kernel::gemm(krows, Dv, qcols, s.get(), bq, dor.at(b, hq, qb), Dv, dv_acc.get(), Dv,
                       true);  // dV += Pᵀ dO
          kernel::gemm(krows, D, qcols, dp.get(), bq, qr.at(b, hq, qb), D, dk_acc.get(), D,
                       true);  // dK += dSᵀ Q
        });
      }
      for (int64_t j = 0; j < krows; ++j) {
        kernel::store_row(dk_acc.get() + j * D, row_ptr<S>(dk, b, hk, k0 + j), D, A(p.scale));
        kernel::store_row(dv_acc.get() + j * Dv, row_ptr<S>(dv, b, hk, k0 + j), Dv, A(1));
      }
    }
  }
}

#if defined(__AVX512BF16__)
// bf16 passes on native dot products. The seven tile products take bf16 operands with float32
// sums: Q, K, V and dO are bf16 already (exact), P and dS are rounded to bf16 before the
// products they feed (dV += Pᵀ dO, dQ += dS K, dK += dSᵀ Q), as tensor-core kernels do. The
// softmax recomputation and dS = P ∘ (dP − delta) stay float32. Tasks, tile order and the GQA
// sum are those of the float passes, so results still do not depend on the thread count.
void dq_pass_bf16(const detail::AttentionProblem& p, const PlanGeometry& geo, const TensorRef& q,
                  const TensorRef& k, const TensorRef& v, const TensorRef& lse,
                  const TensorRef& dout, const std::vector<float>& delta, const TensorRef& dq) {
  const int64_t bq = geo.block_q, bk = geo.block_k, nqb = geo.num_q_blocks();
  const int64_t D = p.dim_qk, Dv = p.dim_v, G = p.group_size();
  const int64_t D2 = (D + 1) / 2, Dv2 = (Dv + 1) / 2, bk2 = (bk + 1) / 2;
  const int64_t tasks = p.batch * p.heads_q * nqb;
  const float scale_log2 = float(p.scale * kLog2e);
  const int threads = thread_count(p);
  const PackedBlocks<uint32_t> kt =
      pack_blocks_bf16(k, bk, PairLayout::along_d, threads, 0);  // (B, Hkv, nkb, D/2, bk)
  const PackedBlocks<uint32_t> kr =
      pack_blocks_bf16(k, bk, PairLayout::row_pairs, threads, 1);  // (B, Hkv, nkb, bk/2, D)
  const PackedBlocks<uint32_t> vt =
      pack_blocks_bf16(v, bk, PairLayout::along_d, threads, 2);  // (B, Hkv, nkb, Dv/2, bk)

#pragma omp parallel num_threads(threads)
  {
    Buffer<uint32_t> qbuf(bq * D2), dob(bq * Dv2), dsb(bq * bk2);
    Buffer<float> s(bq * bk), dp(bq * bk), acc(bq * D), lse2(bq);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t qb = t % nqb, hq = (t / nqb) % p.heads_q, b = t / (nqb * p.heads_q);
      const int64_t hk = hq / G;
      const int64_t q0 = qb * bq, rows = std::min(bq, p.q_len - q0);
      const float* dl = delta.data() + (b * p.heads_q + hq) * p.q_len + q0;  // (rows)
      load_tile_pairs(q, b, hq, q0, rows, D, qbuf.get(), D2);      // (rows, D/2)
      load_tile_pairs(dout, b, hq, q0, rows, Dv, dob.get(), Dv2);  // (rows, Dv/2)
      load_lse2(lse, b, hq, q0, rows, lse2.get());
      std::fill(acc.get(), acc.get() + rows * D, 0.0f);

      for_each_kv_tile(p, geo, b, hq, qb, [&](int64_t kb, bool partial) {
        const int64_t k0 = kb * bk, cols = std::min(bk, p.k_len - k0), cols2 = (cols + 1) / 2;
        kernel::gemm_bf16(rows, cols, D2, qbuf.get(), D2, kt.at(b, hk, kb), bk, s.get(), bk,
                          false);  // S (rows, cols)
        kernel::gemm_bf16(rows, cols, Dv2, dob.get(), Dv2, vt.at(b, hk, kb), bk, dp.get(), bk,
                          false);  // dP (rows, cols)
        for (int64_t i = 0; i < rows; ++i) {
          float* srow = s.get() + i * bk;
          if (partial) mask_row(p.rule, q0 + i, p.q_len, p.k_len, k0, cols, srow);
          kernel::exp2_row(srow, cols, scale_log2, lse2.get()[i]);  // P
          float* dprow = dp.get() + i * bk;
          const float di = dl[i];
          for (int64_t j = 0; j < cols; ++j) dprow[j] = srow[j] * (dprow[j] - di);  // dS
          kernel::round_pairs_bf16(dprow, cols, dsb.get() + i * bk2);  // (bk/2) pairs of keys
        }
        kernel::gemm_bf16(rows, D, cols2, dsb.get(), bk2, kr.at(b, hk, kb), D, acc.get(), D,
                          true);  // dQ += dS K (rows, D)
      });
      for (int64_t i = 0; i < rows; ++i)
        kernel::store_row(acc.get() + i * D, row_ptr<bfloat16>(dq, b, hq, q0 + i), D,
                          float(p.scale));
    }
  }
}

void dkdv_pass_bf16(const detail::AttentionProblem& p, const PlanGeometry& geo,
                    const TransposedPlanView* tplan, const TensorRef& q, const TensorRef& k,
                    const TensorRef& v, const TensorRef& lse, const TensorRef& dout,
                    const std::vector<float>& delta, const TensorRef& dk, const TensorRef& dv) {
  const int64_t bq = geo.block_q, bk = geo.block_k, nkb = geo.num_k_blocks();
  const int64_t D = p.dim_qk, Dv = p.dim_v, G = p.group_size();
  const int64_t D2 = (D + 1) / 2, Dv2 = (Dv + 1) / 2, bq2 = (bq + 1) / 2;
  const int64_t tasks = p.batch * p.heads_kv * nkb;
  const float scale_log2 = float(p.scale * kLog2e);
  const int threads = thread_count(p);
  const PackedBlocks<uint32_t> qt =
      pack_blocks_bf16(q, bq, PairLayout::along_d, threads, 3);  // (B, Hq, nqb, D/2, bq)
  const PackedBlocks<uint32_t> qr =
      pack_blocks_bf16(q, bq, PairLayout::row_pairs, threads, 4);  // (B, Hq, nqb, bq/2, D)
  const PackedBlocks<uint32_t> dot =
      pack_blocks_bf16(dout, bq, PairLayout::along_d, threads, 5);  // (B, Hq, nqb, Dv/2, bq)
  const PackedBlocks<uint32_t> dor =
      pack_blocks_bf16(dout, bq, PairLayout::row_pairs, threads, 6);  // (B, Hq, nqb, bq/2, Dv)
  // lse in log2 units (B, Hq, Nq), +inf for empty rows.
  float* lse2_all = workspace<float>(7, p.batch * p.heads_q * p.q_len);
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.heads_q; ++h)
      load_lse2(lse, b, h, 0, p.q_len, lse2_all + (b * p.heads_q + h) * p.q_len);

#pragma omp parallel num_threads(threads)
  {
    Buffer<uint32_t> kbuf(bk * D2), vbuf(bk * Dv2), pb(bk * bq2), dsb(bk * bq2);
    Buffer<float> s(bk * bq), dp(bk * bq), dk_acc(bk * D), dv_acc(bk * Dv);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t kb = t % nkb, hk = (t / nkb) % p.heads_kv, b = t / (nkb * p.heads_kv);
      const int64_t k0 = kb * bk, krows = std::min(bk, p.k_len - k0);
      load_tile_pairs(k, b, hk, k0, krows, D, kbuf.get(), D2);    // (krows, D/2)
      load_tile_pairs(v, b, hk, k0, krows, Dv, vbuf.get(), Dv2);  // (krows, Dv/2)
      std::fill(dk_acc.get(), dk_acc.get() + krows * D, 0.0f);
      std::fill(dv_acc.get(), dv_acc.get() + krows * Dv, 0.0f);

      for (int64_t hq = hk * G; hq < (hk + 1) * G; ++hq) {
        const float* dl_head = delta.data() + (b * p.heads_q + hq) * p.q_len;
        const float* lse2_head = lse2_all + (b * p.heads_q + hq) * p.q_len;
        for_each_q_tile(p, geo, tplan, b, hq, kb, [&](int64_t qb, bool partial) {
          const int64_t q0 = qb * bq, qcols = std::min(bq, p.q_len - q0);
          const int64_t qcols2 = (qcols + 1) / 2;
          const float* dl = dl_head + q0;      // (qcols)
          const float* lse2 = lse2_head + q0;  // (qcols)
          kernel::gemm_bf16(krows, qcols, D2, kbuf.get(), D2, qt.at(b, hq, qb), bq, s.get(), bq,
                            false);  // Sᵀ (krows, qcols)
          kernel::gemm_bf16(krows, qcols, Dv2, vbuf.get(), Dv2, dot.at(b, hq, qb), bq, dp.get(),
                            bq, false);  // dPᵀ (krows, qcols)
          for (int64_t j = 0; j < krows; ++j) {
            float* srow = s.get() + j * bq;
            if (partial) mask_column(p.rule, k0 + j, p.q_len, p.k_len, q0, qcols, srow);
            kernel::exp2_row_sub(srow, qcols, scale_log2, lse2);  // Pᵀ
            float* dprow = dp.get() + j * bq;
            for (int64_t i = 0; i < qcols; ++i) dprow[i] = srow[i] * (dprow[i] - dl[i]);  // dSᵀ
            kernel::round_pairs_bf16(srow, qcols, pb.get() + j * bq2);    // (bq/2) query pairs
            kernel::round_pairs_bf16(dprow, qcols, dsb.get() + j * bq2);  // (bq/2) query pairs
          }
          kernel::gemm_bf16(krows, Dv, qcols2, pb.get(), bq2, dor.at(b, hq, qb), Dv,
                            dv_acc.get(), Dv, true);  // dV += Pᵀ dO (krows, Dv)
          kernel::gemm_bf16(krows, D, qcols2, dsb.get(), bq2, qr.at(b, hq, qb), D, dk_acc.get(),
                            D, true);  // dK += dSᵀ Q (krows, D)
        });
      }
      for (int64_t j = 0; j < krows; ++j) {
        kernel::store_row(dk_acc.get() + j * D, row_ptr<bfloat16>(dk, b, hk, k0 + j), D,
                          float(p.scale));
        kernel::store_row(dv_acc.get() + j * Dv, row_ptr<bfloat16>(dv, b, hk, k0 + j), Dv, 1.0f);
      }
    }
  }
}
#endif

template <class S, class A>
void backward_typed(const detail::AttentionProblem& p, const TensorRef& q, const TensorRef& k,
                    const TensorRef& v, const TensorRef& out, const TensorRef& lse,
                    const TensorRef& dout, const TensorRef& dq, const TensorRef& dk,
                    const TensorRef& dv) {
  const PlanGeometry geo = tile_geometry(p);
  const std::vector<A> delta = row_deltas<S, A>(p, out, dout);
  // bf16 on AVX-512 BF16 takes the native dot-product passes; everything else converts to A.
  [[maybe_unused]] constexpr bool bf16_dot = std::is_same_v<S, bfloat16> && kernel::kHaveBf16Dot;
  if (p.batch * p.heads_q * p.q_len > 0) {
#if defined(__AVX512BF16__)
    if constexpr (bf16_dot) {
      dq_pass_bf16(p, geo, q, k, v, lse, dout, delta, dq);
    } else
#endif
      dq_pass<S, A>(p, geo, q, k, v, lse, dout, delta, dq);
  }
  if (p.batch * p.heads_kv * p.k_len > 0) {
    TransposedPlan owned;
    TransposedPlanView tview;
    if (p.plan != nullptr) {
      owned = transpose(*p.plan);
      tview = owned.view();
    }
    const TransposedPlanView* tp = p.plan ? &tview : nullptr;
#if defined(__AVX512BF16__)
    if constexpr (bf16_dot) {
      dkdv_pass_bf16(p, geo, tp, q, k, v, lse, dout, delta, dk, dv);
    } else
#endif
      dkdv_pass<S, A>(p, geo, tp, q, k, v, lse, dout, delta, dk, dv);
  }
}

}  // namespace

void backward(const detail::AttentionProblem& p, const TensorRef& q, const TensorRef& k,
              const TensorRef& v, const TensorRef& out, const TensorRef& lse,
              const TensorRef& dout, const TensorRef& dq, const TensorRef& dk,
              const TensorRef& dv) {
  switch (p.dtype) {
    case DType::float32: backward_typed<float, float>(p, q, k, v, out, lse, dout, dq, dk, dv); break;
    case DType::float64: backward_typed<double, double>(p, q, k, v, out, lse, dout, dq, dk, dv); break;
    case DType::float16: backward_typed<float16, float>(p, q, k, v, out, lse, dout, dq, dk, dv); break;
    case DType::bfloat16: backward_typed<bfloat16, float>(p, q, k, v, out, lse, dout, dq, dk, dv); break;
  }
}

}  // namespace spattn::cpu
