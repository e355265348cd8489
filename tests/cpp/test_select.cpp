// The hybrid Top-k ∪ Top-p selector against a naive re-implementation, its properties, and plan
// algebra / statistics.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>

#include "spattn/error.hpp"
#include "spattn/select.hpp"

namespace spattn {
namespace {

Tensor random_tensor(std::vector<int64_t> shape, uint64_t seed, DType dtype = DType::float32,
                     std::vector<int> order = {}) {
  Tensor t = Tensor::empty(shape, dtype, order);
  fill_uniform(t, seed, -1.0, 1.0);
  return t;
}

// Naive hybrid rule for one row, written from REFERENCE.md §1(b) with plain loops: returns the
// kept kv blocks (before sinks/band), per query head or per group.
std::set<int32_t> naive_row(const Tensor& q, const Tensor& k, const HybridOptions& o, int64_t b,
                            int64_t h, int64_t qb) {
  const int64_t Hq = q.size(1), Hkv = k.size(1), Nq = q.size(2), Nk = k.size(2), D = q.size(3);
  PlanGeometry g{1, 1, Nq, Nk, o.block_q, o.block_k, o.rule};
  const int64_t nkb = g.num_k_blocks();
  const float scale = float(o.scale > 0 ? o.scale : 1.0 / std::sqrt(double(D)));
  auto pool = [&](const Tensor& t, int64_t hh, int64_t blk, int64_t bs, int64_t n) {
    std::vector<float> m(size_t(D), 0.0f);
    const int64_t n0 = blk * bs, n1 = std::min(n, n0 + bs);
    for (int64_t i = n0; i < n1; ++i)
      for (int64_t d = 0; d < D; ++d) m[size_t(d)] += float(t.get({b, hh, i, d}));
    for (auto& x : m) x /= float(n1 - n0);
    return m;
  };
  std::vector<int32_t> allowed;
  for (int64_t kb = 0; kb < nkb; ++kb)
    if (g.classify(qb, kb) != TileKind::empty) allowed.push_back(int32_t(kb));
  if (allowed.empty()) return {};
  const int64_t group = Hq / Hkv;
  std::vector<int64_t> heads;
  if (o.gqa == GqaPlan::per_query_head) heads = {h};
  else
    for (int64_t g2 = 0; g2 < group; ++g2) heads.push_back(h * group + g2);
  std::vector<float> key(size_t(nkb), 0.0f), w(size_t(nkb), 0.0f);
  for (size_t hi = 0; hi < heads.size(); ++hi) {
    const int64_t hq = heads[hi];
    const auto qbar = pool(q, hq, qb, o.block_q, Nq);
    std::vector<float> s(static_cast<size_t>(nkb));
    for (int32_t kb : allowed) {
      const auto kbar = pool(k, hq / group, kb, o.block_k, Nk);
      float acc = 0.0f;
      for (int64_t d = 0; d < D; ++d) acc = std::fma(qbar[size_t(d)], kbar[size_t(d)], acc);
      s[size_t(kb)] = acc * scale;
    }
    float m = -INFINITY;
    for (int32_t kb : allowed) m = std::max(m, s[size_t(kb)]);
    if (o.gqa == GqaPlan::per_query_head) {
      for (int32_t kb : allowed) {
        key[size_t(kb)] = s[size_t(kb)];
        w[size_t(kb)] = std::exp(s[size_t(kb)] - m);
      }
    } else {
      float z = 0.0f;
      for (int32_t kb : allowed) z += std::exp(s[size_t(kb)] - m);
      for (int32_t kb : allowed) {
        const float p = std::exp(s[size_t(kb)] - m) / z;
        if (o.gqa == GqaPlan::group_mean) w[size_t(kb)] += p;
        else w[size_t(kb)] = hi == 0 ? p : std::max(w[size_t(kb)], p);
      }
    }
  }
  if (o.gqa == GqaPlan::group_mean)
    for (int32_t kb : allowed) w[size_t(kb)] /= float(group);
  if (o.gqa != GqaPlan::per_query_head) key = w;
  std::vector<int32_t> order = allowed;  // ascending, so a stable sort breaks ties low-first
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t c) { return key[size_t(a)] > key[size_t(c)]; });
  const double tk = o.top_k.size() == 1 ? o.top_k[0] : o.top_k[size_t(h)];
  const double tp = o.top_p.size() == 1 ? o.top_p[0] : o.top_p[size_t(h)];
  const int64_t n = int64_t(order.size());
  std::set<int32_t> kept;
  if (tk > 0) {
    int64_t c = int64_t(std::ceil(tk * double(n) - 1e-9));
    c = std::clamp<int64_t>(c, 1, n);
    for (int64_t s = 0; s < c; ++s) kept.insert(order[size_t(s)]);
  }
  if (tp > 0) {
    float total = 0.0f;
    for (int32_t kb : allowed) total += w[size_t(kb)];  // ascending block order
    float cum = 0.0f;
    for (int64_t s = 0; s < n; ++s) {
      kept.insert(order[size_t(s)]);
      cum += w[size_t(order[size_t(s)])];
      if (tp < 1.0 && cum >= float(tp) * total) break;
    }
  }
  return kept;
}

