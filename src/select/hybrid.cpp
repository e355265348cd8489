// The hybrid Top-k ∪ Top-p selector (SpargeAttention2) on the CPU.
//
// Arithmetic is float32 with fixed orders so that another implementation (a GPU selector) can
// reproduce the plans bit for bit except where expf differs (docs/selectors.md, "Rounding"):
//   pooled vector: sum of the block's tokens in ascending token order, then / count
//   score:         acc = fma(q̄[d], k̄[d], acc) for d ascending from acc = 0, then × scale
//   softmax:       m = max over allowed; e = expf(s - m)
//   ranking:       descending score (per head) or weight (per group), ties to the lower index
//   Top-p mass:    prefix sums of e in ranked order compared with p × (sum of e in block order)
#include <algorithm>
#include <cmath>
#include <numeric>

#include <omp.h>

#include "select/hybrid_inputs.hpp"
#include "spattn/error.hpp"
#include "spattn/select.hpp"

namespace spattn {

namespace {

template <class T>
void accumulate_tokens(const T* base, int64_t token_stride, int64_t elem_stride, int64_t count,
                       int64_t dim, float* sum /* (dim) */) {
  // The unit-stride case (every layout attention accepts) gets its own loop so it vectorises;
  // the order of additions per element is the same in both: tokens ascending.
  if (elem_stride == 1) {
    for (int64_t t = 0; t < count; ++t) {
      const T* row = base + t * token_stride;
      for (int64_t d = 0; d < dim; ++d) sum[d] += load_as_float(row[d]);
    }
    return;
  }
  for (int64_t t = 0; t < count; ++t) {
    const T* row = base + t * token_stride;
    for (int64_t d = 0; d < dim; ++d) sum[d] += load_as_float(row[d * elem_stride]);
  }
}

// Mean of tokens [n0, n0 + count) of slice (b, h) of a (B, H, N, D) view: float32 sum in
// ascending token order, then one division.
void pool_block(const TensorRef& t, int64_t b, int64_t h, int64_t n0, int64_t count, float* out) {
  const int64_t dim = t.shape[3];
  std::fill(out, out + dim, 0.0f);
  const int64_t off = b * t.stride[0] + h * t.stride[1] + n0 * t.stride[2];
  switch (t.dtype) {
    case DType::float32:
      accumulate_tokens(t.ptr<float>() + off, t.stride[2], t.stride[3], count, dim, out);
      break;
    case DType::float64:
      accumulate_tokens(t.ptr<double>() + off, t.stride[2], t.stride[3], count, dim, out);
      break;
    case DType::bfloat16:
      accumulate_tokens(t.ptr<bfloat16>() + off, t.stride[2], t.stride[3], count, dim, out);
      break;
    case DType::float16:
      accumulate_tokens(t.ptr<float16>() + off, t.stride[2], t.stride[3], count, dim, out);
      break;
  }
  const float n = float(count);
  for (int64_t d = 0; d < dim; ++d) out[d] /= n;
}

struct Pooled {
  PlanGeometry geo;  // plan geometry (heads = plan heads)
  int64_t batch = 0, heads_q = 0, heads_kv = 0, dim = 0, nqb = 0, nkb = 0;
  float scale = 0;
  std::vector<float> q;   // (B, Hq, nqb, D)
  std::vector<float> kt;  // (B, Hkv, D, nkb): transposed so a score row is one vector loop
  std::vector<uint8_t> allowed;  // (nqb, nkb): the rule leaves the tile non-empty
};

// The CPU selector reads q and k itself: both must be in host memory.
void check_inputs(const char* where, const TensorRef& q, const TensorRef& k,
                  const HybridOptions& opt) {
  for (auto [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}})
    SPATTN_CHECK(t->device.kind == DeviceKind::cpu, where, ": ", name,
                 " must be in host memory; got ", to_string(t->device));
  detail::check_hybrid_inputs(where, q, k, opt);
}

Pooled pool_inputs(const char* where, const TensorRef& q, const TensorRef& k,
                   const HybridOptions& opt) {
  check_inputs(where, q, k, opt);
  Pooled p;
  p.batch = q.shape[0];
  p.heads_q = q.shape[1];
  p.heads_kv = k.shape[1];
  p.dim = q.shape[3];
  p.geo = detail::hybrid_plan_geometry(where, q, k, opt);
  p.nqb = p.geo.num_q_blocks();
  p.nkb = p.geo.num_k_blocks();
  p.scale = float(opt.scale > 0 ? opt.scale : 1.0 / std::sqrt(double(std::max<int64_t>(p.dim, 1))));

  const int64_t D = p.dim, nqb = p.nqb, nkb = p.nkb;
  p.q.assign(size_t(p.batch * p.heads_q * nqb * D), 0.0f);
  p.kt.assign(size_t(p.batch * p.heads_kv * D * nkb), 0.0f);
  const int threads = opt.num_threads > 0 ? opt.num_threads : omp_get_max_threads();
  const int64_t qjobs = p.batch * p.heads_q * nqb, kjobs = p.batch * p.heads_kv * nkb;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> tmp(static_cast<size_t>(D));
#pragma omp for schedule(static)
    for (int64_t job = 0; job < qjobs; ++job) {
      const int64_t qb = job % nqb, bh = job / nqb;
      const int64_t n0 = qb * opt.block_q, count = std::min<int64_t>(opt.block_q, p.geo.q_len - n0);
      pool_block(q, bh / p.heads_q, bh % p.heads_q, n0, count, p.q.data() + job * D);
    }
#pragma omp for schedule(static)
    for (int64_t job = 0; job < kjobs; ++job) {
      const int64_t kb = job % nkb, bh = job / nkb;
      const int64_t n0 = kb * opt.block_k, count = std::min<int64_t>(opt.block_k, p.geo.k_len - n0);
      pool_block(k, bh / p.heads_kv, bh % p.heads_kv, n0, count, tmp.data());
      float* dst = p.kt.data() + bh * D * nkb;  // (D, nkb)
      for (int64_t d = 0; d < D; ++d) dst[d * nkb + kb] = tmp[d];
    }
  }
  p.allowed.assign(size_t(nqb * nkb), 0);
  for (int64_t qb = 0; qb < nqb; ++qb)
    for (int64_t kb = 0; kb < nkb; ++kb)
      p.allowed[qb * nkb + kb] = p.geo.classify(qb, kb) != TileKind::empty;
  return p;
}

