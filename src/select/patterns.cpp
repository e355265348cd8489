// Static pattern builders. Every token pattern here is a union of "rectangles with an offset
// band": query indices [i0, i1] × key indices [j0, j1] restricted to offsets d in [dlo, dhi].
// Such a rectangle realises every integer offset between its extreme offsets, so whether it holds
// a pair the rule allows is a comparison of intervals (rect_hits) — exact, and O(1) per test,
// which keeps the builders linear in the number of tiles.
#include <algorithm>
#include <numeric>

#include "spattn/error.hpp"
#include "spattn/patterns.hpp"
#include "spattn/select.hpp"

namespace spattn {

namespace {

constexpr int64_t kInf = int64_t(1) << 62;

// Does some (i, j) with i in [i0, i1], j in [j0, j1] have offset d = j - i - shift inside
// [dlo, dhi] and inside the rule's offsets?
bool rect_hits(const PlanGeometry& g, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
               int64_t dlo = -kInf, int64_t dhi = kInf) {
  if (i0 > i1 || j0 > j1) return false;
  const int64_t shift = g.k_len - g.q_len;
  const int64_t lo = std::max({dlo, g.rule.min_offset(), j0 - i1 - shift});
  const int64_t hi = std::min({dhi, g.rule.max_offset(), j1 - i0 - shift});
  return lo <= hi;
}

int64_t floor_div(int64_t a, int64_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0))); }

struct Tile {
  int64_t q0, q1, k0, k1;  // inclusive index ranges
};
Tile tile_of(const PlanGeometry& g, int64_t qb, int64_t kb) {
  return {qb * g.block_q, std::min(g.q_len, (qb + 1) * g.block_q) - 1, kb * g.block_k,
          std::min(g.k_len, (kb + 1) * g.block_k) - 1};
}

// Builds a plan whose row (qb) is the same for every (batch, head): keep(qb, kb) decides.
template <class Keep>
BlockPlan build_uniform(const PlanGeometry& geo, Keep keep) {
  BlockPlan plan(geo);
  const int64_t nqb = geo.num_q_blocks(), nkb = geo.num_k_blocks();
  std::vector<int32_t> row;
  for (int64_t qb = 0; qb < nqb; ++qb) {
    row.clear();
    for (int64_t kb = 0; kb < nkb; ++kb)
      if (keep(qb, kb)) row.push_back(int32_t(kb));
    for (int64_t b = 0; b < geo.batch; ++b)
      for (int64_t h = 0; h < geo.heads; ++h) plan.set_row(b, h, qb, row);
  }
  return plan;
}

// Window bounds combined with a rule's: -1 is unbounded, otherwise the tighter one wins.
int64_t tighter(int64_t a, int64_t b) { return a < 0 ? b : b < 0 ? a : std::min(a, b); }

// Some multiple of `step` in the offsets a tile realises, within [dlo, dhi] and the rule?
bool tile_has_multiple(const PlanGeometry& g, const Tile& t, int64_t step, int64_t dlo,
                       int64_t dhi) {
  const int64_t shift = g.k_len - g.q_len;
  const int64_t lo = std::max({dlo, g.rule.min_offset(), t.k0 - t.q1 - shift});
  const int64_t hi = std::min({dhi, g.rule.max_offset(), t.k1 - t.q0 - shift});
  if (lo > hi) return false;
  const int64_t first = -floor_div(-lo, step) * step;  // smallest multiple of step >= lo
  return first <= hi;
}

}  // namespace

BlockPlan causal_plan(PlanGeometry geo) {
  geo.rule.causal = true;
  return BlockPlan::dense(geo);
}

BlockPlan sliding_window_plan(PlanGeometry geo, int64_t left, int64_t right) {
  SPATTN_CHECK(left >= -1 && right >= -1,
               "sliding_window_plan: left and right must be >= 0 or -1 (unbounded); got (", left,
               ", ", right, ")");
  geo.rule.window_left = tighter(geo.rule.window_left, left);
  geo.rule.window_right = tighter(geo.rule.window_right, right);
  return BlockPlan::dense(geo);
}

