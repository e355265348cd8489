// The block plan: the one contract between selectors (what to compute) and executors (how).
//
// Attention is computed over element pairs (query i, key j) such that
//   1. the tile (i / block_q, j / block_k) is listed in the plan for that (batch, head), and
//   2. the plan's element rule (MaskRule: causal and/or a sliding window) allows (i, j), and
//   3. i < q_len and j < k_len.
// Each row (batch, head, query block) lists its kv blocks in two ascending runs: *full* tiles,
// where every element pair passes 2 and 3 so kernels skip element masking, then *partial*
// tiles, where the rule or the sequence tail cuts through the tile. Plans never list a tile that
// the rule empties completely. Rows may be empty: such queries get out = 0, lse = -inf.
//
// Storage is plain int32 arrays so the same layout lives in host or device memory and can be
// written by a GPU selector without host synchronisation:
//   kv_index    (batch, heads, num_q_blocks, capacity)  full run, then partial run
//   num_full    (batch, heads, num_q_blocks)
//   num_partial (batch, heads, num_q_blocks)
// batch is 1 (broadcast) or B; heads is 1 (broadcast), Hkv (one plan per GQA group) or Hq.
//
// The transposed plan (per kv block, its query blocks, same full/partial split and layout with
// the roles of the two block axes swapped) drives the backward pass for dk and dv.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "spattn/tensor.hpp"

namespace spattn {

// Element rule shared by plans and kernels. Alignment for q_len != k_len is bottom-right,
// as in FlashAttention-2: query i sits at key position i + (k_len - q_len), so the last query
// sees the last key. With offset d = j - (i + k_len - q_len), (i, j) is allowed iff
//   (!causal || d <= 0) && (window_left < 0 || d >= -window_left)
//                       && (window_right < 0 || d <= window_right).
struct MaskRule {
  bool causal = false;
  int64_t window_left = -1;   // tokens to the left a query may see; -1 = unbounded
  int64_t window_right = -1;  // tokens to the right; -1 = unbounded

  bool is_unrestricted() const { return !causal && window_left < 0 && window_right < 0; }
  bool allows(int64_t i, int64_t j, int64_t q_len, int64_t k_len) const;
  // Smallest and largest allowed offset d (saturated to +-2^62 when unbounded).
  int64_t min_offset() const;
  int64_t max_offset() const;
  std::string to_string() const;  // "causal, window (128, 0)"
  friend bool operator==(const MaskRule&, const MaskRule&) = default;
};

enum class TileKind : uint8_t { empty, partial, full };

struct PlanGeometry {
  int64_t batch = 1;  // 1 broadcasts over B
  int64_t heads = 1;  // 1 broadcasts; else Hkv (per group) or Hq
  int64_t q_len = 0;
  int64_t k_len = 0;
  int block_q = 128;
  int block_k = 64;
  MaskRule rule{};

  int64_t num_q_blocks() const { return (q_len + block_q - 1) / block_q; }
  int64_t num_k_blocks() const { return (k_len + block_k - 1) / block_k; }
  int64_t num_rows() const { return batch * heads * num_q_blocks(); }
  // Whether tile (qb, kb) is empty, partial or full under the rule and the sequence tails.
  TileKind classify(int64_t qb, int64_t kb) const;
  // Throws spattn::Error unless block sizes are powers of two in [16, 256] and lengths >= 0.
  void validate(const char* where) const;
  friend bool operator==(const PlanGeometry&, const PlanGeometry&) = default;
};

// Non-owning view of plan arrays in host or device memory: what executors read.
struct PlanView {
  PlanGeometry geo;
  int64_t capacity = 0;  // slots per row in kv_index
  const int32_t* kv_index = nullptr;
  const int32_t* num_full = nullptr;
  const int32_t* num_partial = nullptr;
  Device device{};