void expect_matches_naive(const Tensor& q, const Tensor& k, const HybridOptions& o) {
  const BlockPlan plan = select_hybrid(q, k, o);
  const PlanGeometry& g = plan.geometry();
  ASSERT_EQ(g.heads, o.gqa == GqaPlan::per_query_head ? q.size(1) : k.size(1));
  validate_plan(plan.view(), "test");
  for (int64_t b = 0; b < g.batch; ++b)
    for (int64_t h = 0; h < g.heads; ++h)
      for (int64_t qb = 0; qb < g.num_q_blocks(); ++qb) {
        std::set<int32_t> want = naive_row(q, k, o, b, h, qb);
        for (int64_t kb = 0; kb < std::min(o.sink_blocks, g.num_k_blocks()); ++kb)
          if (g.classify(qb, kb) != TileKind::empty) want.insert(int32_t(kb));
        if (o.local_blocks >= 0) {
          const BlockRange r = diagonal_band(g, qb, o.local_blocks);
          for (int64_t kb = r.first; kb <= r.last; ++kb)
            if (g.classify(qb, kb) != TileKind::empty) want.insert(int32_t(kb));
        }
        const std::vector<int32_t> got = plan.tiles(b, h, qb);
        EXPECT_EQ(std::vector<int32_t>(want.begin(), want.end()), got)
            << "b=" << b << " h=" << h << " qb=" << qb;
      }
}

TEST(Hybrid, MatchesNaiveOddLengths) {
  const Tensor q = random_tensor({2, 2, 301, 24}, 1), k = random_tensor({2, 2, 517, 24}, 2);
  HybridOptions o;
  o.block_q = 32;
  o.block_k = 16;
  o.top_k = {0.1};
  o.top_p = {0.3};
  expect_matches_naive(q, k, o);
}

TEST(Hybrid, MatchesNaiveCausalPerHeadKP) {
  const Tensor q = random_tensor({1, 4, 250, 16}, 3), k = random_tensor({1, 4, 250, 16}, 4);
  HybridOptions o;
  o.block_q = 32;
  o.block_k = 16;
  o.rule.causal = true;
  o.top_k = {0.0, 0.05, 0.2, 0.5};
  o.top_p = {0.4, 0.0, 0.2, 0.9};
  expect_matches_naive(q, k, o);
}

TEST(Hybrid, MatchesNaiveCausalNqLessThanNkWindow) {
  const Tensor q = random_tensor({1, 2, 100, 16}, 5), k = random_tensor({1, 2, 333, 16}, 6);
  HybridOptions o;
  o.block_q = 16;
  o.block_k = 32;
  o.rule = {true, 150, -1};
  o.top_k = {0.2};
  o.top_p = {0.5};
  o.sink_blocks = 1;
  o.local_blocks = 1;
  expect_matches_naive(q, k, o);
}

TEST(Hybrid, MatchesNaiveGqaPerHeadAndGroups) {
  // bfloat16, B,N,H,D storage: any dtype and strides are accepted.
  const Tensor q = random_tensor({1, 6, 200, 32}, 7, DType::bfloat16, {0, 2, 1, 3});
  const Tensor k = random_tensor({1, 2, 190, 32}, 8, DType::bfloat16, {0, 2, 1, 3});
  HybridOptions o;
  o.block_q = 32;
  o.block_k = 16;
  o.rule.causal = true;
  o.top_k = {0.1};
  o.top_p = {0.3};
  for (GqaPlan g : {GqaPlan::per_query_head, GqaPlan::group_mean, GqaPlan::group_max}) {
    o.gqa = g;
    if (g == GqaPlan::group_max) o.top_p = {0.2, 0.6};  // per-group values
    expect_matches_naive(q, k, o);
  }
}