BlockPlan mistral_plan(PlanGeometry geo, int64_t window) {
  SPATTN_CHECK(window >= 1, "mistral_plan: window must be >= 1; got ", window);
  geo.rule.causal = true;
  geo.rule.window_left = tighter(geo.rule.window_left, window - 1);
  return BlockPlan::dense(geo);
}

BlockPlan dilated_window_plan(const PlanGeometry& geo, int64_t left, int64_t right,
                              int64_t dilation) {
  SPATTN_CHECK(left >= 0 && right >= 0, "dilated_window_plan: left and right must be >= 0; got (",
               left, ", ", right, ")");
  SPATTN_CHECK(dilation >= 1, "dilated_window_plan: dilation must be >= 1; got ", dilation);
  geo.validate("dilated_window_plan");
  return build_uniform(geo, [&](int64_t qb, int64_t kb) {
    return tile_has_multiple(geo, tile_of(geo, qb, kb), dilation, -left * dilation,
                             right * dilation);
  });
}

BlockPlan strided_plan(PlanGeometry geo, int64_t stride, FactorPart part, bool causal) {
  SPATTN_CHECK(stride >= 1, "strided_plan: stride must be >= 1; got ", stride);
  geo.validate("strided_plan");
  if (causal) geo.rule.causal = true;
  return build_uniform(geo, [&](int64_t qb, int64_t kb) {
    const Tile t = tile_of(geo, qb, kb);
    const bool local = part != FactorPart::summary &&
                       rect_hits(geo, t.q0, t.q1, t.k0, t.k1, -(stride - 1), 0);
    return local || (part != FactorPart::local && tile_has_multiple(geo, t, stride, -kInf, 0));
  });
}

BlockPlan fixed_plan(PlanGeometry geo, int64_t segment, int64_t summary, FactorPart part,
                     bool causal) {
  SPATTN_CHECK(segment >= 1, "fixed_plan: segment must be >= 1; got ", segment);
  SPATTN_CHECK(summary >= 1 && summary <= segment, "fixed_plan: summary must be in [1, segment = ",
               segment, "]; got ", summary);
  geo.validate("fixed_plan");
  if (causal) geo.rule.causal = true;
  const int64_t shift = geo.k_len - geo.q_len;
  return build_uniform(geo, [&](int64_t qb, int64_t kb) {
    const Tile t = tile_of(geo, qb, kb);
    if (part != FactorPart::summary) {
      // Segments met by both the queries' aligned positions and the keys.
      const int64_t s0 = std::max(floor_div(t.q0 + shift, segment), floor_div(t.k0, segment));
      const int64_t s1 = std::min(floor_div(t.q1 + shift, segment), floor_div(t.k1, segment));
      for (int64_t s = s0; s <= s1; ++s) {
        const int64_t lo = s * segment, hi = lo + segment - 1;
        if (rect_hits(geo, std::max(t.q0, lo - shift), std::min(t.q1, hi - shift),
                      std::max(t.k0, lo), std::min(t.k1, hi), -kInf, 0))
          return true;
      }
    }
    if (part != FactorPart::local) {
      for (int64_t s = floor_div(t.k0, segment); s <= floor_div(t.k1, segment); ++s) {
        const int64_t lo = s * segment + segment - summary, hi = s * segment + segment - 1;
        if (rect_hits(geo, t.q0, t.q1, std::max(t.k0, lo), std::min(t.k1, hi), -kInf, 0))
          return true;
      }
    }
    return false;
  });
}

