// CPU forward: one task per (batch, query head, query block); each walks its kv tiles with an
// online softmax so only O(block_q · (block_k + D)) scratch per thread is ever live.
#include <cmath>
#include <limits>
#include <string>

#include "cpu/cpu_attention.hpp"
#include "cpu/kernels.hpp"
#include "cpu/tiles.hpp"
#include "spattn/error.hpp"

namespace spattn::cpu {

namespace {

constexpr int64_t kMaxHeadDim = 512;

template <class A>
void store_lse(const TensorRef& lse, int64_t b, int64_t h, int64_t i, A value) {
  const int64_t off = b * lse.stride[0] + h * lse.stride[1] + i * lse.stride[2];
  if (lse.dtype == DType::float64)
    lse.ptr<double>()[off] = double(value);
  else
    lse.ptr<float>()[off] = float(value);
}

// Online-softmax state of one query block. Scores are kept in log2 units (s · scale · log2 e)
// so exp2 is the only transcendental in the loop.
template <class A>
struct RowState {
  A* m;  // (block_q) running max
  A* l;  // (block_q) running sum of exp2(s - m)
  A* o;  // (block_q, Dv) unnormalised output
};

// Turns scores s (rows, ld) into probabilities relative to the running max and rescales o.
template <class A>
void online_softmax(A* s, int64_t ld, int64_t rows, int64_t cols, A scale_log2, int64_t dim_v,
                    RowState<A>& st) {
  const A ninf = -std::numeric_limits<A>::infinity();
  for (int64_t i = 0; i < rows; ++i) {
    A* srow = s + i * ld;
    const A m_old = st.m[i];
    const A m_new = std::max(m_old, kernel::max_row(srow, cols) * scale_log2);
    if (m_new == ninf) {  // nothing allowed yet in this row: P = 0 keeps o and l at zero
      std::fill(srow, srow + cols, A(0));
      continue;
    }
    const A alpha = std::exp2(m_old - m_new);  // 0 when m_old = -inf
    const A sum = kernel::exp2_row(srow, cols, scale_log2, m_new);
    st.l[i] = st.l[i] * alpha + sum;
    st.m[i] = m_new;
    if (alpha != A(1)) {
      A* orow = st.o + i * dim_v;
      for (int64_t c = 0; c < dim_v; ++c) orow[c] *= alpha;
    }
  }
}

template <class S, class A>
void finish_rows(const detail::AttentionProblem& p, const TensorRef& out, const TensorRef& lse,
                 int64_t b, int64_t hq, int64_t q0, int64_t rows, const RowState<A>& st) {
  const A ln2 = A(0.693147180559945309417232121458176568);
  for (int64_t i = 0; i < rows; ++i) {
    S* dst = row_ptr<S>(out, b, hq, q0 + i);
    if (st.l[i] > A(0)) {
      kernel::store_row(st.o + i * p.dim_v, dst, p.dim_v, A(1) / st.l[i]);
      store_lse(lse, b, hq, q0 + i, (st.m[i] + std::log2(st.l[i])) * ln2);
    } else {
      const A zero = A(0);
      for (int64_t c = 0; c < p.dim_v; ++c) kernel::store_row(&zero, dst + c, 1, A(1));
      store_lse(lse, b, hq, q0 + i, -std::numeric_limits<A>::infinity());
    }
  }
}

// Generic path: Q, K, V converted to A; products in A. Used for float32, float16, float64 and
// for bfloat16 where the CPU lacks bf16 dot products.
template <class S, class A>
void forward_convert(const detail::AttentionProblem& p, const TensorRef& q, const TensorRef& k,
                     const TensorRef& v, const TensorRef& out, const TensorRef& lse) {
  const PlanGeometry geo = tile_geometry(p);
  const int64_t bq = geo.block_q, bk = geo.block_k, nqb = geo.num_q_blocks();
  const int64_t dq = p.dim_qk, dv = p.dim_v, G = p.group_size();
  const int64_t tasks = p.batch * p.heads_q * nqb;
  const A scale_log2 = A(p.scale) * A(1.44269504088896340735992468100189214);
  const int threads = thread_count(p);
  const PackedBlocks<A> kt = pack_blocks<S, A>(k, bk, true, threads, 0);   // (B, Hkv, nkb, Dqk, bk)
  const PackedBlocks<A> vb = pack_blocks<S, A>(v, bk, false, threads, 1);  // (B, Hkv, nkb, bk, Dv)

#pragma omp parallel num_threads(threads)
  {
    Buffer<A> qbuf(bq * dq), s(bq * bk), o(bq * dv), m(bq), l(bq);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t qb = t % nqb, hq = (t / nqb) % p.heads_q, b = t / (nqb * p.heads_q);
      const int64_t hk = hq / G;
      const int64_t q0 = qb * bq, rows = std::min(bq, p.q_len - q0);
      load_tile<S>(q, b, hq, q0, rows, dq, qbuf.get(), dq);  // (rows, Dqk)
      std::fill(o.get(), o.get() + rows * dv, A(0));
      std::fill(m.get(), m.get() + rows, -std::numeric_limits<A>::infinity());
      std::fill(l.get(), l.get() + rows, A(0));
      RowState<A> st{m.get(), l.get(), o.get()};

      for_each_kv_tile(p, geo, b, hq, qb, [&](int64_t kb, bool partial) {
        const int64_t k0 = kb * bk, cols = std::min(bk, p.k_len - k0);
        kernel::gemm(rows, cols, dq, qbuf.get(), dq, kt.at(b, hk, kb), bk, s.get(), bk,
                     false);  // S (rows, cols)
        if (partial)
          for (int64_t i = 0; i < rows; ++i)
            mask_row(p.rule, q0 + i, p.q_len, p.k_len, k0, cols, s.get() + i * bk);
        online_softmax(s.get(), bk, rows, cols, scale_log2, dv, st);
        kernel::gemm(rows, dv, cols, s.get(), bk, vb.at(b, hk, kb), dv, o.get(), dv,
                     true);  // O += P V (rows, Dv)
      });
      finish_rows<S>(p, out, lse, b, hq, q0, rows, st);
    }
  }
}

#if defined(__AVX512BF16__)
// bf16 path on native dot products: Q and K stay bf16 (pairs along Dqk), P is rounded to bf16
// (pairs along the key axis) before P·V, as GPU kernels do; all sums are float32.
void forward_bf16_dot(const detail::AttentionProblem& p, const TensorRef& q, const TensorRef& k,
                      const TensorRef& v, const TensorRef& out, const TensorRef& lse) {
  const PlanGeometry geo = tile_geometry(p);
  const int64_t bq = geo.block_q, bk = geo.block_k, nqb = geo.num_q_blocks();
  const int64_t dq = p.dim_qk, dv = p.dim_v, G = p.group_size();
  const int64_t dq2 = (dq + 1) / 2, bk2 = (bk + 1) / 2;
  const int64_t tasks = p.batch * p.heads_q * nqb;
  const float scale_log2 = float(p.scale) * 1.44269504088896340736f;
  const int threads = thread_count(p);
  // K as pairs along Dqk per key (B, Hkv, nkb, Dqk/2, bk); V with rows 2·j and 2·j+1
  // interleaved (B, Hkv, nkb, bk/2, Dv): the operand layouts vdpbf16ps wants.
  const PackedBlocks<uint32_t> kt = pack_blocks_bf16(k, bk, PairLayout::along_d, threads, 0);
  const PackedBlocks<uint32_t> vp = pack_blocks_bf16(v, bk, PairLayout::row_pairs, threads, 1);

#pragma omp parallel num_threads(threads)
  {
    Buffer<uint32_t> qbuf(bq * dq2), pb(bq * bk2);
    Buffer<float> s(bq * bk), o(bq * dv), m(bq), l(bq);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t qb = t % nqb, hq = (t / nqb) % p.heads_q, b = t / (nqb * p.heads_q);
      const int64_t hk = hq / G;
      const int64_t q0 = qb * bq, rows = std::min(bq, p.q_len - q0);
      load_tile_pairs(q, b, hq, q0, rows, dq, qbuf.get(), dq2);  // (rows, Dqk/2)
      std::fill(o.get(), o.get() + rows * dv, 0.0f);
      std::fill(m.get(), m.get() + rows, -std::numeric_limits<float>::infinity());
      std::fill(l.get(), l.get() + rows, 0.0f);
      RowState<float> st{m.get(), l.get(), o.get()};

      for_each_kv_tile(p, geo, b, hq, qb, [&](int64_t kb, bool partial) {
        const int64_t k0 = kb * bk, cols = std::min(bk, p.k_len - k0), cols2 = (cols + 1) / 2;
        kernel::gemm_bf16(rows, cols, dq2, qbuf.get(), dq2, kt.at(b, hk, kb), bk, s.get(), bk,
                          false);  // S (rows, cols)
        if (partial)
          for (int64_t i = 0; i < rows; ++i)
            mask_row(p.rule, q0 + i, p.q_len, p.k_len, k0, cols, s.get() + i * bk);
        online_softmax(s.get(), bk, rows, cols, scale_log2, dv, st);
        for (int64_t i = 0; i < rows; ++i)  // (rows, bk/2) P as bf16 pairs along keys
          kernel::round_pairs_bf16(s.get() + i * bk, cols, pb.get() + i * bk2);
        kernel::gemm_bf16(rows, dv, cols2, pb.get(), bk2, vp.at(b, hk, kb), dv, o.get(),
                          dv, true);  // O += P V (rows, Dv)
      });
      finish_rows<bfloat16>(p, out, lse, b, hq, q0, rows, st);
    }
  }
}
#endif

}  // namespace

