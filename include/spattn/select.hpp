// Selectors: the hybrid Top-k ∪ Top-p rule (SpargeAttention2), plan algebra and plan statistics.
// Static patterns are in patterns.hpp; quality measurement, tuning and pictures in
// diagnostics.hpp. docs/selectors.md states every rule exactly, including the summation orders a
// GPU selector must follow to reproduce these plans.
#pragma once

#include <cstdint>
#include <vector>

#include "spattn/plan.hpp"
#include "spattn/tensor.hpp"

namespace spattn {

// How GQA inputs (Hq query heads sharing Hkv key heads) map to plan heads.
enum class GqaPlan : uint8_t {
  per_query_head,  // plan heads = Hq: every query head selects from its own pooled scores
  group_mean,      // plan heads = Hkv: the group's row probabilities averaged over its heads
  group_max,       // plan heads = Hkv: the element-wise maximum of the group's row probabilities
};

struct HybridOptions {
  // Fractions in [0, 1], one value for every plan head or one per plan head (Hq or Hkv entries,
  // see `gqa`). 0 switches that half off (Top-k-only / Top-p-only ablations).
  std::vector<double> top_k{0.03};
  std::vector<double> top_p{0.20};
  double scale = 0.0;  // 0 means 1/sqrt(D)
  int block_q = 128;
  int block_k = 64;
  MaskRule rule{};          // structural mask: forbidden blocks never compete in the softmax
  int64_t sink_blocks = 0;  // always keep kv blocks [0, sink_blocks)
  int64_t local_blocks = -1;  // >= 0: always keep kv blocks within this many of the diagonal
  GqaPlan gqa = GqaPlan::per_query_head;
  int num_threads = 0;  // 0 = the OpenMP default
};

// q (B, Hq, Nq, D), k (B, Hkv, Nk, D): any dtype, any strides, host memory. The plan has
// batch B, heads Hq or Hkv (per `gqa`), the options' block sizes and rule.
BlockPlan select_hybrid(const TensorRef& q, const TensorRef& k, const HybridOptions& opt);

// The row distributions the hybrid rule ranks: (batch, plan heads, num_q_blocks, num_k_blocks)
// row-major. Per query head: softmax of the pooled scores over the allowed blocks. Per group:
// the mean or max of the group's softmax rows (a max row does not sum to 1). Forbidden tiles
// hold -1.
struct BlockScores {
  PlanGeometry geo;
  std::vector<float> prob;
  float at(int64_t b, int64_t h, int64_t qb, int64_t kb) const {
    return prob[size_t(((b * geo.heads + h) * geo.num_q_blocks() + qb) * geo.num_k_blocks() + kb)];
  }
};
BlockScores hybrid_block_scores(const TensorRef& q, const TensorRef& k, const HybridOptions& opt);

// The diagonal band of query block qb: kv blocks [first, last] holding the aligned key positions
// (i + Nk - Nq) of its queries, widened by `w` blocks each side and clipped to the grid. Empty
// (first > last) when no query of the block has an aligned key inside [0, Nk).
struct BlockRange {
  int64_t first = 0, last = -1;
};
BlockRange diagonal_band(const PlanGeometry& geo, int64_t qb, int64_t w);

// ---- plan algebra (operands must have equal geometry, rule included) ------------------------
BlockPlan plan_union(const BlockPlan& a, const BlockPlan& b);
BlockPlan plan_intersection(const BlockPlan& a, const BlockPlan& b);
BlockPlan plan_difference(const BlockPlan& a, const BlockPlan& b);  // tiles in a and not in b

// ---- statistics -----------------------------------------------------------------------------
struct PlanStats {
  int64_t tiles = 0;          // listed tiles
  int64_t allowed_tiles = 0;  // tiles the rule leaves non-empty (what a dense run computes)
  int64_t grid_tiles = 0;     // rows x num_k_blocks
  double density = 0;          // tiles / grid_tiles
  double allowed_density = 0;  // tiles / allowed_tiles (1 for a dense causal plan)
  int64_t full_tiles = 0, partial_tiles = 0;
  std::vector<double> head_density;          // per plan head, over batch and rows
  std::vector<double> head_allowed_density;  // per plan head
};
PlanStats plan_stats(const BlockPlan& plan);
// Listed tiles / num_k_blocks per row: (batch, heads, num_q_blocks) row-major.
std::vector<double> row_density(const BlockPlan& plan);
// Non-empty tiles of one (batch, head) slice of the geometry.
int64_t allowed_tiles_per_head(const PlanGeometry& geo);

}  // namespace spattn

// ---- plans written into caller-provided arrays (host or device) -----------------------------
namespace spattn {

// Caller-owned plan arrays in the layout of plan.hpp, in host memory (device.kind == cpu) or in
// the memory of one CUDA device. `geo` is the geometry the writer must produce (it is checked,
// not derived), `capacity` the slots per row of kv_index (at least max(num_k_blocks, 1)):
//   kv_index    (geo.batch, geo.heads, num_q_blocks, capacity)
//   num_full    (geo.batch, geo.heads, num_q_blocks)
//   num_partial (geo.batch, geo.heads, num_q_blocks)
struct PlanBuffers {
  PlanGeometry geo;
  int64_t capacity = 0;
  int32_t* kv_index = nullptr;
  int32_t* num_full = nullptr;
  int32_t* num_partial = nullptr;
  Device device{};

  PlanView view() const { return PlanView{geo, capacity, kv_index, num_full, num_partial, device}; }
};

// The geometry select_hybrid produces for these inputs and options (plan heads per opt.gqa).
PlanGeometry hybrid_geometry(const TensorRef& q, const TensorRef& k, const HybridOptions& opt);

// select_hybrid writing into `out`, dispatched by q's device:
//  * host q, k: the CPU selector, then a copy into `out` (host memory, or device memory through
//    copy_plan_to on `stream`);
//  * CUDA q, k: pooling, scoring and Top-k ∪ Top-p on the device, stream-ordered on `stream`
//    (a cudaStream_t; nullptr = the default stream) with no host synchronisation, so the call
//    can be captured in a CUDA graph. `out` must be on q's device. Same plans as the CPU selector
//    up to expf rounding at Top-p thresholds (docs/selectors.md, "GPU selector").
// GPU limits: head dim <= 256, num_k_blocks <= 8192, per-head top_k / top_p with at most
// kMaxDeviceHeadOptions entries (a single value serves any number of heads). opt.num_threads is
// ignored on the GPU.
inline constexpr int64_t kMaxDeviceHeadOptions = 128;
void select_hybrid_into(const TensorRef& q, const TensorRef& k, const HybridOptions& opt,
                        const PlanBuffers& out, void* stream = nullptr);

// Copies a host plan into `out` (host: memcpy; CUDA: cudaMemcpyAsync / cudaMemcpy2DAsync on
// `stream`). out.geo must equal the plan's geometry and out.capacity must hold every row. The
// device copy reads pageable host memory, so it is not meant for CUDA-graph capture (the graph
// would keep reading `host_plan`'s arrays).
void copy_plan_to(const BlockPlan& host_plan, const PlanBuffers& out, void* stream = nullptr);

// Every tile out.geo's rule leaves non-empty (BlockPlan::dense), built where `out` lives. Set
// out.geo.rule to what causal_plan / sliding_window_plan / mistral_plan write to get those
// patterns on the device.
void dense_plan_into(const PlanBuffers& out, void* stream = nullptr);

}  // namespace spattn