TEST(Hybrid, UnionContainsEachHalf) {
  const Tensor q = random_tensor({1, 3, 400, 16}, 9), k = random_tensor({1, 3, 400, 16}, 10);
  HybridOptions both, konly, ponly;
  for (HybridOptions* o : {&both, &konly, &ponly}) {
    o->block_q = 32;
    o->block_k = 16;
    o->rule.causal = true;
  }
  both.top_k = konly.top_k = {0.07};
  both.top_p = ponly.top_p = {0.35};
  konly.top_p = {0.0};
  ponly.top_k = {0.0};
  const BlockPlan u = select_hybrid(q, k, both), a = select_hybrid(q, k, konly),
                  b = select_hybrid(q, k, ponly);
  // The union equals the algebraic union of the two halves.
  EXPECT_EQ(plan_union(a, b).to_block_mask(), u.to_block_mask());
  EXPECT_EQ(plan_difference(a, u).num_tiles(), 0);
  EXPECT_EQ(plan_difference(b, u).num_tiles(), 0);
}

TEST(Hybrid, DensityMonotoneInKAndP) {
  const Tensor q = random_tensor({1, 2, 300, 16}, 11), k = random_tensor({1, 2, 700, 16}, 12);
  HybridOptions o;
  o.block_q = 16;
  o.block_k = 16;
  double last = -1;
  for (double kk : {0.0, 0.01, 0.05, 0.1, 0.3, 0.7, 1.0}) {
    o.top_k = {kk};
    o.top_p = {0.1};
    const double d = select_hybrid(q, k, o).density();
    EXPECT_GE(d, last) << "k=" << kk;
    last = d;
  }
  EXPECT_DOUBLE_EQ(last, 1.0);
  last = -1;
  for (double pp : {0.0, 0.05, 0.2, 0.5, 0.8, 0.95, 1.0}) {
    o.top_k = {0.02};
    o.top_p = {pp};
    const double d = select_hybrid(q, k, o).density();
    EXPECT_GE(d, last) << "p=" << pp;
    last = d;
  }
  EXPECT_DOUBLE_EQ(last, 1.0);
}

TEST(Hybrid, CausalPlansHoldNoFutureTile) {
  const Tensor q = random_tensor({2, 2, 333, 16}, 13), k = random_tensor({2, 2, 333, 16}, 14);
  HybridOptions o;
  o.block_q = 64;
  o.block_k = 16;
  o.rule.causal = true;
  o.top_k = {0.5};
  o.sink_blocks = 2;
  o.local_blocks = 3;
  const BlockPlan plan = select_hybrid(q, k, o);
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t qb = 0; qb < plan.geometry().num_q_blocks(); ++qb)
        for (int32_t kb : plan.tiles(b, h, qb))
          EXPECT_LE(kb * 16, std::min<int64_t>(333, (qb + 1) * 64) - 1) << qb << " " << kb;
}

TEST(Hybrid, TopKCountAndTies) {
  // Constant q and k: every score ties, so Top-k keeps the lowest-index blocks.
  Tensor q = Tensor::empty({1, 1, 64, 8}, DType::float32), k = Tensor::empty({1, 1, 160, 8}, DType::float32);
  fill_value(q, 0.5);
  fill_value(k, 0.25);
  HybridOptions o;
  o.block_q = 16;
  o.block_k = 16;
  o.top_k = {0.3};  // ceil(0.3 * 10) = 3
  o.top_p = {0.0};
  BlockPlan plan = select_hybrid(q, k, o);
  EXPECT_EQ(plan.tiles(0, 0, 0), (std::vector<int32_t>{0, 1, 2}));
  o.top_k = {0.001};  // at least one block
  plan = select_hybrid(q, k, o);
  EXPECT_EQ(plan.tiles(0, 0, 3), (std::vector<int32_t>{0}));
  o.top_k = {0.0};
  o.top_p = {0.25};  // equal masses 0.1 each: three blocks reach 0.3 >= 0.25
  plan = select_hybrid(q, k, o);
  EXPECT_EQ(plan.tiles(0, 0, 1), (std::vector<int32_t>{0, 1, 2}));
  o.top_p = {0.0};
  EXPECT_EQ(select_hybrid(q, k, o).num_tiles(), 0);  // both halves off: only sinks/band
}

TEST(Hybrid, ScoresAreRowDistributions) {
  const Tensor q = random_tensor({1, 4, 200, 16}, 15), k = random_tensor({1, 2, 200, 16}, 16);
  HybridOptions o;
  o.block_q = 32;
  o.block_k = 32;
  o.rule.causal = true;
  for (GqaPlan g : {GqaPlan::per_query_head, GqaPlan::group_mean}) {
    o.gqa = g;
    const BlockScores s = hybrid_block_scores(q, k, o);
    for (int64_t h = 0; h < s.geo.heads; ++h)
      for (int64_t qb = 0; qb < s.geo.num_q_blocks(); ++qb) {
        double sum = 0;
        for (int64_t kb = 0; kb < s.geo.num_k_blocks(); ++kb) {
          const float p = s.at(0, h, qb, kb);
          EXPECT_EQ(p < 0, s.geo.classify(qb, kb) == TileKind::empty);
          if (p >= 0) sum += p;
        }
        EXPECT_NEAR(sum, 1.0, 1e-5);
      }
  }
}