// Per-thread buffers for one row.
struct RowScratch {
  std::vector<float> key, weight, acc;  // (nkb)
  std::vector<int32_t> order;             // allowed kv blocks, ranked
};

// s[kb] = (q̄ · k̄_kb) × scale for every kv block, fma over d ascending per block.
void score_row(const Pooled& p, const float* qbar, const float* kt, float* s) {
  const int64_t nkb = p.nkb;
  std::fill(s, s + nkb, 0.0f);
  for (int64_t d = 0; d < p.dim; ++d) {
    const float qd = qbar[d];
    const float* kd = kt + d * nkb;
    for (int64_t kb = 0; kb < nkb; ++kb) s[kb] = std::fma(qd, kd[kb], s[kb]);
  }
  for (int64_t kb = 0; kb < nkb; ++kb) s[kb] *= p.scale;
}

// Fills r.order with the row's allowed kv blocks (ascending), r.key with what ranks them (the
// score per head; the combined probability per group) and r.weight with their softmax weights
// (unnormalised per head, combined probabilities per group); returns the number of allowed
// blocks. `probs` (nkb), when not null, receives the row distribution.
int64_t score_and_weigh(const Pooled& p, GqaPlan gqa, int64_t b, int64_t h, int64_t qb,
                        RowScratch& r, float* probs) {
  const int64_t nkb = p.nkb, D = p.dim;
  const uint8_t* allowed = p.allowed.data() + qb * nkb;
  r.order.clear();
  for (int64_t kb = 0; kb < nkb; ++kb)
    if (allowed[kb]) r.order.push_back(int32_t(kb));
  const int64_t n = int64_t(r.order.size());
  if (probs) std::fill(probs, probs + nkb, -1.0f);
  if (n == 0) return 0;

  const int64_t group = p.heads_q / p.heads_kv;
  if (gqa == GqaPlan::per_query_head) {
    const int64_t hkv = h / group;
    score_row(p, p.q.data() + ((b * p.heads_q + h) * p.nqb + qb) * D,
              p.kt.data() + (b * p.heads_kv + hkv) * D * nkb, r.key.data());
    float m = -INFINITY;
    for (int32_t kb : r.order) m = std::max(m, r.key[kb]);
    // Rank by the score itself: expf may map distinct scores to one weight.
    for (int32_t kb : r.order) r.weight[kb] = std::exp(r.key[kb] - m);
    if (probs) {
      float z = 0.0f;
      for (int32_t kb : r.order) z += r.weight[kb];
      for (int32_t kb : r.order) probs[kb] = r.weight[kb] / z;
    }
    return n;
  }

  // One plan per kv group: combine the group's softmax rows (each normalised with its sum taken
  // in ascending block order), heads visited in ascending order.
  for (int32_t kb : r.order) r.acc[kb] = gqa == GqaPlan::group_mean ? 0.0f : -INFINITY;
  for (int64_t g = 0; g < group; ++g) {
    const int64_t hq = h * group + g;
    score_row(p, p.q.data() + ((b * p.heads_q + hq) * p.nqb + qb) * D,
              p.kt.data() + (b * p.heads_kv + h) * D * nkb, r.key.data());
    float m = -INFINITY;
    for (int32_t kb : r.order) m = std::max(m, r.key[kb]);
    float z = 0.0f;
    for (int32_t kb : r.order) {
      r.weight[kb] = std::exp(r.key[kb] - m);
      z += r.weight[kb];
    }
    for (int32_t kb : r.order) {
      const float pr = r.weight[kb] / z;
      r.acc[kb] = gqa == GqaPlan::group_mean ? r.acc[kb] + pr : std::max(r.acc[kb], pr);
    }
  }
  if (gqa == GqaPlan::group_mean)
    for (int32_t kb : r.order) r.acc[kb] /= float(group);
  for (int32_t kb : r.order) r.weight[kb] = r.key[kb] = r.acc[kb];
  if (probs)
    for (int32_t kb : r.order) probs[kb] = r.weight[kb];
  return n;
}

