// Bindings for the selectors (select.hpp), static patterns (patterns.hpp) and plan diagnostics
// (diagnostics.hpp). Selectors read host q/k; plans come back as host arrays that the Python
// BlockPlan wraps (and moves to the device when asked).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <vector>

#include "convert.hpp"
#include "spattn/patterns.hpp"
#include "spattn/select.hpp"
#if __has_include("spattn/diagnostics.hpp")
#include "spattn/diagnostics.hpp"
#define SPATTN_PY_DIAGNOSTICS 1
#endif

namespace nb = nanobind;
using namespace nb::literals;
using namespace spattn_py;

namespace {

// Geometry from Python: (batch, heads, q_len, k_len, block_q, block_k, causal, left, right).
using GeoTuple = std::tuple<int64_t, int64_t, int64_t, int64_t, int, int, bool, int64_t, int64_t>;

spattn::PlanGeometry to_geo(const char* where, const GeoTuple& t) {
  const auto& [batch, heads, q_len, k_len, block_q, block_k, causal, left, right] = t;
  SPATTN_CHECK(batch >= 1 && heads >= 1, where, ": batch and heads must be >= 1; got ", batch,
               " and ", heads);
  auto g = make_geometry(batch, heads, q_len, k_len, block_q, block_k,
                         make_rule(causal, left, right));
  g.validate(where);
  return g;
}

spattn::GqaPlan to_gqa(const std::string& mode) {
  if (mode == "per_head") return spattn::GqaPlan::per_query_head;
  if (mode == "group_mean") return spattn::GqaPlan::group_mean;
  if (mode == "group_max") return spattn::GqaPlan::group_max;
  spattn::detail::throw_error(
      "select.hybrid: gqa_mode must be 'per_head', 'group_mean' or 'group_max'; got '", mode,
      "'");
}

spattn::HybridOptions hybrid_options(std::vector<double> top_k, std::vector<double> top_p,
                                     double scale, int block_q, int block_k, bool causal,
                                     int64_t window_left, int64_t window_right,
                                     int64_t sink_blocks, int64_t local_blocks,
                                     const std::string& gqa, int num_threads) {
  spattn::HybridOptions o;
  o.top_k = std::move(top_k);
  o.top_p = std::move(top_p);
  o.scale = scale;
  o.block_q = block_q;
  o.block_k = block_k;
  o.rule = make_rule(causal, window_left, window_right);
  o.sink_blocks = sink_blocks;
  o.local_blocks = local_blocks;
  o.gqa = to_gqa(gqa);
  o.num_threads = num_threads;
  return o;
}

spattn::TensorRef host_ref(const char* where, const char* name, const InArray& a) {
  spattn::TensorRef r = to_ref(where, name, a);
  SPATTN_CHECK(r.device.kind == spattn::DeviceKind::cpu, where, ": ", name,
               " must be in host memory; got ", spattn::to_string(r.device));
  return r;
}

PlanArrays select_hybrid(const InArray& q, const InArray& k, std::vector<double> top_k,
                         std::vector<double> top_p, double scale, int block_q, int block_k,
                         bool causal, int64_t window_left, int64_t window_right,
                         int64_t sink_blocks, int64_t local_blocks, const std::string& gqa,
                         int num_threads) {
  const char* where = "select.hybrid";
  const auto rq = host_ref(where, "q", q), rk = host_ref(where, "k", k);
  const auto opt = hybrid_options(std::move(top_k), std::move(top_p), scale, block_q, block_k,
                                  causal, window_left, window_right, sink_blocks, local_blocks,
                                  gqa, num_threads);
  spattn::BlockPlan plan;
  {
    nb::gil_scoped_release release;
    plan = spattn::select_hybrid(rq, rk, opt);
  }
  return plan_arrays(plan);
}

// The selector writing into caller arrays on q's device: on a GPU, pooling, scoring and
// Top-k ∪ Top-p run stream-ordered with no host synchronisation (CUDA-graph capturable).
void select_hybrid_into(const InArray& q, const InArray& k, const OutArray& kv_index,
                        const OutArray& num_full, const OutArray& num_partial,
                        std::vector<double> top_k, std::vector<double> top_p, double scale,
                        int block_q, int block_k, bool causal, int64_t window_left,
                        int64_t window_right, int64_t sink_blocks, int64_t local_blocks,
                        const std::string& gqa, int num_threads, uintptr_t stream) {
  const char* where = "select.hybrid";
  const auto rq = to_ref(where, "q", q), rk = to_ref(where, "k", k);
  const auto opt = hybrid_options(std::move(top_k), std::move(top_p), scale, block_q, block_k,
                                  causal, window_left, window_right, sink_blocks, local_blocks,
                                  gqa, num_threads);
  spattn::PlanBuffers out;
  out.geo = spattn::hybrid_geometry(rq, rk, opt);
  out.device = rq.device;
  const int64_t nqb = out.geo.num_q_blocks();
  SPATTN_CHECK(kv_index.ndim() == 4, where, ": kv_index must have rank 4; got rank ",
               kv_index.ndim());
  out.capacity = int64_t(kv_index.shape(3));
  const spattn::PlanGeometry& g = out.geo;
  out.kv_index = const_cast<int32_t*>(
      plan_array(where, "kv_index", kv_index, {g.batch, g.heads, nqb, -1}, out.device));
  out.num_full = const_cast<int32_t*>(
      plan_array(where, "num_full", num_full, {g.batch, g.heads, nqb}, out.device));
  out.num_partial = const_cast<int32_t*>(
      plan_array(where, "num_partial", num_partial, {g.batch, g.heads, nqb}, out.device));
  nb::gil_scoped_release release;
  spattn::select_hybrid_into(rq, rk, opt, out, reinterpret_cast<void*>(stream));
}

nb::ndarray<nb::numpy, float> hybrid_block_scores(
    const InArray& q, const InArray& k, std::vector<double> top_k, std::vector<double> top_p,
    double scale, int block_q, int block_k, bool causal, int64_t window_left,
    int64_t window_right, int64_t sink_blocks, int64_t local_blocks, const std::string& gqa,
    int num_threads) {
  const char* where = "select.block_scores";
  const auto rq = host_ref(where, "q", q), rk = host_ref(where, "k", k);
  const auto opt = hybrid_options(std::move(top_k), std::move(top_p), scale, block_q, block_k,
                                  causal, window_left, window_right, sink_blocks, local_blocks,
                                  gqa, num_threads);
  spattn::BlockScores s;
  {
    nb::gil_scoped_release release;
    s = spattn::hybrid_block_scores(rq, rk, opt);
  }
  const auto& g = s.geo;
  return to_numpy(std::move(s.prob), {size_t(g.batch), size_t(g.heads),
                                      size_t(g.num_q_blocks()), size_t(g.num_k_blocks())});
}

spattn::FactorPart to_part(const std::string& part) {
  if (part == "both") return spattn::FactorPart::both;
  if (part == "local") return spattn::FactorPart::local;
  if (part == "summary") return spattn::FactorPart::summary;
  spattn::detail::throw_error("patterns: part must be 'both', 'local' or 'summary'; got '", part,
                              "'");
}

nb::dict stats_dict(const spattn::PlanStats& s) {
  nb::dict d;
  d["tiles"] = s.tiles;
  d["allowed_tiles"] = s.allowed_tiles;
  d["grid_tiles"] = s.grid_tiles;
  d["density"] = s.density;
  d["allowed_density"] = s.allowed_density;
  d["full_tiles"] = s.full_tiles;
  d["partial_tiles"] = s.partial_tiles;
  d["head_density"] = s.head_density;
  d["head_allowed_density"] = s.head_allowed_density;
  return d;
}

#ifdef SPATTN_PY_DIAGNOSTICS
nb::ndarray<nb::numpy, uint8_t> image_array(spattn::Image img) {
  const size_t h = size_t(img.height), w = size_t(img.width);
  return to_numpy(std::move(img.rgb), {h, w, 3});
}

nb::dict quality_dict(const spattn::PlanQuality& q) {
  nb::dict d;
  d["density"] = q.density;
  d["recall"] = q.recall;
  d["rel_l1"] = q.rel_l1;
  d["head_density"] = q.head_density;
  d["head_recall"] = q.head_recall;
  d["head_rel_l1"] = q.head_rel_l1;
  return d;
}
#endif

}  // namespace

