// Plan quality (sparsity, recall, output error), automatic tuning of the hybrid rule, and
// pictures of plans and block scores (RGB buffers; the CLI writes them as PNG).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "spattn/attention.hpp"
#include "spattn/select.hpp"

namespace spattn {

// Quality of a plan on given q, k, v, measured against dense attention under the plan's rule.
// All vectors are per query head (Hq entries).
//   density: listed tiles / grid tiles of the plan head serving the query head.
//   recall:  share of the dense softmax mass inside the plan, averaged over the query rows that
//            see at least one key: exp(lse_sparse - lse_dense) per row, from the two forward
//            passes' lse (streaming; nothing N×N is materialised).
//   rel_l1:  sum |out_sparse - out_dense| / sum |out_dense|.
struct PlanQuality {
  double density = 0, recall = 0, rel_l1 = 0;
  std::vector<double> head_density, head_recall, head_rel_l1;
};
// params.mask must equal the plan's rule (as for forward). Uses spattn::forward twice.
PlanQuality evaluate_plan(const TensorRef& q, const TensorRef& k, const TensorRef& v,
                          const BlockPlan& plan, const AttentionParams& params = {});

// ---- automatic tuning of the hybrid rule ----------------------------------------------------
enum class TuneMetric : uint8_t { rel_l1, recall };

struct TuneOptions {
  TuneMetric metric = TuneMetric::rel_l1;
  double target = 0.05;  // rel_l1 <= target, or recall >= target, per head
  HybridOptions base{};  // block sizes, rule, scale, sinks, band, threads (top_k/top_p ignored)
  // Top-k values tried; for each, Top-p is bisected. A Top-k-only search (p = 0) is added.
  std::vector<double> k_grid{0.0, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12};
  int steps = 8;  // bisection steps per search (resolution 2^-steps)
};

struct TuneResult {
  std::vector<double> top_k, top_p;  // per query head
  PlanQuality quality;               // of the chosen per-head (k, p)
  BlockPlan plan;                    // the chosen plan on the calibration q, k
  int evaluations = 0;               // sparse forward passes spent
  double seconds = 0;
};
// Per query head, the (k, p) with the lowest density that meets the target on the calibration
// q, k, v. Heads are searched together: every bisection step is one plan and one forward for all
// heads. Plans are per query head (HybridOptions::gqa is forced to per_query_head).
TuneResult tune_hybrid(const TensorRef& q, const TensorRef& k, const TensorRef& v,
                       const TuneOptions& opt);

// ---- pictures -------------------------------------------------------------------------------
struct Image {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;  // (height, width, 3) row-major
};
// One cell per tile (scaled up to about `target_side` pixels): full tiles dark blue, partial
// tiles light blue, tiles the rule allows but the plan skips white, forbidden tiles grey.
// head = -1 draws every plan head of batch `b` in a grid.
Image render_plan(const BlockPlan& plan, int64_t b = 0, int64_t head = 0, int target_side = 768);
// The row distributions of hybrid_block_scores on a log colour scale (dark = low, yellow =
// the row maximum); forbidden tiles grey. head = -1 draws a grid.
Image render_scores(const BlockScores& scores, int64_t b = 0, int64_t head = 0,
                    int target_side = 768);

}  // namespace spattn