Support supports(DType dtype, int64_t dim_qk, int64_t dim_v) {
  (void)dtype;  // all four dtypes run on the CPU
  const std::string range = "[1, " + std::to_string(kMaxHeadDim) + "]";
  if (dim_qk < 1 || dim_qk > kMaxHeadDim)
    return {false, "q.shape[3] (head dim of q and k) must be in " + range +
                       " on the CPU; got " + std::to_string(dim_qk)};
  if (dim_v < 1 || dim_v > kMaxHeadDim)
    return {false, "v.shape[3] (head dim of v) must be in " + range + " on the CPU; got " +
                       std::to_string(dim_v)};
  return {};
}

void forward(const detail::AttentionProblem& p, const TensorRef& q, const TensorRef& k,
             const TensorRef& v, const TensorRef& out, const TensorRef& lse) {
  if (p.batch * p.heads_q * p.q_len == 0) return;
  switch (p.dtype) {
    case DType::float32: forward_convert<float, float>(p, q, k, v, out, lse); break;
    case DType::float64: forward_convert<double, double>(p, q, k, v, out, lse); break;
    case DType::float16: forward_convert<float16, float>(p, q, k, v, out, lse); break;
    case DType::bfloat16:
#if defined(__AVX512BF16__)
      forward_bf16_dot(p, q, k, v, out, lse);
#else
      forward_convert<bfloat16, float>(p, q, k, v, out, lse);
#endif
      break;
  }
}

}  // namespace spattn::cpu