// The kept blocks of a scored row: the first max(Top-k count, Top-p count) blocks of the
// ranking (key descending, ties to the lower index). Both halves are prefixes of one ranking, so
// their union is the longer prefix. The ranking is produced lazily from a heap: a row usually
// keeps a few blocks out of hundreds, and popping c of n costs O(n + c log n) instead of a sort.
void kept_prefix(RowScratch& r, double top_k, double top_p, std::vector<int32_t>& kept) {
  kept.clear();
  const int64_t n = int64_t(r.order.size());
  if (n == 0) return;
  int64_t count = 0;
  if (top_k > 0.0) {
    // k·n within 1e-9 of an integer counts as that integer, so that decimal fractions such as
    // 0.07 × 100 (= 7.000000000000001 in binary) do not round up to one more block.
    const double kn = top_k * double(n);
    count = std::clamp<int64_t>(int64_t(std::ceil(kn - 1e-9)), 1, n);
  }
  if (top_p >= 1.0) count = n;  // in exact arithmetic every block has positive mass
  const bool mass = top_p > 0.0 && count < n;
  float threshold = 0.0f;
  if (mass) {
    float total = 0.0f;
    for (int32_t kb : r.order) total += r.weight[kb];  // ascending block order
    threshold = float(top_p) * total;
  }
  const float* key = r.key.data();
  // "a ranks below c": lower key, or equal key and higher index.
  auto below = [key](int32_t a, int32_t c) { return key[a] < key[c] || (key[a] == key[c] && a > c); };
  auto end = r.order.end();
  std::make_heap(r.order.begin(), end, below);
  float cum = 0.0f;
  bool reached = !mass;
  while (end != r.order.begin() && (int64_t(kept.size()) < count || !reached)) {
    std::pop_heap(r.order.begin(), end, below);
    --end;
    kept.push_back(*end);
    if (mass) {
      cum += r.weight[*end];
      reached = reached || cum >= threshold;
    }
  }
}

int num_threads_of(const HybridOptions& opt) {
  return opt.num_threads > 0 ? opt.num_threads : omp_get_max_threads();
}

}  // namespace

namespace detail {

void check_hybrid_inputs(const char* where, const TensorRef& q, const TensorRef& k,
                         const HybridOptions& opt) {
  for (auto [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}}) {
    SPATTN_CHECK(t->rank == 4, where, ": ", name, " must have rank 4 (B, H, N, D); got ",
                 t->shape_string());
    SPATTN_CHECK(t->data != nullptr || t->numel() == 0, where, ": ", name,
                 " must point to memory; got a null pointer");
  }
  SPATTN_CHECK(k.device == q.device, where, ": k must be on q's device ", to_string(q.device),
               "; got ", to_string(k.device));
  SPATTN_CHECK(k.shape[0] == q.shape[0], where, ": k.shape[0] (batch) must equal q's ",
               q.shape[0], "; got ", k.shape[0]);
  SPATTN_CHECK(k.shape[3] == q.shape[3], where, ": k.shape[3] (head dim) must equal q's ",
               q.shape[3], "; got ", k.shape[3]);
  SPATTN_CHECK(k.shape[1] >= 1 && q.shape[1] % k.shape[1] == 0, where,
               ": q heads must be a multiple of k heads (GQA); got q heads ", q.shape[1],
               ", k heads ", k.shape[1]);
  SPATTN_CHECK(q.shape[0] >= 1, where, ": batch must be >= 1; got ", q.shape[0]);
  SPATTN_CHECK(opt.scale >= 0.0 && std::isfinite(opt.scale), where,
               ": scale must be finite and >= 0 (0 = 1/sqrt(D)); got ", opt.scale);
  SPATTN_CHECK(opt.sink_blocks >= 0, where, ": sink_blocks must be >= 0; got ", opt.sink_blocks);
  SPATTN_CHECK(opt.local_blocks >= -1, where,
               ": local_blocks must be >= 0 or -1 (off); got ", opt.local_blocks);
  SPATTN_CHECK(opt.num_threads >= 0, where, ": num_threads must be >= 0; got ", opt.num_threads);
  const int64_t plan_heads = opt.gqa == GqaPlan::per_query_head ? q.shape[1] : k.shape[1];
  for (auto [v, name] : {std::pair{&opt.top_k, "top_k"}, std::pair{&opt.top_p, "top_p"}}) {
    SPATTN_CHECK(v->size() == 1 || int64_t(v->size()) == plan_heads, where, ": ", name,
                 " must have 1 or ", plan_heads, " (plan heads) entries; got ", v->size());
    for (double x : *v)
      SPATTN_CHECK(x >= 0.0 && x <= 1.0, where, ": ", name, " values must be in [0, 1]; got ",
                   x);
  }
}