BlockPlan longformer_plan(const PlanGeometry& geo, const LongformerOptions& opt) {
  SPATTN_CHECK(opt.left >= 0 && opt.right >= 0,
               "longformer_plan: left and right must be >= 0; got (", opt.left, ", ", opt.right,
               ")");
  SPATTN_CHECK(opt.dilation >= 1, "longformer_plan: dilation must be >= 1; got ", opt.dilation);
  geo.validate("longformer_plan");
  const int64_t limit = std::max(geo.q_len, geo.k_len);
  for (int64_t g : opt.global)
    SPATTN_CHECK(g >= 0 && g < limit, "longformer_plan: global positions must be in [0, ", limit,
                 "); got ", g);
  std::vector<int64_t> global = opt.global;
  std::sort(global.begin(), global.end());
  global.erase(std::unique(global.begin(), global.end()), global.end());
  return build_uniform(geo, [&](int64_t qb, int64_t kb) {
    const Tile t = tile_of(geo, qb, kb);
    if (tile_has_multiple(geo, t, opt.dilation, -opt.left * opt.dilation,
                          opt.right * opt.dilation))
      return true;
    // Global rows (query g attends every key) and global columns (every query attends key g).
    for (auto it = std::lower_bound(global.begin(), global.end(), t.q0);
         it != global.end() && *it <= t.q1; ++it)
      if (rect_hits(geo, *it, *it, t.k0, t.k1)) return true;
    for (auto it = std::lower_bound(global.begin(), global.end(), t.k0);
         it != global.end() && *it <= t.k1; ++it)
      if (rect_hits(geo, t.q0, t.q1, *it, *it)) return true;
    return false;
  });
}

namespace {
// SplitMix64: a counter-based generator, so each row's draw depends only on (seed, b, h, qb)
// and not on which thread or in which order rows are built.
uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
}  // namespace

BlockPlan bigbird_plan(const PlanGeometry& geo, const BigBirdOptions& opt) {
  SPATTN_CHECK(opt.window_blocks >= 0, "bigbird_plan: window_blocks must be >= 0; got ",
               opt.window_blocks);
  SPATTN_CHECK(opt.global_blocks >= 0, "bigbird_plan: global_blocks must be >= 0; got ",
               opt.global_blocks);
  SPATTN_CHECK(opt.random_blocks >= 0, "bigbird_plan: random_blocks must be >= 0; got ",
               opt.random_blocks);
  BlockPlan plan(geo);
  const int64_t nqb = geo.num_q_blocks(), nkb = geo.num_k_blocks();
  const int64_t global_tokens = opt.global_blocks * geo.block_k;
  std::vector<uint8_t> keep(static_cast<size_t>(nkb));
  std::vector<int32_t> row, candidates;
  for (int64_t b = 0; b < geo.batch; ++b)
    for (int64_t h = 0; h < geo.heads; ++h)
      for (int64_t qb = 0; qb < nqb; ++qb) {
        std::fill(keep.begin(), keep.end(), 0);
        if (qb * geo.block_q < global_tokens) {
          std::fill(keep.begin(), keep.end(), 1);  // a global query block sees everything
        } else {
          const BlockRange band = diagonal_band(geo, qb, opt.window_blocks / 2);
          for (int64_t kb = band.first; kb <= band.last; ++kb) keep[size_t(kb)] = 1;
          for (int64_t kb = 0; kb < std::min(opt.global_blocks, nkb); ++kb) keep[size_t(kb)] = 1;
          candidates.clear();
          for (int64_t kb = 0; kb < nkb; ++kb)
            if (!keep[size_t(kb)] && geo.classify(qb, kb) != TileKind::empty)
              candidates.push_back(int32_t(kb));
          uint64_t state = opt.seed;
          for (uint64_t x : {uint64_t(b), uint64_t(h), uint64_t(qb)}) {
            state ^= x + 0x632be59bd9b4e019ull;
            splitmix64(state);
          }
          // Partial Fisher-Yates: the first r candidates become a uniform sample.
          const int64_t r = std::min<int64_t>(opt.random_blocks, int64_t(candidates.size()));
          for (int64_t s = 0; s < r; ++s) {
            const uint64_t span = uint64_t(candidates.size()) - uint64_t(s);
            const int64_t pick = s + int64_t(splitmix64(state) % span);
            std::swap(candidates[size_t(s)], candidates[size_t(pick)]);
            keep[size_t(candidates[size_t(s)])] = 1;
          }
        }
        row.clear();
        for (int64_t kb = 0; kb < nkb; ++kb)
          if (keep[size_t(kb)]) row.push_back(int32_t(kb));
        plan.set_row(b, h, qb, row);
      }
  return plan;
}