void bind_select(nb::module_& m) {
  m.def("select_hybrid", &select_hybrid, "q"_a, "k"_a, "top_k"_a, "top_p"_a, "scale"_a,
        "block_q"_a, "block_k"_a, "causal"_a, "window_left"_a, "window_right"_a,
        "sink_blocks"_a, "local_blocks"_a, "gqa"_a, "num_threads"_a = 0,
        "Hybrid Top-k ∪ Top-p plan from host q (B, Hq, Nq, D) and k (B, Hkv, Nk, D).");
  m.def("select_hybrid_into", &select_hybrid_into, "q"_a, "k"_a, "kv_index"_a, "num_full"_a,
        "num_partial"_a, "top_k"_a, "top_p"_a, "scale"_a, "block_q"_a, "block_k"_a, "causal"_a,
        "window_left"_a, "window_right"_a, "sink_blocks"_a, "local_blocks"_a, "gqa"_a,
        "num_threads"_a = 0, "stream"_a = 0,
        "Hybrid plan written into caller arrays on q's device (no host sync on a GPU).");
  m.def("hybrid_block_scores", &hybrid_block_scores, "q"_a, "k"_a, "top_k"_a, "top_p"_a,
        "scale"_a, "block_q"_a, "block_k"_a, "causal"_a, "window_left"_a, "window_right"_a,
        "sink_blocks"_a, "local_blocks"_a, "gqa"_a, "num_threads"_a = 0,
        "The pooled row distributions the hybrid rule ranks; forbidden tiles hold -1.");

  // ---- patterns: geometry tuple in, plan arrays (with the rule they use) out ----------------
  m.def("pattern_causal", [](const GeoTuple& g) {
    return plan_arrays(spattn::causal_plan(to_geo("patterns.causal", g)));
  }, "geo"_a);
  m.def("pattern_sliding_window", [](const GeoTuple& g, int64_t left, int64_t right) {
    return plan_arrays(spattn::sliding_window_plan(to_geo("patterns.sliding_window", g), left,
                                                   right));
  }, "geo"_a, "left"_a, "right"_a);
  m.def("pattern_mistral", [](const GeoTuple& g, int64_t window) {
    return plan_arrays(spattn::mistral_plan(to_geo("patterns.mistral", g), window));
  }, "geo"_a, "window"_a);
  m.def("pattern_dilated_window", [](const GeoTuple& g, int64_t left, int64_t right,
                                     int64_t dilation) {
    return plan_arrays(spattn::dilated_window_plan(to_geo("patterns.dilated_window", g), left,
                                                   right, dilation));
  }, "geo"_a, "left"_a, "right"_a, "dilation"_a);
  m.def("pattern_strided", [](const GeoTuple& g, int64_t stride, const std::string& part,
                              bool causal) {
    return plan_arrays(
        spattn::strided_plan(to_geo("patterns.strided", g), stride, to_part(part), causal));
  }, "geo"_a, "stride"_a, "part"_a, "causal"_a);
  m.def("pattern_fixed", [](const GeoTuple& g, int64_t segment, int64_t summary,
                            const std::string& part, bool causal) {
    return plan_arrays(spattn::fixed_plan(to_geo("patterns.fixed", g), segment, summary,
                                          to_part(part), causal));
  }, "geo"_a, "segment"_a, "summary"_a, "part"_a, "causal"_a);
  m.def("pattern_longformer", [](const GeoTuple& g, int64_t left, int64_t right,
                                 int64_t dilation, std::vector<int64_t> global) {
    spattn::LongformerOptions o;
    o.left = left;
    o.right = right;
    o.dilation = dilation;
    o.global = std::move(global);
    return plan_arrays(spattn::longformer_plan(to_geo("patterns.longformer", g), o));
  }, "geo"_a, "left"_a, "right"_a, "dilation"_a, "global_tokens"_a);
  m.def("pattern_bigbird", [](const GeoTuple& g, int64_t window_blocks, int64_t global_blocks,
                              int64_t random_blocks, uint64_t seed) {
    spattn::BigBirdOptions o;
    o.window_blocks = window_blocks;
    o.global_blocks = global_blocks;
    o.random_blocks = random_blocks;
    o.seed = seed;
    return plan_arrays(spattn::bigbird_plan(to_geo("patterns.bigbird", g), o));
  }, "geo"_a, "window_blocks"_a, "global_blocks"_a, "random_blocks"_a, "seed"_a);
  m.def("pattern_document", [](const GeoTuple& g, std::vector<int64_t> cu_seqlens) {
    return plan_arrays(spattn::document_plan(to_geo("patterns.document", g), cu_seqlens));
  }, "geo"_a, "cu_seqlens"_a);
  m.def("pattern_video_window", [](const GeoTuple& g, int64_t frames, int64_t height,
                                   int64_t width, int64_t radius_t, int64_t radius_h,
                                   int64_t radius_w) {
    spattn::VideoWindow w;
    w.frames = frames;
    w.height = height;
    w.width = width;
    w.radius_t = radius_t;
    w.radius_h = radius_h;
    w.radius_w = radius_w;
    return plan_arrays(spattn::video_window_plan(to_geo("patterns.video_window", g), w));
  }, "geo"_a, "frames"_a, "height"_a, "width"_a, "radius_t"_a, "radius_h"_a, "radius_w"_a);

  // ---- plan algebra and statistics on host plans (BlockPlan._host_args() tuples) -------------
  m.def("plan_union", [](nb::handle a, nb::handle b) {
    return plan_arrays(spattn::plan_union(host_plan("BlockPlan.union", unpack_plan("a", a)),
                                          host_plan("BlockPlan.union", unpack_plan("b", b))));
  }, "a"_a, "b"_a);
  m.def("plan_intersection", [](nb::handle a, nb::handle b) {
    return plan_arrays(
        spattn::plan_intersection(host_plan("BlockPlan.intersection", unpack_plan("a", a)),
                                  host_plan("BlockPlan.intersection", unpack_plan("b", b))));
  }, "a"_a, "b"_a);
  m.def("plan_difference", [](nb::handle a, nb::handle b) {
    return plan_arrays(
        spattn::plan_difference(host_plan("BlockPlan.difference", unpack_plan("a", a)),
                                host_plan("BlockPlan.difference", unpack_plan("b", b))));
  }, "a"_a, "b"_a);
  m.def("plan_stats", [](nb::handle p) {
    return stats_dict(spattn::plan_stats(host_plan("BlockPlan.stats", unpack_plan("plan", p))));
  }, "plan"_a);

#ifdef SPATTN_PY_DIAGNOSTICS
  m.def("render_plan", [](nb::handle p, int64_t b, int64_t head, int target_side) {
    return image_array(spattn::render_plan(
        host_plan("BlockPlan.save_png", unpack_plan("plan", p)), b, head, target_side));
  }, "plan"_a, "batch"_a, "head"_a, "target_side"_a);
  m.def("evaluate_plan", [](const InArray& q, const InArray& k, const InArray& v, nb::handle p,
                            double scale) {
    const char* where = "evaluate_plan";
    const auto plan = host_plan(where, unpack_plan("plan", p));
    spattn::AttentionParams params;
    params.scale = scale;
    params.mask = plan.geometry().rule;
    const auto rq = host_ref(where, "q", q), rk = host_ref(where, "k", k),
               rv = host_ref(where, "v", v);
    spattn::PlanQuality quality;
    {
      nb::gil_scoped_release release;
      quality = spattn::evaluate_plan(rq, rk, rv, plan, params);
    }
    return quality_dict(quality);
  }, "q"_a, "k"_a, "v"_a, "plan"_a, "scale"_a);
  m.def("tune_hybrid", [](const InArray& q, const InArray& k, const InArray& v,
                          const std::string& metric, double target, double scale, int block_q,
                          int block_k, bool causal, int64_t window_left, int64_t window_right,
                          int64_t sink_blocks, int64_t local_blocks, std::vector<double> k_grid,
                          int steps) {
    const char* where = "select.tune";
    spattn::TuneOptions o;
    SPATTN_CHECK(metric == "rel_l1" || metric == "recall", where,
                 ": metric must be 'rel_l1' or 'recall'; got '", metric, "'");
    o.metric = metric == "rel_l1" ? spattn::TuneMetric::rel_l1 : spattn::TuneMetric::recall;
    o.target = target;
    o.base = hybrid_options({}, {}, scale, block_q, block_k, causal, window_left, window_right,
                            sink_blocks, local_blocks, "per_head", 0);
    if (!k_grid.empty()) o.k_grid = std::move(k_grid);
    o.steps = steps;
    const auto rq = host_ref(where, "q", q), rk = host_ref(where, "k", k),
               rv = host_ref(where, "v", v);
    spattn::TuneResult r;
    {
      nb::gil_scoped_release release;
      r = spattn::tune_hybrid(rq, rk, rv, o);
    }
    nb::dict d;
    d["top_k"] = r.top_k;
    d["top_p"] = r.top_p;
    d["quality"] = quality_dict(r.quality);
    d["plan"] = plan_arrays(r.plan);
    d["evaluations"] = r.evaluations;
    d["seconds"] = r.seconds;
    return d;
  }, "q"_a, "k"_a, "v"_a, "metric"_a, "target"_a, "scale"_a, "block_q"_a, "block_k"_a,
        "causal"_a, "window_left"_a, "window_right"_a, "sink_blocks"_a, "local_blocks"_a,
        "k_grid"_a, "steps"_a);
#endif
}