TEST(Hybrid, ThreadCountDoesNotChangeThePlan) {
  const Tensor q = random_tensor({1, 3, 500, 32}, 17), k = random_tensor({1, 3, 500, 32}, 18);
  HybridOptions o;
  o.block_q = 32;
  o.block_k = 16;
  o.num_threads = 1;
  const auto one = select_hybrid(q, k, o).to_block_mask();
  o.num_threads = 3;
  EXPECT_EQ(one, select_hybrid(q, k, o).to_block_mask());
}

TEST(Hybrid, UsageErrors) {
  const Tensor q = random_tensor({1, 3, 64, 16}, 19), k = random_tensor({1, 2, 64, 16}, 20);
  HybridOptions o;
  o.block_q = 16;
  o.block_k = 16;
  EXPECT_THROW(select_hybrid(q, k, o), Error);  // 3 q heads over 2 k heads
  const Tensor q2 = random_tensor({1, 4, 64, 16}, 21);
  o.top_k = {0.1, 0.2, 0.3};
  try {
    select_hybrid(q2, k, o);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("select_hybrid: top_k must have 1 or 4"), std::string::npos)
        << e.what();
  }
  o.top_k = {1.5};
  EXPECT_THROW(select_hybrid(q2, k, o), Error);
  o.top_k = {0.1};
  o.block_q = 48;
  EXPECT_THROW(select_hybrid(q2, k, o), Error);
}

// ---- algebra and statistics -----------------------------------------------------------------

BlockPlan random_plan(const PlanGeometry& g, uint64_t seed) {
  std::vector<uint8_t> m(size_t(g.num_rows() * g.num_k_blocks()));
  uint64_t s = seed;
  for (auto& x : m) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    x = (s >> 61) < 3;
  }
  return BlockPlan::from_block_mask(g, m);
}

TEST(Algebra, SetOperationsAgreeWithMasks) {
  PlanGeometry g{2, 3, 300, 200, 32, 16, {true, -1, -1}};
  const BlockPlan a = random_plan(g, 1), b = random_plan(g, 2);
  const auto ma = a.to_block_mask(), mb = b.to_block_mask();
  const auto mu = plan_union(a, b).to_block_mask(), mi = plan_intersection(a, b).to_block_mask(),
             md = plan_difference(a, b).to_block_mask();
  for (size_t i = 0; i < ma.size(); ++i) {
    EXPECT_EQ(mu[i], ma[i] | mb[i]);
    EXPECT_EQ(mi[i], ma[i] & mb[i]);
    EXPECT_EQ(md[i], ma[i] & !mb[i]);
  }
  validate_plan(plan_union(a, b).view(), "test");
}

TEST(Algebra, GeometryMismatchIsAnError) {
  PlanGeometry g{1, 2, 128, 128, 32, 32, {}};
  PlanGeometry h = g;
  h.rule.causal = true;
  EXPECT_THROW(plan_union(BlockPlan(g), BlockPlan(h)), Error);
  h = g;
  h.block_k = 16;
  try {
    plan_intersection(BlockPlan(g), BlockPlan(h));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("plan_intersection: b must have a's geometry"),
              std::string::npos);
  }
}

TEST(Stats, DensitiesOfDenseCausal) {
  PlanGeometry g{1, 2, 256, 256, 64, 64, {true, -1, -1}};
  const BlockPlan d = BlockPlan::dense(g);
  const PlanStats s = plan_stats(d);
  EXPECT_EQ(s.grid_tiles, 2 * 16);
  EXPECT_EQ(s.allowed_tiles, 2 * 10);
  EXPECT_EQ(s.tiles, 20);
  EXPECT_DOUBLE_EQ(s.allowed_density, 1.0);
  EXPECT_DOUBLE_EQ(s.density, 20.0 / 32.0);
  EXPECT_EQ(s.partial_tiles, 8);  // the diagonal
  ASSERT_EQ(s.head_density.size(), 2u);
  EXPECT_DOUBLE_EQ(s.head_density[1], 10.0 / 16.0);
  const auto rd = row_density(d);
  EXPECT_DOUBLE_EQ(rd[0], 0.25);
  EXPECT_DOUBLE_EQ(rd[3], 1.0);
}

}  // namespace
}  // namespace spattn
