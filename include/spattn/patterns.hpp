// Classic sparse-attention patterns as plan builders: PlanGeometry in, BlockPlan out.
//
// Two kinds:
//  * Rule patterns (causal, sliding window, Mistral) are exact at element level: the builder
//    writes the pattern into the geometry's MaskRule and lists every tile the rule leaves
//    non-empty. Call forward with params.mask = plan.geometry().rule.
//  * Token patterns (dilated, strided, fixed, Longformer globals, documents, video) are coarsened
//    to tiles: a tile is kept iff at least one of its element pairs (i, j) is in the pattern AND
//    allowed by the geometry's rule (and inside both sequences). Inside a kept tile every pair the
//    rule allows is computed, so the result attends to a superset of the token pattern.
// Positions: query i sits at key position i + (k_len - q_len) (bottom-right alignment, as in
// MaskRule); "offset" means d = j - (i + k_len - q_len). Every (batch, head) row gets the same
// tiles except BigBird's random blocks, which differ per (batch, head) and are fixed by the seed.
// docs/selectors.md gives the exact definitions.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "spattn/plan.hpp"

namespace spattn {

// geo.rule with causal set; the dense plan of that rule.
BlockPlan causal_plan(PlanGeometry geo);

// Tokens at offsets [-left, right] (either -1 = unbounded), intersected with geo.rule.
BlockPlan sliding_window_plan(PlanGeometry geo, int64_t left, int64_t right);

// Mistral: causal, each query sees itself and the `window - 1` keys before it.
BlockPlan mistral_plan(PlanGeometry geo, int64_t window = 4096);

// Offsets d = m·dilation for m in [-left, right] (counts of attended positions each side;
// dilation 1 is a plain window). Coarsened to tiles.
BlockPlan dilated_window_plan(const PlanGeometry& geo, int64_t left, int64_t right,
                              int64_t dilation);

// Sparse Transformer (Child et al. 2019). The two factorised heads of a layer pair, or their
// union in one plan. `causal` adds the rule's causal flag (the paper's setting).
enum class FactorPart : uint8_t { both, local, summary };
// Strided: local = offsets (-stride, 0]; summary = offsets that are multiples of stride, <= 0.
BlockPlan strided_plan(PlanGeometry geo, int64_t stride, FactorPart part = FactorPart::both,
                       bool causal = true);
// Fixed: local = keys in the query's own segment of `segment` key positions; summary = keys
// whose position mod segment >= segment - summary (the last `summary` of every segment).
BlockPlan fixed_plan(PlanGeometry geo, int64_t segment, int64_t summary,
                     FactorPart part = FactorPart::both, bool causal = true);

// Longformer: a dilated window (left/right counts, dilation) plus global tokens: query index g
// attends every key and every query attends key index g, for each g in `global`.
struct LongformerOptions {
  int64_t left = 256, right = 256, dilation = 1;
  std::vector<int64_t> global;
};
BlockPlan longformer_plan(const PlanGeometry& geo, const LongformerOptions& opt);

// BigBird at block level: the diagonal band widened by window_blocks / 2 kv blocks each side,
// the first global_blocks kv blocks for every row, every kv block for the query blocks holding
// the first global_blocks × block_k query positions, and random_blocks more kv blocks per row,
// drawn without replacement among the allowed blocks not yet kept, from (seed, b, h, qb).
struct BigBirdOptions {
  int64_t window_blocks = 3;
  int64_t global_blocks = 2;
  int64_t random_blocks = 3;
  uint64_t seed = 0;
};
BlockPlan bigbird_plan(const PlanGeometry& geo, const BigBirdOptions& opt);

// Packed variable-length batch: cu_seqlens = {0, n1, n1+n2, ..., total} with total = q_len =
// k_len. Keeps the tiles that hold at least one same-document pair the rule allows. Tiles that
// straddle a document boundary are computed in full: MaskRule has no document term yet, so
// cross-document pairs inside such tiles are attended unless every document length is a
// multiple of both block sizes (then no tile straddles). See cross_document_tiles.
BlockPlan document_plan(const PlanGeometry& geo, std::span<const int64_t> cu_seqlens);
// Listed tiles of `plan` (per (batch 0, head 0) slice) that hold a cross-document pair the rule
// allows: the tiles where document_plan leaks.
int64_t cross_document_tiles(const BlockPlan& plan, std::span<const int64_t> cu_seqlens);

// Video tokens laid out (T, H, W) raster order (w fastest), q_len = k_len = T·H·W. A query at
// (t, h, w) attends keys with |t'-t| <= radius_t, |h'-h| <= radius_h, |w'-w| <= radius_w
// (radii in tokens along each axis; -1 = the whole axis). Coarsened to tiles.
struct VideoWindow {
  int64_t frames = 1, height = 1, width = 1;
  int64_t radius_t = 1, radius_h = 1, radius_w = 1;
};
BlockPlan video_window_plan(const PlanGeometry& geo, const VideoWindow& win);

}  // namespace spattn
