// Plan quality against dense attention, and the per-head tuning of the hybrid rule.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>

#include "spattn/diagnostics.hpp"
#include "spattn/error.hpp"

namespace spattn {

namespace {

// Per query head: recall from the lse pair, relative L1 from the outputs.
//   out (B, Hq, Nq, Dv), lse (B, Hq, Nq)
PlanQuality compare(const ForwardResult& dense, const ForwardResult& sparse, const BlockPlan& plan) {
  const TensorRef &od = dense.out.ref(), &os = sparse.out.ref();
  const TensorRef &ld = dense.lse.ref(), &ls = sparse.lse.ref();
  const int64_t B = od.shape[0], Hq = od.shape[1], N = od.shape[2], Dv = od.shape[3];
  PlanQuality qual;
  qual.head_density.assign(size_t(Hq), 0.0);
  qual.head_recall.assign(size_t(Hq), 0.0);
  qual.head_rel_l1.assign(size_t(Hq), 0.0);
  const PlanStats st = plan_stats(plan);
  const PlanView view = plan.view();
  double diff_all = 0, ref_all = 0, recall_all = 0;
  int64_t rows_all = 0;
#pragma omp parallel for schedule(dynamic) reduction(+ : diff_all, ref_all, recall_all, rows_all)
  for (int64_t h = 0; h < Hq; ++h) {
    double diff = 0, ref = 0, recall = 0;
    int64_t rows = 0;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < N; ++i) {
        const double lde = load_element(ld, offset_of(ld, {b, h, i}));
        if (!std::isfinite(lde)) continue;  // the rule leaves this query no key
        const double lsp = load_element(ls, offset_of(ls, {b, h, i}));
        recall += std::isfinite(lsp) ? std::min(1.0, std::exp(lsp - lde)) : 0.0;
        ++rows;
        for (int64_t c = 0; c < Dv; ++c) {
          const double x = load_element(os, offset_of(os, {b, h, i, c}));
          const double y = load_element(od, offset_of(od, {b, h, i, c}));
          diff += std::abs(x - y);
          ref += std::abs(y);
        }
      }
    qual.head_density[size_t(h)] = st.head_density[size_t(view.head_for(h, Hq))];
    qual.head_recall[size_t(h)] = rows > 0 ? recall / double(rows) : 1.0;
    qual.head_rel_l1[size_t(h)] = ref > 0 ? diff / ref : (diff > 0 ? INFINITY : 0.0);
    diff_all += diff;
    ref_all += ref;
    recall_all += recall;
    rows_all += rows;
  }
  double dens = 0;
  for (double d : qual.head_density) dens += d;
  qual.density = Hq > 0 ? dens / double(Hq) : 0.0;
  qual.recall = rows_all > 0 ? recall_all / double(rows_all) : 1.0;
  qual.rel_l1 = ref_all > 0 ? diff_all / ref_all : (diff_all > 0 ? INFINITY : 0.0);
  return qual;
}

}  // namespace

PlanQuality evaluate_plan(const TensorRef& q, const TensorRef& k, const TensorRef& v,
                          const BlockPlan& plan, const AttentionParams& params) {
  SPATTN_CHECK(params.mask == plan.geometry().rule,
               "evaluate_plan: params.mask must equal the plan's rule (",
               plan.geometry().rule.to_string(), "); got ", params.mask.to_string());
  const ForwardResult dense = forward(q, k, v, static_cast<const BlockPlan*>(nullptr), params);
  const ForwardResult sparse = forward(q, k, v, &plan, params);
  return compare(dense, sparse, plan);
}

