// Pattern builders against brute force over element pairs, and full/partial classification
// against the reference's element mask.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>

#include "spattn/error.hpp"
#include "spattn/patterns.hpp"
#include "spattn/reference.hpp"
#include "spattn/select.hpp"

namespace spattn {
namespace {

using Pred = std::function<bool(int64_t i, int64_t j)>;

// A tile is kept iff some in-bounds pair is in the pattern and allowed by the plan's rule.
void expect_coarsening(const BlockPlan& plan, const Pred& in_pattern) {
  const PlanGeometry& g = plan.geometry();
  validate_plan(plan.view(), "test");
  const auto mask = plan.to_block_mask();
  const int64_t nqb = g.num_q_blocks(), nkb = g.num_k_blocks();
  for (int64_t qb = 0; qb < nqb; ++qb)
    for (int64_t kb = 0; kb < nkb; ++kb) {
      bool hit = false;
      for (int64_t i = qb * g.block_q; i < std::min(g.q_len, (qb + 1) * g.block_q) && !hit; ++i)
        for (int64_t j = kb * g.block_k; j < std::min(g.k_len, (kb + 1) * g.block_k) && !hit; ++j)
          hit = in_pattern(i, j) && g.rule.allows(i, j, g.q_len, g.k_len);
      for (int64_t b = 0; b < g.batch; ++b)
        for (int64_t h = 0; h < g.heads; ++h)
          ASSERT_EQ(bool(mask[size_t(((b * g.heads + h) * nqb + qb) * nkb + kb)]), hit)
              << "b=" << b << " h=" << h << " qb=" << qb << " kb=" << kb;
    }
}

PlanGeometry geo(int64_t nq, int64_t nk, int bq, int bk, MaskRule rule = {}) {
  return PlanGeometry{1, 2, nq, nk, bq, bk, rule};
}

TEST(Patterns, CausalAndWindowsAreRules) {
  const BlockPlan c = causal_plan(geo(300, 300, 32, 16));
  EXPECT_TRUE(c.geometry().rule.causal);
  expect_coarsening(c, [](int64_t, int64_t) { return true; });
  const BlockPlan w = sliding_window_plan(geo(300, 420, 32, 16, {true, -1, -1}), 50, 10);
  EXPECT_EQ(w.geometry().rule, (MaskRule{true, 50, 10}));
  expect_coarsening(w, [](int64_t, int64_t) { return true; });
  const BlockPlan m = mistral_plan(geo(500, 500, 16, 32), 100);
  EXPECT_EQ(m.geometry().rule, (MaskRule{true, 99, -1}));
  expect_coarsening(m, [](int64_t, int64_t) { return true; });
}

TEST(Patterns, DilatedWindow) {
  for (MaskRule rule : {MaskRule{}, MaskRule{true, -1, -1}}) {
    const PlanGeometry g = geo(333, 301, 16, 16, rule);
    const int64_t shift = g.k_len - g.q_len;
    for (int64_t dil : {1, 3, 40}) {
      const BlockPlan p = dilated_window_plan(g, 4, 2, dil);
      expect_coarsening(p, [&](int64_t i, int64_t j) {
        const int64_t d = j - i - shift;
        return d % dil == 0 && d >= -4 * dil && d <= 2 * dil;
      });
    }
  }
}

TEST(Patterns, SparseTransformerStrided) {
  const PlanGeometry g = geo(400, 400, 16, 16);
  for (FactorPart part : {FactorPart::both, FactorPart::local, FactorPart::summary}) {
    const BlockPlan p = strided_plan(g, 20, part);
    EXPECT_TRUE(p.geometry().rule.causal);
    expect_coarsening(p, [&](int64_t i, int64_t j) {
      const int64_t d = j - i;
      const bool local = d <= 0 && d > -20, summary = d <= 0 && (-d) % 20 == 0;
      return part == FactorPart::local ? local : part == FactorPart::summary ? summary
                                                                            : local || summary;
    });
  }
}

TEST(Patterns, SparseTransformerFixed) {
  for (int64_t nk : {300, 377}) {
    const PlanGeometry g = geo(300, nk, 32, 16);
    const int64_t shift = nk - 300;
    for (FactorPart part : {FactorPart::both, FactorPart::local, FactorPart::summary}) {
      const BlockPlan p = fixed_plan(g, 50, 5, part);
      expect_coarsening(p, [&](int64_t i, int64_t j) {
        const int64_t ip = i + shift;
        const bool local = j / 50 == ip / 50, summary = j % 50 >= 45;
        return j <= ip && (part == FactorPart::local     ? local
                           : part == FactorPart::summary ? summary
                                                         : local || summary);
      });
    }
  }
}

TEST(Patterns, Longformer) {
  const PlanGeometry g = geo(700, 700, 32, 32);
  LongformerOptions o;
  o.left = 20;
  o.right = 20;
  o.dilation = 2;
  o.global = {0, 333, 699};
  const BlockPlan p = longformer_plan(g, o);
  expect_coarsening(p, [&](int64_t i, int64_t j) {
    const int64_t d = j - i;
    const bool window = d % 2 == 0 && d >= -40 && d <= 40;
    const bool global = std::count(o.global.begin(), o.global.end(), i) ||
                        std::count(o.global.begin(), o.global.end(), j);
    return window || global;
  });
  o.global = {700};
  EXPECT_THROW(longformer_plan(g, o), Error);
}

TEST(Patterns, Documents) {
  const std::vector<int64_t> cu{0, 100, 100, 257, 300, 512};
  for (MaskRule rule : {MaskRule{}, MaskRule{true, -1, -1}}) {
    const PlanGeometry g = geo(512, 512, 32, 16, rule);
    const BlockPlan p = document_plan(g, cu);
    auto doc = [&](int64_t x) {
      return int64_t(std::upper_bound(cu.begin(), cu.end(), x) - cu.begin());
    };
    expect_coarsening(p, [&](int64_t i, int64_t j) { return doc(i) == doc(j); });
    EXPECT_GT(cross_document_tiles(p, cu), 0);
  }
  // Block-aligned documents never straddle a tile.
  const std::vector<int64_t> aligned{0, 64, 256};
  const BlockPlan q = document_plan(geo(256, 256, 32, 16), aligned);
  EXPECT_EQ(cross_document_tiles(q, aligned), 0);
  EXPECT_THROW(document_plan(geo(256, 256, 32, 16), std::vector<int64_t>{0, 100}), Error);
}

TEST(Patterns, VideoWindow) {
  VideoWindow v{4, 6, 10, 1, 2, 3};
  const int64_t n = 4 * 6 * 10;
  for (MaskRule rule : {MaskRule{}, MaskRule{true, -1, -1}}) {
    const BlockPlan p = video_window_plan(geo(n, n, 16, 16, rule), v);
    auto coords = [](int64_t x) { return std::array<int64_t, 3>{x / 60, (x / 10) % 6, x % 10}; };
    expect_coarsening(p, [&](int64_t i, int64_t j) {
      const auto a = coords(i), b = coords(j);
      return std::abs(a[0] - b[0]) <= 1 && std::abs(a[1] - b[1]) <= 2 && std::abs(a[2] - b[2]) <= 3;
    });
  }
  v.radius_t = -1;
  v.radius_w = 0;
  const BlockPlan p = video_window_plan(geo(n, n, 16, 16), v);
  expect_coarsening(p, [&](int64_t i, int64_t j) {
    return std::abs((i / 10) % 6 - (j / 10) % 6) <= 2 && i % 10 == j % 10;
  });
  EXPECT_THROW(video_window_plan(geo(n + 1, n + 1, 16, 16), v), Error);
}

TEST(Patterns, BigBirdReproducibleFromSeed) {
  const PlanGeometry g{2, 3, 1000, 1000, 64, 64, {}};
  BigBirdOptions o;
  o.seed = 42;
  const BlockPlan a = bigbird_plan(g, o), b = bigbird_plan(g, o);
  EXPECT_EQ(a.to_block_mask(), b.to_block_mask());
  o.seed = 43;
  EXPECT_NE(a.to_block_mask(), bigbird_plan(g, o).to_block_mask());
  // Rows outside the global rows hold band (3) + global (2) + random (3) blocks, all distinct.
  for (int64_t qb = 4; qb < g.num_q_blocks() - 2; ++qb) {
    const auto t = a.tiles(1, 2, qb);
    EXPECT_EQ(t.size(), 8u) << qb;
    EXPECT_TRUE(std::binary_search(t.begin(), t.end(), 0));
    EXPECT_TRUE(std::binary_search(t.begin(), t.end(), int32_t(qb)));
  }
  EXPECT_EQ(a.tiles(0, 0, 0).size(), size_t(g.num_k_blocks()));  // a global row
  // Heads differ in their random blocks.
  EXPECT_NE(a.tiles(0, 0, 8), a.tiles(0, 1, 8));
}

// Full/partial as the plan marks them agrees with the reference's element mask.
TEST(Patterns, ClassificationAgreesWithElementMask) {
  for (MaskRule rule : {MaskRule{}, MaskRule{true, -1, -1}, MaskRule{true, 40, -1},
                        MaskRule{false, 30, 17}}) {
    const int64_t nq = 150, nk = 205;
    const PlanGeometry g{1, 1, nq, nk, 32, 16, rule};
    const BlockPlan plan = dilated_window_plan(g, 30, 30, 1);
    Tensor q = Tensor::zeros({1, 1, nq, 8}, DType::float32);
    Tensor k = Tensor::zeros({1, 1, nk, 8}, DType::float32);
    const auto mask = reference::element_mask(q, k, &plan, rule);
    for (int64_t qb = 0; qb < g.num_q_blocks(); ++qb) {
      auto count = [&](int64_t kb) {
        int64_t on = 0, in = 0;
        for (int64_t i = qb * 32; i < std::min(nq, qb * 32 + 32); ++i)
          for (int64_t j = kb * 16; j < std::min(nk, kb * 16 + 16); ++j, ++in)
            on += mask[size_t(i * nk + j)];
        return std::pair{on, in};
      };
      for (int32_t kb : plan.full_tiles(0, 0, qb)) {
        const auto [on, in] = count(kb);
        EXPECT_EQ(on, 32 * 16) << rule.to_string() << " qb=" << qb << " kb=" << kb;
        EXPECT_EQ(in, 32 * 16);
      }
      for (int32_t kb : plan.partial_tiles(0, 0, qb)) {
        const auto [on, in] = count(kb);
        EXPECT_GT(on, 0);
        EXPECT_TRUE(on < in || in < 32 * 16) << rule.to_string() << " qb=" << qb << " kb=" << kb;
      }
      const auto listed = plan.tiles(0, 0, qb);
      for (int64_t kb = 0; kb < g.num_k_blocks(); ++kb)
        if (!std::binary_search(listed.begin(), listed.end(), int32_t(kb)))
          EXPECT_EQ(count(kb).first, 0);
    }
  }
}

TEST(Patterns, UsageErrors) {
  const PlanGeometry g = geo(128, 128, 32, 32);
  EXPECT_THROW(dilated_window_plan(g, 2, 2, 0), Error);
  EXPECT_THROW(strided_plan(g, 0), Error);
  EXPECT_THROW(fixed_plan(g, 10, 11), Error);
  EXPECT_THROW(mistral_plan(g, 0), Error);
  EXPECT_THROW(sliding_window_plan(g, -2, 3), Error);
  BigBirdOptions o;
  o.random_blocks = -1;
  EXPECT_THROW(bigbird_plan(g, o), Error);
}

}  // namespace
}  // namespace spattn