  // The plan head serving query head hq of heads_q: itself, its GQA group, or head 0.
  int64_t head_for(int64_t hq, int64_t heads_q) const {
    return geo.heads == heads_q ? hq : geo.heads == 1 ? 0 : hq / (heads_q / geo.heads);
  }
  // Row index of (b, h, qb), h a plan head (see head_for); b broadcasts when batch is 1.
  int64_t row(int64_t b, int64_t h, int64_t qb) const {
    const int64_t pb = geo.batch == 1 ? 0 : b;
    const int64_t ph = geo.heads == 1 ? 0 : h;
    return (pb * geo.heads + ph) * geo.num_q_blocks() + qb;
  }
};

// Same layout, axes swapped: per (batch, head, kv block) the query blocks that visit it.
struct TransposedPlanView {
  PlanGeometry geo;
  int64_t capacity = 0;
  const int32_t* q_index = nullptr;  // (batch, heads, num_k_blocks, capacity)
  const int32_t* num_full = nullptr;
  const int32_t* num_partial = nullptr;
  Device device{};

  int64_t head_for(int64_t hq, int64_t heads_q) const {
    return geo.heads == heads_q ? hq : geo.heads == 1 ? 0 : hq / (heads_q / geo.heads);
  }
  int64_t row(int64_t b, int64_t h, int64_t kb) const {
    const int64_t pb = geo.batch == 1 ? 0 : b;
    const int64_t ph = geo.heads == 1 ? 0 : h;
    return (pb * geo.heads + ph) * geo.num_k_blocks() + kb;
  }
};

class TransposedPlan;
TransposedPlan transpose(const PlanView& plan);

// Host-owning plan. Builders (selectors, patterns) fill rows through set_row.
class BlockPlan {
 public:
  BlockPlan() = default;
  // An all-empty plan with room for every kv block in each row.
  explicit BlockPlan(const PlanGeometry& geo);

  // Every tile the rule does not empty (dense attention under the rule).
  static BlockPlan dense(const PlanGeometry& geo);
  // From a boolean block map (batch, heads, num_q_blocks, num_k_blocks), row-major, nonzero =
  // keep. Tiles the rule empties are dropped; the rest are classified full/partial.
  static BlockPlan from_block_mask(const PlanGeometry& geo, std::span<const uint8_t> mask);
  // Copies a view (host memory) into an owning plan and validates it.
  static BlockPlan from_view(const PlanView& view);

  // The block map (batch, heads, num_q_blocks, num_k_blocks), 1 = tile listed.
  std::vector<uint8_t> to_block_mask() const;

  // Replaces the row's tiles: `kv_blocks` in any order, duplicates allowed; out-of-range
  // indices throw; tiles the rule empties are dropped; the rest are sorted and classified.
  void set_row(int64_t b, int64_t h, int64_t qb, std::span<const int32_t> kv_blocks);

  std::span<const int32_t> full_tiles(int64_t b, int64_t h, int64_t qb) const;
  std::span<const int32_t> partial_tiles(int64_t b, int64_t h, int64_t qb) const;
  // Both runs merged in ascending order.
  std::vector<int32_t> tiles(int64_t b, int64_t h, int64_t qb) const;

  const PlanGeometry& geometry() const { return geo_; }
  int64_t num_tiles() const;  // listed tiles over all rows
  // Listed tiles / (rows x num_k_blocks): the share of the block grid that is computed.
  double density() const;
  PlanView view() const;
  TransposedPlan transpose() const;

  const std::vector<int32_t>& kv_index() const { return kv_index_; }
  const std::vector<int32_t>& num_full() const { return num_full_; }
  const std::vector<int32_t>& num_partial() const { return num_partial_; }

 private:
  PlanGeometry geo_{};
  int64_t capacity_ = 0;
  std::vector<int32_t> kv_index_, num_full_, num_partial_;
};

class TransposedPlan {
 public:
  TransposedPlanView view() const;
  std::span<const int32_t> full_tiles(int64_t b, int64_t h, int64_t kb) const;
  std::span<const int32_t> partial_tiles(int64_t b, int64_t h, int64_t kb) const;

 private:
  friend TransposedPlan transpose(const PlanView& plan);
  PlanGeometry geo_{};
  int64_t capacity_ = 0;
  std::vector<int32_t> q_index_, num_full_, num_partial_;
};

// Checks a view's geometry and contents: indices in range, each run ascending and unique, no
// index in both runs, tiles marked full really are full under the rule, no listed tile is empty.
// `where` prefixes the message. Host-memory views only (device views are checked by geometry).
void validate_plan(const PlanView& plan, const char* where);

// Transposes a host view into an owning transposed plan.
TransposedPlan transpose(const PlanView& plan);

}  // namespace spattn