namespace {
void check_documents(const char* where, const PlanGeometry& geo,
                     std::span<const int64_t> cu) {
  SPATTN_CHECK(geo.q_len == geo.k_len, where, ": q_len must equal k_len for packed documents; got ",
               geo.q_len, " and ", geo.k_len);
  SPATTN_CHECK(cu.size() >= 2 && cu.front() == 0 && cu.back() == geo.q_len, where,
               ": cu_seqlens must start at 0 and end at the sequence length ", geo.q_len,
               "; got ", cu.size(), " entries from ", cu.empty() ? -1 : cu.front(), " to ",
               cu.empty() ? -1 : cu.back());
  for (size_t s = 1; s < cu.size(); ++s)
    SPATTN_CHECK(cu[s] >= cu[s - 1], where, ": cu_seqlens must be non-decreasing; got ",
                 cu[s - 1], " then ", cu[s]);
}

// Documents [first, last] overlapping positions [a, z].
std::pair<int64_t, int64_t> docs_overlapping(std::span<const int64_t> cu, int64_t a, int64_t z) {
  // Document s covers [cu[s], cu[s+1]); find s with cu[s] <= a < cu[s+1].
  const int64_t first = int64_t(std::upper_bound(cu.begin(), cu.end(), a) - cu.begin()) - 1;
  const int64_t last = int64_t(std::upper_bound(cu.begin(), cu.end(), z) - cu.begin()) - 1;
  return {first, std::min<int64_t>(last, int64_t(cu.size()) - 2)};
}
}  // namespace

BlockPlan document_plan(const PlanGeometry& geo, std::span<const int64_t> cu_seqlens) {
  geo.validate("document_plan");
  check_documents("document_plan", geo, cu_seqlens);
  return build_uniform(geo, [&](int64_t qb, int64_t kb) {
    const Tile t = tile_of(geo, qb, kb);
    const auto [first, last] = docs_overlapping(cu_seqlens, t.q0, t.q1);
    for (int64_t s = first; s <= last; ++s) {
      const int64_t lo = cu_seqlens[size_t(s)], hi = cu_seqlens[size_t(s) + 1] - 1;
      if (rect_hits(geo, std::max(t.q0, lo), std::min(t.q1, hi), std::max(t.k0, lo),
                    std::min(t.k1, hi)))
        return true;
    }
    return false;
  });
}

int64_t cross_document_tiles(const BlockPlan& plan, std::span<const int64_t> cu_seqlens) {
  const PlanGeometry& geo = plan.geometry();
  check_documents("cross_document_tiles", geo, cu_seqlens);
  int64_t count = 0;
  for (int64_t qb = 0; qb < geo.num_q_blocks(); ++qb)
    for (int32_t kb : plan.tiles(0, 0, qb)) {
      const Tile t = tile_of(geo, qb, kb);
      const auto [qf, ql] = docs_overlapping(cu_seqlens, t.q0, t.q1);
      const auto [kf, kl] = docs_overlapping(cu_seqlens, t.k0, t.k1);
      bool leaks = false;
      for (int64_t a = qf; a <= ql && !leaks; ++a)
        for (int64_t c = kf; c <= kl && !leaks; ++c) {
          if (a == c) continue;
          leaks = rect_hits(geo, std::max(t.q0, cu_seqlens[size_t(a)]),
                            std::min(t.q1, cu_seqlens[size_t(a) + 1] - 1),
                            std::max(t.k0, cu_seqlens[size_t(c)]),
                            std::min(t.k1, cu_seqlens[size_t(c) + 1] - 1));
        }
      count += leaks;
    }
  return count;
}

