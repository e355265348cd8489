// The block plan: tile classification against a brute-force element check, round trips between
// plans and block maps, the transposed view, and every validation error.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <string>

#include "spattn/error.hpp"
#include "spattn/plan.hpp"

namespace spattn {
namespace {

// Classification by visiting every element of the tile.
TileKind brute_force_kind(const PlanGeometry& g, int64_t qb, int64_t kb) {
  int64_t allowed = 0, total = 0;
  for (int64_t i = qb * g.block_q; i < (qb + 1) * g.block_q; ++i)
    for (int64_t j = kb * g.block_k; j < (kb + 1) * g.block_k; ++j) {
      ++total;
      if (i < g.q_len && j < g.k_len && g.rule.allows(i, j, g.q_len, g.k_len)) ++allowed;
    }
  return allowed == 0 ? TileKind::empty : allowed == total ? TileKind::full : TileKind::partial;
}

std::vector<MaskRule> rules() {
  return {MaskRule{}, MaskRule{true, -1, -1}, MaskRule{false, 40, 40}, MaskRule{true, 100, -1},
          MaskRule{false, 0, 17}, MaskRule{true, 16, 0}};
}

TEST(PlanGeometry, ClassifyMatchesElementRule) {
  const std::pair<int64_t, int64_t> lengths[] = {{1, 1}, {17, 129}, {129, 17}, {128, 128},
                                                 {200, 333}, {256, 64}};
  for (auto [nq, nk] : lengths)
    for (const MaskRule& rule : rules())
      for (auto [bq, bk] : {std::pair{16, 16}, {32, 16}, {16, 64}}) {
        PlanGeometry g{1, 1, nq, nk, bq, bk, rule};
        for (int64_t qb = 0; qb < g.num_q_blocks(); ++qb)
          for (int64_t kb = 0; kb < g.num_k_blocks(); ++kb)
            ASSERT_EQ(int(g.classify(qb, kb)), int(brute_force_kind(g, qb, kb)))
                << "nq=" << nq << " nk=" << nk << " rule=" << rule.to_string() << " tile (" << qb
                << ", " << kb << ") blocks " << bq << "x" << bk;
      }
}

TEST(MaskRule, BottomRightCausalAlignment) {
  MaskRule causal{true, -1, -1};
  // Nq = 2, Nk = 5: query 0 sits at key 3, query 1 at key 4.
  EXPECT_TRUE(causal.allows(0, 3, 2, 5));
  EXPECT_FALSE(causal.allows(0, 4, 2, 5));
  EXPECT_TRUE(causal.allows(1, 4, 2, 5));
  // Nq = 5, Nk = 2: the first three queries see nothing.
  EXPECT_FALSE(causal.allows(2, 0, 5, 2));
  EXPECT_TRUE(causal.allows(3, 0, 5, 2));
}

TEST(BlockPlan, BlockMaskRoundTripAndClassification) {
  std::mt19937 rng(3);
  for (const MaskRule& rule : rules()) {
    PlanGeometry g{2, 3, 300, 450, 64, 32, rule};
    std::vector<uint8_t> mask(size_t(g.num_rows() * g.num_k_blocks()));
    for (auto& m : mask) m = rng() % 3 == 0;
    BlockPlan plan = BlockPlan::from_block_mask(g, mask);
    validate_plan(plan.view(), "test");
    const auto back = plan.to_block_mask();
    for (int64_t b = 0; b < g.batch; ++b)
      for (int64_t h = 0; h < g.heads; ++h)
        for (int64_t qb = 0; qb < g.num_q_blocks(); ++qb) {
          const int64_t r = plan.view().row(b, h, qb);
          for (int64_t kb = 0; kb < g.num_k_blocks(); ++kb) {
            const size_t at = size_t(r * g.num_k_blocks() + kb);
            const TileKind kind = g.classify(qb, kb);
            // Kept iff asked for and not emptied by the rule.
            EXPECT_EQ(back[at], uint8_t(mask[at] && kind != TileKind::empty));
          }
          for (int32_t kb : plan.full_tiles(b, h, qb))
            EXPECT_EQ(int(g.classify(qb, kb)), int(TileKind::full));
          for (int32_t kb : plan.partial_tiles(b, h, qb))
            EXPECT_EQ(int(g.classify(qb, kb)), int(TileKind::partial));
          auto all = plan.tiles(b, h, qb);
          EXPECT_TRUE(std::is_sorted(all.begin(), all.end()));
        }
  }
}

TEST(BlockPlan, SetRowSortsDeduplicatesAndDropsEmptyTiles) {
  PlanGeometry g{1, 1, 256, 256, 64, 64, MaskRule{true, -1, -1}};
  BlockPlan plan(g);
  const int32_t blocks[] = {3, 0, 1, 1, 0};
  plan.set_row(0, 0, 1, blocks);  // query block 1: kv 0 full, kv 1 diagonal, kv 3 future
  EXPECT_EQ(std::vector<int32_t>(plan.full_tiles(0, 0, 1).begin(), plan.full_tiles(0, 0, 1).end()),
            std::vector<int32_t>({0}));
  EXPECT_EQ(std::vector<int32_t>(plan.partial_tiles(0, 0, 1).begin(),
                                 plan.partial_tiles(0, 0, 1).end()),
            std::vector<int32_t>({1}));
  EXPECT_EQ(plan.num_tiles(), 2);
  const int32_t bad[] = {4};
  EXPECT_THROW(plan.set_row(0, 0, 0, bad), Error);
}

TEST(BlockPlan, DenseCausalDensityIsLowerTriangle) {
  PlanGeometry g{1, 1, 512, 512, 64, 64, MaskRule{true, -1, -1}};
  BlockPlan plan = BlockPlan::dense(g);
  EXPECT_EQ(plan.num_tiles(), 8 * 9 / 2);
  EXPECT_DOUBLE_EQ(plan.density(), 36.0 / 64.0);
}

TEST(BlockPlan, TransposeListsEveryTileOnceInOrder) {
  std::mt19937 rng(11);
  PlanGeometry g{1, 2, 1000, 700, 128, 64, MaskRule{true, 300, -1}};
  std::vector<uint8_t> mask(size_t(g.num_rows() * g.num_k_blocks()));
  for (auto& m : mask) m = rng() % 2;
  BlockPlan plan = BlockPlan::from_block_mask(g, mask);
  TransposedPlan t = plan.transpose();
  for (int64_t h = 0; h < g.heads; ++h)
    for (int64_t kb = 0; kb < g.num_k_blocks(); ++kb) {
      auto full = t.full_tiles(0, h, kb), part = t.partial_tiles(0, h, kb);
      EXPECT_TRUE(std::is_sorted(full.begin(), full.end()));
      EXPECT_TRUE(std::is_sorted(part.begin(), part.end()));
      for (int32_t qb : full) {
        auto f = plan.full_tiles(0, h, qb);
        EXPECT_TRUE(std::binary_search(f.begin(), f.end(), int32_t(kb)));
      }
      for (int32_t qb : part) {
        auto p = plan.partial_tiles(0, h, qb);
        EXPECT_TRUE(std::binary_search(p.begin(), p.end(), int32_t(kb)));
      }
    }
  int64_t total = 0;
  for (int64_t h = 0; h < g.heads; ++h)
    for (int64_t kb = 0; kb < g.num_k_blocks(); ++kb)
      total += int64_t(t.full_tiles(0, h, kb).size() + t.partial_tiles(0, h, kb).size());
  EXPECT_EQ(total, plan.num_tiles());
}

// Runs validate_plan on a hand-edited copy of a plan and returns the error message.
std::string validation_message(const BlockPlan& plan, int64_t capacity,
                               std::vector<int32_t> kv_index, std::vector<int32_t> num_full,
                               std::vector<int32_t> num_partial) {
  PlanView v = plan.view();
  v.capacity = capacity;
  v.kv_index = kv_index.data();
  v.num_full = num_full.data();
  v.num_partial = num_partial.data();
  try {
    validate_plan(v, "check");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(ValidatePlan, EveryErrorNamesTheProblem) {
  PlanGeometry g{1, 1, 256, 256, 64, 64, MaskRule{true, -1, -1}};
  BlockPlan plan(g);  // 4 rows, capacity 4
  auto has = [](const std::string& msg, const char* what) {
    return msg.find(what) != std::string::npos;
  };
  std::string m;
  m = validation_message(plan, 4, {9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
                         {1, 0, 0, 0}, {0, 0, 0, 0});
  EXPECT_TRUE(has(m, "must be in [0, 4); got 9")) << m;
  // Row 3 (query block 3) lists kv 1 then kv 0 in its full run.
  m = validation_message(plan, 4, {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0},
                         {0, 0, 0, 2}, {0, 0, 0, 0});
  EXPECT_TRUE(has(m, "strictly ascending")) << m;
  EXPECT_TRUE(has(m, "got 1 then 0")) << m;
  // Diagonal tile marked full.
  m = validation_message(plan, 4, {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
                         {1, 0, 0, 0}, {0, 0, 0, 0});
  EXPECT_TRUE(has(m, "marks kv block 0 full")) << m;
  // A future tile under causal.
  m = validation_message(plan, 4, {2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
                         {0, 0, 0, 0}, {1, 0, 0, 0});
  EXPECT_TRUE(has(m, "leaves empty")) << m;
  // Same tile in both runs.
  m = validation_message(plan, 4, {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
                         {0, 0, 0, 1}, {0, 0, 0, 1});
  EXPECT_TRUE(has(m, "twice")) << m;
  // Counts beyond capacity.
  m = validation_message(plan, 4, std::vector<int32_t>(16, 0), {0, 3, 0, 0}, {0, 2, 0, 0});
  EXPECT_TRUE(has(m, "capacity (4)")) << m;
  EXPECT_TRUE(has(m, "num_full=3, num_partial=2")) << m;
}

TEST(PlanGeometry, BadBlockSizesAreRejected) {
  for (int bad : {0, 8, 48, 512}) {
    try {
      BlockPlan plan(PlanGeometry{1, 1, 100, 100, bad, 64, {}});
      FAIL() << "block_q " << bad << " accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("block_q must be a power of two in [16, 256]; got " +
                                           std::to_string(bad)),
                std::string::npos)
          << e.what();
    }
  }
  EXPECT_THROW(BlockPlan(PlanGeometry{1, 1, 100, 100, 64, 24, {}}), Error);
  EXPECT_THROW(BlockPlan(PlanGeometry{0, 1, 100, 100, 64, 64, {}}), Error);
  EXPECT_THROW(BlockPlan(PlanGeometry{1, 1, 100, 100, 64, 64, MaskRule{false, -5, -1}}), Error);
}

TEST(BlockPlan, FromBlockMaskChecksSize) {
  PlanGeometry g{1, 1, 128, 128, 64, 64, {}};
  std::vector<uint8_t> wrong(3, 1);
  try {
    (void)BlockPlan::from_block_mask(g, wrong);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("= 4 entries; got 3"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace spattn