TuneResult tune_hybrid(const TensorRef& q, const TensorRef& k, const TensorRef& v,
                       const TuneOptions& opt) {
  const auto start = std::chrono::steady_clock::now();
  const bool recall = opt.metric == TuneMetric::recall;
  SPATTN_CHECK(std::isfinite(opt.target) && opt.target >= 0 && (!recall || opt.target <= 1),
               "tune_hybrid: target must be ", recall ? "in [0, 1] for recall" : ">= 0 for rel_l1",
               "; got ", opt.target);
  SPATTN_CHECK(opt.steps >= 1 && opt.steps <= 30, "tune_hybrid: steps must be in [1, 30]; got ",
               opt.steps);
  for (double x : opt.k_grid)
    SPATTN_CHECK(x >= 0 && x <= 1, "tune_hybrid: k_grid values must be in [0, 1]; got ", x);
  SPATTN_CHECK(q.rank == 4, "tune_hybrid: q must have rank 4; got ", q.shape_string());
  const int64_t Hq = q.shape[1];

  HybridOptions sel = opt.base;
  sel.gqa = GqaPlan::per_query_head;
  AttentionParams params;
  params.scale = sel.scale;
  params.mask = sel.rule;
  params.num_threads = sel.num_threads;
  const ForwardResult dense = forward(q, k, v, static_cast<const BlockPlan*>(nullptr), params);

  TuneResult res;
  auto meets = [&](const PlanQuality& pq, int64_t h) {
    return recall ? pq.head_recall[size_t(h)] >= opt.target
                  : pq.head_rel_l1[size_t(h)] <= opt.target;
  };
  auto evaluate = [&](const std::vector<double>& tk, const std::vector<double>& tp) {
    sel.top_k = tk;
    sel.top_p = tp;
    BlockPlan plan = select_hybrid(q, k, sel);
    const ForwardResult sparse = forward(q, k, v, &plan, params);
    ++res.evaluations;
    return compare(dense, sparse, plan);
  };

  // Best feasible point per head; keeping every allowed tile (p = 1) is feasible by definition.
  struct Best {
    double density = 2.0, k = 0.0, p = 1.0;
  };
  const size_t nh = static_cast<size_t>(Hq);
  std::vector<Best> best(nh);
  auto offer = [&](int64_t h, double density, double kk, double pp) {
    Best& b = best[size_t(h)];
    if (density < b.density || (density == b.density && (kk < b.k || (kk == b.k && pp < b.p))))
      b = {density, kk, pp};
  };

  // One bisection over x in [0, 1] for all heads at once, with `point(x)` = (k, p).
  auto bisect = [&](auto point) {
    std::vector<double> lo(nh, 0.0), hi(nh, 1.0), tk(nh), tp(nh);
    for (int step = 0; step < opt.steps; ++step) {
      for (int64_t h = 0; h < Hq; ++h) {
        const auto [kk, pp] = point(0.5 * (lo[size_t(h)] + hi[size_t(h)]));
        tk[size_t(h)] = kk;
        tp[size_t(h)] = pp;
      }
      const PlanQuality pq = evaluate(tk, tp);
      for (int64_t h = 0; h < Hq; ++h) {
        const double mid = 0.5 * (lo[size_t(h)] + hi[size_t(h)]);
        if (meets(pq, h)) {
          hi[size_t(h)] = mid;
          offer(h, pq.head_density[size_t(h)], tk[size_t(h)], tp[size_t(h)]);
        } else {
          lo[size_t(h)] = mid;
        }
      }
    }
  };
  for (double kk : opt.k_grid) bisect([kk](double x) { return std::pair{kk, x}; });
  bisect([](double x) { return std::pair{x, 0.0}; });  // Top-k only

  res.top_k.resize(size_t(Hq));
  res.top_p.resize(size_t(Hq));
  for (int64_t h = 0; h < Hq; ++h) {
    res.top_k[size_t(h)] = best[size_t(h)].k;
    res.top_p[size_t(h)] = best[size_t(h)].p;
  }
  sel.top_k = res.top_k;
  sel.top_p = res.top_p;
  res.plan = select_hybrid(q, k, sel);
  res.quality = compare(dense, forward(q, k, v, &res.plan, params), res.plan);
  ++res.evaluations;
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return res;
}

}  // namespace spattn