BlockPlan video_window_plan(const PlanGeometry& geo, const VideoWindow& win) {
  geo.validate("video_window_plan");
  SPATTN_CHECK(win.frames >= 1 && win.height >= 1 && win.width >= 1,
               "video_window_plan: frames, height and width must be >= 1; got (", win.frames,
               ", ", win.height, ", ", win.width, ")");
  const int64_t T = win.frames, H = win.height, W = win.width;
  SPATTN_CHECK(geo.q_len == T * H * W && geo.k_len == T * H * W,
               "video_window_plan: q_len and k_len must equal frames*height*width = ", T * H * W,
               "; got ", geo.q_len, " and ", geo.k_len);
  SPATTN_CHECK(win.radius_t >= -1 && win.radius_h >= -1 && win.radius_w >= -1,
               "video_window_plan: radii must be >= 0 or -1 (whole axis); got (", win.radius_t,
               ", ", win.radius_h, ", ", win.radius_w, ")");
  const int64_t rt = win.radius_t < 0 ? T : win.radius_t, rh = win.radius_h < 0 ? H : win.radius_h;
  const int64_t rw = win.radius_w < 0 ? W : win.radius_w;
  const int64_t nqb = geo.num_q_blocks(), nkb = geo.num_k_blocks();
  BlockPlan plan(geo);
  std::vector<uint8_t> keep(static_cast<size_t>(nkb));
  std::vector<int32_t> row;
  for (int64_t qb = 0; qb < nqb; ++qb) {
    std::fill(keep.begin(), keep.end(), 0);
    const int64_t q0 = qb * geo.block_q, q1 = std::min(geo.q_len, q0 + geo.block_q) - 1;
    // The block's queries as raster line segments (one (t, h) line each).
    for (int64_t a = q0; a <= q1;) {
      const int64_t line = a / W, z = std::min(q1, line * W + W - 1);
      const int64_t t = line / H, h = line % H;
      for (int64_t t2 = std::max<int64_t>(0, t - rt); t2 <= std::min(T - 1, t + rt); ++t2)
        for (int64_t h2 = std::max<int64_t>(0, h - rh); h2 <= std::min(H - 1, h + rh); ++h2) {
          // Query (t, h, w) at index line*W + w, key (t2, h2, w2) at base + w2: the pair is in
          // the window iff |w2 - w| <= rw, an offset band relative to the two line starts.
          const int64_t base = (t2 * H + h2) * W, delta = base - line * W;
          const int64_t k_lo = std::max(base, a - line * W + base - rw);
          const int64_t k_hi = std::min(base + W - 1, z - line * W + base + rw);
          for (int64_t kb = k_lo / geo.block_k; k_lo <= k_hi && kb <= k_hi / geo.block_k; ++kb) {
            if (keep[size_t(kb)]) continue;
            const int64_t j0 = std::max(k_lo, kb * geo.block_k);
            const int64_t j1 = std::min(k_hi, kb * geo.block_k + geo.block_k - 1);
            // shift is 0 (q_len = k_len): d = j - i; |(j - base) - (i - line*W)| <= rw.
            keep[size_t(kb)] = rect_hits(geo, a, z, j0, j1, delta - rw, delta + rw);
          }
        }
      a = z + 1;
    }
    row.clear();
    for (int64_t kb = 0; kb < nkb; ++kb)
      if (keep[size_t(kb)]) row.push_back(int32_t(kb));
    for (int64_t b = 0; b < geo.batch; ++b)
      for (int64_t h = 0; h < geo.heads; ++h) plan.set_row(b, h, qb, row);
  }
  return plan;
}

}  // namespace spattn
