// Diagnostics (recall, relative L1), tuning and pictures.
#include <gtest/gtest.h>

#include <cmath>

#include "spattn/diagnostics.hpp"
#include "spattn/error.hpp"
#include "spattn/patterns.hpp"
#include "spattn/reference.hpp"

namespace spattn {
namespace {

Tensor random_tensor(std::vector<int64_t> shape, uint64_t seed, double scale = 1.0) {
  Tensor t = Tensor::empty(shape, DType::float32);
  fill_uniform(t, seed, -scale, scale);
  return t;
}

// Recall and relative L1 per head, from the materialised float64 reference.
TEST(Diagnostics, MatchesMaterialisedReference) {
  const int64_t B = 1, Hq = 4, Hkv = 2, N = 203, D = 16;
  // Larger q/k values make the softmax peaked, so recall is far from 1 and from 0.
  const Tensor q = random_tensor({B, Hq, N, D}, 1, 3.0), k = random_tensor({B, Hkv, N, D}, 2, 3.0);
  const Tensor v = random_tensor({B, Hkv, N, D}, 3);
  HybridOptions o;
  o.block_q = 32;
  o.block_k = 16;
  o.rule.causal = true;
  o.top_k = {0.1};
  o.top_p = {0.3};
  const BlockPlan plan = select_hybrid(q, k, o);
  AttentionParams params;
  params.mask = o.rule;
  const PlanQuality pq = evaluate_plan(q, k, v, plan, params);

  const auto dense = reference::forward(q, k, v, nullptr, params);
  const auto sparse = reference::forward(q, k, v, &plan, params);
  const auto emask = reference::element_mask(q, k, &plan, o.rule);
  const double scale = 1.0 / std::sqrt(double(D));
  double diff_all = 0, ref_all = 0;
  for (int64_t h = 0; h < Hq; ++h) {
    double recall = 0, diff = 0, ref = 0;
    for (int64_t i = 0; i < N; ++i) {
      // Dense softmax mass on the plan's pairs, materialised.
      std::vector<double> s(static_cast<size_t>(N));
      double m = -INFINITY;
      for (int64_t j = 0; j <= i; ++j) {
        double acc = 0;
        for (int64_t d = 0; d < D; ++d) acc += q.get({0, h, i, d}) * k.get({0, h / 2, j, d});
        s[size_t(j)] = acc * scale;
        m = std::max(m, s[size_t(j)]);
      }
      double z = 0, kept = 0;
      for (int64_t j = 0; j <= i; ++j) {
        const double e = std::exp(s[size_t(j)] - m);
        z += e;
        if (emask[size_t((h * N + i) * N + j)]) kept += e;
      }
      recall += kept / z;
      for (int64_t c = 0; c < D; ++c) {
        diff += std::abs(sparse.out.get({0, h, i, c}) - dense.out.get({0, h, i, c}));
        ref += std::abs(dense.out.get({0, h, i, c}));
      }
    }
    EXPECT_NEAR(pq.head_recall[size_t(h)], recall / double(N), 1e-4) << h;
    EXPECT_NEAR(pq.head_rel_l1[size_t(h)], diff / ref, 2e-4 + 1e-3 * diff / ref) << h;
    EXPECT_LT(pq.head_recall[size_t(h)], 0.999);
    diff_all += diff;
    ref_all += ref;
  }
  EXPECT_NEAR(pq.rel_l1, diff_all / ref_all, 2e-4);
  EXPECT_NEAR(pq.density, plan.density(), 1e-12);

  // The dense plan is exact.
  const PlanQuality full = evaluate_plan(q, k, v, causal_plan(plan.geometry()), params);
  EXPECT_NEAR(full.recall, 1.0, 1e-5);
  EXPECT_LT(full.rel_l1, 1e-5);
  params.mask = {};
  EXPECT_THROW(evaluate_plan(q, k, v, plan, params), Error);
}

TEST(Tuning, MeetsTargetPerHead) {
  const Tensor q = random_tensor({1, 3, 512, 32}, 4, 2.0), k = random_tensor({1, 3, 512, 32}, 5, 2.0);
  const Tensor v = random_tensor({1, 3, 512, 32}, 6);
  TuneOptions o;
  o.base.block_q = 32;
  o.base.block_k = 16;
  o.metric = TuneMetric::recall;
  o.target = 0.8;
  o.steps = 6;
  o.k_grid = {0.0, 0.05};
  const TuneResult r = tune_hybrid(q, k, v, o);
  ASSERT_EQ(r.top_k.size(), 3u);
  for (int64_t h = 0; h < 3; ++h) {
    EXPECT_GE(r.quality.head_recall[size_t(h)], 0.8) << h;
    EXPECT_LT(r.quality.head_density[size_t(h)], 1.0) << h;
  }
  EXPECT_EQ(r.evaluations, 3 * 6 + 1);
  o.metric = TuneMetric::rel_l1;
  o.target = 0.1;
  const TuneResult e = tune_hybrid(q, k, v, o);
  for (int64_t h = 0; h < 3; ++h) EXPECT_LE(e.quality.head_rel_l1[size_t(h)], 0.1) << h;
  o.target = -1;
  EXPECT_THROW(tune_hybrid(q, k, v, o), Error);
}

TEST(Render, PlanAndScores) {
  const PlanGeometry g{1, 3, 256, 256, 32, 32, {true, -1, -1}};
  const BlockPlan plan = BlockPlan::dense(g);
  const Image one = render_plan(plan, 0, 0, 80);
  EXPECT_EQ(one.width, 80);  // 8 tiles x 10 px
  EXPECT_EQ(one.height, 80);
  auto px = [](const Image& im, int x, int y) {
    const size_t o = (size_t(y) * size_t(im.width) + size_t(x)) * 3;
    return std::array<int, 3>{im.rgb[o], im.rgb[o + 1], im.rgb[o + 2]};
  };
  EXPECT_EQ(px(one, 75, 5), (std::array<int, 3>{205, 205, 205}));  // future tile: forbidden
  EXPECT_EQ(px(one, 5, 75), (std::array<int, 3>{31, 73, 158}));    // full tile
  EXPECT_EQ(px(one, 5, 5), (std::array<int, 3>{125, 170, 230}));   // diagonal: partial
  const Image grid = render_plan(plan, 0, -1, 80);
  EXPECT_EQ(grid.width, 2 * 40 + 2);  // 2 x 2 grid of 8-tile panels, 5 px cells, 2 px gap
  EXPECT_THROW(render_plan(plan, 0, 3), Error);

  const Tensor q = random_tensor({1, 3, 256, 16}, 7), k = random_tensor({1, 3, 256, 16}, 8);
  HybridOptions o;
  o.block_q = 32;
  o.block_k = 32;
  o.rule.causal = true;
  const Image s = render_scores(hybrid_block_scores(q, k, o), 0, 1, 80);
  EXPECT_EQ(s.width, 80);
  EXPECT_EQ(px(s, 75, 5), (std::array<int, 3>{205, 205, 205}));
  EXPECT_EQ(px(s, 5, 5), (std::array<int, 3>{253, 231, 37}));  // a one-block row is its own max
}

}  // namespace
}  // namespace spattn
