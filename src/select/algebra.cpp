// Set operations on plans of one geometry, and plan statistics.
#include <algorithm>
#include <sstream>

#include "spattn/error.hpp"
#include "spattn/select.hpp"

namespace spattn {

namespace {

std::string describe(const PlanGeometry& g) {
  std::ostringstream s;
  s << "(batch " << g.batch << ", heads " << g.heads << ", q_len " << g.q_len << ", k_len "
    << g.k_len << ", blocks " << g.block_q << "x" << g.block_k << ", rule " << g.rule.to_string()
    << ")";
  return s.str();
}

template <class Op>
BlockPlan combine(const char* where, const BlockPlan& a, const BlockPlan& b, Op op) {
  SPATTN_CHECK(a.geometry() == b.geometry(), where,
               ": b must have a's geometry ", describe(a.geometry()), "; got ",
               describe(b.geometry()));
  std::vector<uint8_t> ma = a.to_block_mask();
  const std::vector<uint8_t> mb = b.to_block_mask();
  for (size_t i = 0; i < ma.size(); ++i) ma[i] = op(ma[i] != 0, mb[i] != 0) ? 1 : 0;
  return BlockPlan::from_block_mask(a.geometry(), ma);
}

}  // namespace

BlockPlan plan_union(const BlockPlan& a, const BlockPlan& b) {
  return combine("plan_union", a, b, [](bool x, bool y) { return x || y; });
}
BlockPlan plan_intersection(const BlockPlan& a, const BlockPlan& b) {
  return combine("plan_intersection", a, b, [](bool x, bool y) { return x && y; });
}
BlockPlan plan_difference(const BlockPlan& a, const BlockPlan& b) {
  return combine("plan_difference", a, b, [](bool x, bool y) { return x && !y; });
}

int64_t allowed_tiles_per_head(const PlanGeometry& geo) {
  int64_t n = 0;
  for (int64_t qb = 0; qb < geo.num_q_blocks(); ++qb)
    for (int64_t kb = 0; kb < geo.num_k_blocks(); ++kb)
      n += geo.classify(qb, kb) != TileKind::empty;
  return n;
}

PlanStats plan_stats(const BlockPlan& plan) {
  const PlanGeometry& g = plan.geometry();
  const PlanView v = plan.view();
  const int64_t nqb = g.num_q_blocks(), nkb = g.num_k_blocks();
  PlanStats s;
  const int64_t allowed_head = allowed_tiles_per_head(g);
  s.head_density.assign(size_t(g.heads), 0.0);
  s.head_allowed_density.assign(size_t(g.heads), 0.0);
  for (int64_t h = 0; h < g.heads; ++h) {
    int64_t t = 0;
    for (int64_t b = 0; b < g.batch; ++b)
      for (int64_t qb = 0; qb < nqb; ++qb) {
        const int64_t r = v.row(b, h, qb);
        t += v.num_full[r] + v.num_partial[r];
        s.full_tiles += v.num_full[r];
        s.partial_tiles += v.num_partial[r];
      }
    s.tiles += t;
    const double grid = double(g.batch * nqb * nkb), allowed = double(g.batch * allowed_head);
    s.head_density[size_t(h)] = grid > 0 ? double(t) / grid : 0.0;
    s.head_allowed_density[size_t(h)] = allowed > 0 ? double(t) / allowed : 0.0;
  }
  s.grid_tiles = g.num_rows() * nkb;
  s.allowed_tiles = g.batch * g.heads * allowed_head;
  s.density = s.grid_tiles > 0 ? double(s.tiles) / double(s.grid_tiles) : 0.0;
  s.allowed_density = s.allowed_tiles > 0 ? double(s.tiles) / double(s.allowed_tiles) : 0.0;
  return s;
}

std::vector<double> row_density(const BlockPlan& plan) {
  const PlanGeometry& g = plan.geometry();
  const int64_t nkb = g.num_k_blocks();
  std::vector<double> d(size_t(g.num_rows()), 0.0);
  for (int64_t r = 0; r < g.num_rows(); ++r)
    d[size_t(r)] = nkb > 0 ? double(plan.num_full()[r] + plan.num_partial()[r]) / double(nkb) : 0.0;
  return d;
}

}  // namespace spattn
