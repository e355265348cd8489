#include "spattn/plan.hpp"

#include <algorithm>
#include <limits>
#include <sstream>

#include "spattn/error.hpp"

namespace spattn {

namespace {
constexpr int64_t kUnbounded = int64_t(1) << 62;

bool is_power_of_two(int64_t x) { return x > 0 && (x & (x - 1)) == 0; }
}  // namespace

// ---------------------------------------------------------------------------------------------
// MaskRule

int64_t MaskRule::min_offset() const { return window_left >= 0 ? -window_left : -kUnbounded; }

int64_t MaskRule::max_offset() const {
  int64_t hi = kUnbounded;
  if (causal) hi = 0;
  if (window_right >= 0) hi = std::min(hi, window_right);
  return hi;
}

bool MaskRule::allows(int64_t i, int64_t j, int64_t q_len, int64_t k_len) const {
  const int64_t d = j - (i + k_len - q_len);
  return d >= min_offset() && d <= max_offset();
}

std::string MaskRule::to_string() const {
  if (is_unrestricted()) return "none";
  std::ostringstream s;
  if (causal) s << "causal";
  if (window_left >= 0 || window_right >= 0) {
    s << (causal ? ", " : "") << "window (" << window_left << ", " << window_right << ")";
  }
  return s.str();
}

// ---------------------------------------------------------------------------------------------
// PlanGeometry

TileKind PlanGeometry::classify(int64_t qb, int64_t kb) const {
  const int64_t q0 = qb * block_q, q1 = std::min(q_len, q0 + block_q);  // [q0, q1)
  const int64_t k0 = kb * block_k, k1 = std::min(k_len, k0 + block_k);
  if (q0 >= q1 || k0 >= k1) return TileKind::empty;
  // Offsets d = j - i - shift over the tile span every integer in [d_lo, d_hi].
  const int64_t shift = k_len - q_len;
  const int64_t d_lo = k0 - (q1 - 1) - shift;
  const int64_t d_hi = (k1 - 1) - q0 - shift;
  const int64_t lo = rule.min_offset(), hi = rule.max_offset();
  if (d_hi < lo || d_lo > hi) return TileKind::empty;
  const bool cut_by_rule = d_lo < lo || d_hi > hi;
  const bool cut_by_tail = q1 - q0 < block_q || k1 - k0 < block_k;
  return cut_by_rule || cut_by_tail ? TileKind::partial : TileKind::full;
}

void PlanGeometry::validate(const char* where) const {
  SPATTN_CHECK(is_power_of_two(block_q) && block_q >= 16 && block_q <= 256, where,
               ": block_q must be a power of two in [16, 256]; got ", block_q);
  SPATTN_CHECK(is_power_of_two(block_k) && block_k >= 16 && block_k <= 256, where,
               ": block_k must be a power of two in [16, 256]; got ", block_k);
  SPATTN_CHECK(batch >= 1, where, ": plan batch must be >= 1; got ", batch);
  SPATTN_CHECK(heads >= 1, where, ": plan heads must be >= 1; got ", heads);
  SPATTN_CHECK(q_len >= 0, where, ": plan q_len must be >= 0; got ", q_len);
  SPATTN_CHECK(k_len >= 0, where, ": plan k_len must be >= 0; got ", k_len);
  SPATTN_CHECK(num_k_blocks() <= std::numeric_limits<int32_t>::max() &&
                   num_q_blocks() <= std::numeric_limits<int32_t>::max(),
               where, ": plan has too many blocks for int32 indices");
  SPATTN_CHECK(rule.window_left >= -1 && rule.window_right >= -1, where,
               ": window sizes must be >= 0 or -1 (unbounded); got (", rule.window_left, ", ",
               rule.window_right, ")");
}

// ---------------------------------------------------------------------------------------------
// BlockPlan

BlockPlan::BlockPlan(const PlanGeometry& geo) : geo_(geo) {
  geo_.validate("BlockPlan");
  capacity_ = std::max<int64_t>(geo_.num_k_blocks(), 1);
  kv_index_.assign(size_t(geo_.num_rows() * capacity_), 0);
  num_full_.assign(size_t(geo_.num_rows()), 0);
  num_partial_.assign(size_t(geo_.num_rows()), 0);
}

BlockPlan BlockPlan::dense(const PlanGeometry& geo) {
  BlockPlan plan(geo);
  std::vector<int32_t> all(size_t(geo.num_k_blocks()));
  for (size_t j = 0; j < all.size(); ++j) all[j] = int32_t(j);
  for (int64_t b = 0; b < geo.batch; ++b)
    for (int64_t h = 0; h < geo.heads; ++h)
      for (int64_t qb = 0; qb < geo.num_q_blocks(); ++qb) plan.set_row(b, h, qb, all);
  return plan;
}

BlockPlan BlockPlan::from_block_mask(const PlanGeometry& geo, std::span<const uint8_t> mask) {
  BlockPlan plan(geo);
  const int64_t nkb = geo.num_k_blocks();
  SPATTN_CHECK(int64_t(mask.size()) == geo.num_rows() * nkb,
               "BlockPlan::from_block_mask: mask must have batch*heads*num_q_blocks*num_k_blocks = ",
               geo.num_rows() * nkb, " entries; got ", mask.size());
  std::vector<int32_t> kept;
  for (int64_t b = 0; b < geo.batch; ++b)
    for (int64_t h = 0; h < geo.heads; ++h)
      for (int64_t qb = 0; qb < geo.num_q_blocks(); ++qb) {
        const uint8_t* row = mask.data() + plan.view().row(b, h, qb) * nkb;
        kept.clear();
        for (int64_t j = 0; j < nkb; ++j)
          if (row[j]) kept.push_back(int32_t(j));
        plan.set_row(b, h, qb, kept);
      }
  return plan;
}

BlockPlan BlockPlan::from_view(const PlanView& view) {
  SPATTN_CHECK(view.device.kind == DeviceKind::cpu,
               "BlockPlan::from_view: plan must be in host memory; got ", to_string(view.device));
  validate_plan(view, "BlockPlan::from_view");
  BlockPlan plan(view.geo);
  for (int64_t r = 0; r < view.geo.num_rows(); ++r) {
    const int32_t nf = view.num_full[r], np = view.num_partial[r];
    std::copy_n(view.kv_index + r * view.capacity, nf + np,
                plan.kv_index_.begin() + r * plan.capacity_);
    plan.num_full_[r] = nf;
    plan.num_partial_[r] = np;
  }
  return plan;
}

std::vector<uint8_t> BlockPlan::to_block_mask() const {
  const int64_t nkb = geo_.num_k_blocks();
  std::vector<uint8_t> mask(size_t(geo_.num_rows() * nkb), 0);
  for (int64_t r = 0; r < geo_.num_rows(); ++r) {
    const int32_t* idx = kv_index_.data() + r * capacity_;
    for (int32_t s = 0; s < num_full_[r] + num_partial_[r]; ++s) mask[r * nkb + idx[s]] = 1;
  }
  return mask;
}

void BlockPlan::set_row(int64_t b, int64_t h, int64_t qb, std::span<const int32_t> kv_blocks) {
  SPATTN_CHECK(b >= 0 && b < geo_.batch, "BlockPlan::set_row: b must be in [0, ", geo_.batch,
               "); got ", b);
  SPATTN_CHECK(h >= 0 && h < geo_.heads, "BlockPlan::set_row: h must be in [0, ", geo_.heads,
               "); got ", h);
  SPATTN_CHECK(qb >= 0 && qb < geo_.num_q_blocks(), "BlockPlan::set_row: qb must be in [0, ",
               geo_.num_q_blocks(), "); got ", qb);
  const int64_t nkb = geo_.num_k_blocks();
  std::vector<int32_t> full, partial;
  std::vector<int32_t> sorted(kv_blocks.begin(), kv_blocks.end());
  std::sort(sorted.begin(), sorted.end());
  sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
  for (int32_t kb : sorted) {
    SPATTN_CHECK(kb >= 0 && kb < nkb, "BlockPlan::set_row: kv block index must be in [0, ", nkb,
                 "); got ", kb);
    switch (geo_.classify(qb, kb)) {
      case TileKind::full: full.push_back(kb); break;
      case TileKind::partial: partial.push_back(kb); break;
      case TileKind::empty: break;
    }
  }
  const int64_t r = view().row(b, h, qb);
  int32_t* out = kv_index_.data() + r * capacity_;
  std::copy(full.begin(), full.end(), out);
  std::copy(partial.begin(), partial.end(), out + full.size());
  num_full_[r] = int32_t(full.size());
  num_partial_[r] = int32_t(partial.size());
}

std::span<const int32_t> BlockPlan::full_tiles(int64_t b, int64_t h, int64_t qb) const {
  const int64_t r = view().row(b, h, qb);
  return {kv_index_.data() + r * capacity_, size_t(num_full_[r])};
}

std::span<const int32_t> BlockPlan::partial_tiles(int64_t b, int64_t h, int64_t qb) const {
  const int64_t r = view().row(b, h, qb);
  return {kv_index_.data() + r * capacity_ + num_full_[r], size_t(num_partial_[r])};
}

std::vector<int32_t> BlockPlan::tiles(int64_t b, int64_t h, int64_t qb) const {
  auto f = full_tiles(b, h, qb), p = partial_tiles(b, h, qb);
  std::vector<int32_t> merged(f.size() + p.size());
  std::merge(f.begin(), f.end(), p.begin(), p.end(), merged.begin());
  return merged;
}

int64_t BlockPlan::num_tiles() const {
  int64_t n = 0;
  for (size_t r = 0; r < num_full_.size(); ++r) n += num_full_[r] + num_partial_[r];
  return n;
}

double BlockPlan::density() const {
  const double grid = double(geo_.num_rows()) * double(geo_.num_k_blocks());
  return grid > 0 ? double(num_tiles()) / grid : 0.0;
}

PlanView BlockPlan::view() const {
  PlanView v;
  v.geo = geo_;
  v.capacity = capacity_;
  v.kv_index = kv_index_.data();
  v.num_full = num_full_.data();
  v.num_partial = num_partial_.data();
  v.device = Device{};
  return v;
}

TransposedPlan BlockPlan::transpose() const { return spattn::transpose(view()); }

// ---------------------------------------------------------------------------------------------
// TransposedPlan

TransposedPlanView TransposedPlan::view() const {
  TransposedPlanView v;
  v.geo = geo_;
  v.capacity = capacity_;
  v.q_index = q_index_.data();
  v.num_full = num_full_.data();
  v.num_partial = num_partial_.data();
  return v;
}

std::span<const int32_t> TransposedPlan::full_tiles(int64_t b, int64_t h, int64_t kb) const {
  const int64_t r = view().row(b, h, kb);
  return {q_index_.data() + r * capacity_, size_t(num_full_[r])};
}

std::span<const int32_t> TransposedPlan::partial_tiles(int64_t b, int64_t h, int64_t kb) const {
  const int64_t r = view().row(b, h, kb);
  return {q_index_.data() + r * capacity_ + num_full_[r], size_t(num_partial_[r])};
}

TransposedPlan transpose(const PlanView& plan) {
  SPATTN_CHECK(plan.device.kind == DeviceKind::cpu,
               "transpose: plan must be in host memory; got ", to_string(plan.device));
  const PlanGeometry& geo = plan.geo;
  const int64_t nqb = geo.num_q_blocks(), nkb = geo.num_k_blocks();
  TransposedPlan t;
  t.geo_ = geo;
  t.capacity_ = std::max<int64_t>(nqb, 1);
  const int64_t trows = geo.batch * geo.heads * nkb;
  t.q_index_.assign(size_t(trows * t.capacity_), 0);
  t.num_full_.assign(size_t(trows), 0);
  t.num_partial_.assign(size_t(trows), 0);
  // Two passes so each run stays ascending: full tiles first, then partial. Query blocks are
  // visited in ascending order, so appending keeps each run sorted.
  for (int pass = 0; pass < 2; ++pass)
    for (int64_t b = 0; b < geo.batch; ++b)
      for (int64_t h = 0; h < geo.heads; ++h)
        for (int64_t qb = 0; qb < nqb; ++qb) {
          const int64_t r = plan.row(b, h, qb);
          const int32_t* idx = plan.kv_index + r * plan.capacity;
          const int32_t begin = pass == 0 ? 0 : plan.num_full[r];
          const int32_t end = pass == 0 ? plan.num_full[r] : plan.num_full[r] + plan.num_partial[r];
          for (int32_t s = begin; s < end; ++s) {
            const int64_t tr = (b * geo.heads + h) * nkb + idx[s];
            const int32_t slot = t.num_full_[tr] + t.num_partial_[tr];
            t.q_index_[tr * t.capacity_ + slot] = int32_t(qb);
            (pass == 0 ? t.num_full_ : t.num_partial_)[tr]++;
          }
        }
  return t;
}

// ---------------------------------------------------------------------------------------------
// Validation

void validate_plan(const PlanView& plan, const char* where) {
  const PlanGeometry& geo = plan.geo;
  geo.validate(where);
  SPATTN_CHECK(plan.capacity >= 0 && plan.capacity >= std::min<int64_t>(geo.num_k_blocks(), 1),
               where, ": plan capacity must be >= 1; got ", plan.capacity);
  SPATTN_CHECK(geo.num_rows() == 0 ||
                   (plan.kv_index && plan.num_full && plan.num_partial),
               where, ": plan arrays must not be null");
  if (plan.device.kind != DeviceKind::cpu) return;  // contents live on the device
  const int64_t nqb = geo.num_q_blocks(), nkb = geo.num_k_blocks();
  for (int64_t b = 0; b < geo.batch; ++b)
    for (int64_t h = 0; h < geo.heads; ++h)
      for (int64_t qb = 0; qb < nqb; ++qb) {
        const int64_t r = plan.row(b, h, qb);
        const int32_t nf = plan.num_full[r], np = plan.num_partial[r];
        SPATTN_CHECK(nf >= 0 && np >= 0 && nf + np <= plan.capacity, where,
                     ": plan row (b=", b, ", h=", h, ", qb=", qb,
                     ") must hold 0 <= num_full + num_partial <= capacity (", plan.capacity,
                     "); got num_full=", nf, ", num_partial=", np);
        const int32_t* idx = plan.kv_index + r * plan.capacity;
        for (int32_t s = 0; s < nf + np; ++s) {
          const int32_t kb = idx[s];
          SPATTN_CHECK(kb >= 0 && kb < nkb, where, ": plan row (b=", b, ", h=", h, ", qb=", qb,
                       ") kv block index must be in [0, ", nkb, "); got ", kb);
          const bool run_start = s == 0 || s == nf;
          SPATTN_CHECK(run_start || idx[s - 1] < kb, where, ": plan row (b=", b, ", h=", h,
                       ", qb=", qb, ") indices must be strictly ascending within the ",
                       s < nf ? "full" : "partial", " run; got ", idx[s - 1], " then ", kb);
          const TileKind kind = geo.classify(qb, kb);
          SPATTN_CHECK(kind != TileKind::empty, where, ": plan row (b=", b, ", h=", h, ", qb=", qb,
                       ") lists kv block ", kb, ", which the rule (", geo.rule.to_string(),
                       ") leaves empty");
          SPATTN_CHECK(s >= nf || kind == TileKind::full, where, ": plan row (b=", b, ", h=", h,
                       ", qb=", qb, ") marks kv block ", kb,
                       " full, but the rule or the sequence tail cuts it (expected partial)");
        }
        // No block may appear in both runs.
        for (int32_t s = nf; s < nf + np; ++s)
          SPATTN_CHECK(!std::binary_search(idx, idx + nf, idx[s]), where, ": plan row (b=", b,
                       ", h=", h, ", qb=", qb, ") lists kv block ", idx[s], " twice");
      }
}

}  // namespace spattn