PlanGeometry hybrid_plan_geometry(const char* where, const TensorRef& q, const TensorRef& k,
                                  const HybridOptions& opt) {
  PlanGeometry g;
  g.batch = q.shape[0];
  g.heads = opt.gqa == GqaPlan::per_query_head ? q.shape[1] : k.shape[1];
  g.q_len = q.shape[2];
  g.k_len = k.shape[2];
  g.block_q = opt.block_q;
  g.block_k = opt.block_k;
  g.rule = opt.rule;
  g.validate(where);
  return g;
}

}  // namespace detail

BlockRange diagonal_band(const PlanGeometry& geo, int64_t qb, int64_t w) {
  BlockRange r;
  const int64_t q0 = qb * geo.block_q, q1 = std::min(geo.q_len, q0 + geo.block_q);
  const int64_t shift = geo.k_len - geo.q_len;
  const int64_t lo = std::max<int64_t>(q0 + shift, 0), hi = std::min(q1 - 1 + shift, geo.k_len - 1);
  if (q0 >= q1 || lo > hi) return r;
  r.first = std::max<int64_t>(lo / geo.block_k - w, 0);
  r.last = std::min(hi / geo.block_k + w, geo.num_k_blocks() - 1);
  return r;
}

BlockPlan select_hybrid(const TensorRef& q, const TensorRef& k, const HybridOptions& opt) {
  const Pooled p = pool_inputs("select_hybrid", q, k, opt);
  BlockPlan plan(p.geo);
  const int64_t heads = p.geo.heads, nqb = p.nqb, nkb = p.nkb;
  const int64_t rows = p.batch * heads * nqb;
#pragma omp parallel num_threads(num_threads_of(opt))
  {
    RowScratch r;
    r.key.resize(size_t(nkb));
    r.weight.resize(size_t(nkb));
    r.acc.resize(size_t(nkb));
    r.order.reserve(size_t(nkb));
    std::vector<int32_t> kept;
    kept.reserve(size_t(nkb));
#pragma omp for schedule(dynamic, 4)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t qb = row % nqb, h = (row / nqb) % heads, b = row / (nqb * heads);
      score_and_weigh(p, opt.gqa, b, h, qb, r, nullptr);
      const double tk = opt.top_k.size() == 1 ? opt.top_k[0] : opt.top_k[size_t(h)];
      const double tp = opt.top_p.size() == 1 ? opt.top_p[0] : opt.top_p[size_t(h)];
      kept_prefix(r, tk, tp, kept);
      for (int64_t kb = 0; kb < std::min(opt.sink_blocks, nkb); ++kb) kept.push_back(int32_t(kb));
      if (opt.local_blocks >= 0) {
        const BlockRange band = diagonal_band(p.geo, qb, opt.local_blocks);
        for (int64_t kb = band.first; kb <= band.last; ++kb) kept.push_back(int32_t(kb));
      }
      plan.set_row(b, h, qb, kept);  // drops tiles the rule empties, sorts, classifies
    }
  }
  return plan;
}

BlockScores hybrid_block_scores(const TensorRef& q, const TensorRef& k, const HybridOptions& opt) {
  const Pooled p = pool_inputs("hybrid_block_scores", q, k, opt);
  BlockScores out;
  out.geo = p.geo;
  const int64_t heads = p.geo.heads, nqb = p.nqb, nkb = p.nkb;
  const int64_t rows = p.batch * heads * nqb;
  out.prob.assign(size_t(rows * nkb), -1.0f);
#pragma omp parallel num_threads(num_threads_of(opt))
  {
    RowScratch r;
    r.key.resize(size_t(nkb));
    r.weight.resize(size_t(nkb));
    r.acc.resize(size_t(nkb));
#pragma omp for schedule(dynamic, 4)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t qb = row % nqb, h = (row / nqb) % heads, b = row / (nqb * heads);
      score_and_weigh(p, opt.gqa, b, h, qb, r, out.prob.data() + row * nkb);
    }
  }
  return out;
}

}  // namespace spattn
