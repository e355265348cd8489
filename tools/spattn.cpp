// The `spattn` command-line tool: build and inspect plans (mask), time dense vs sparse attention
// (bench), and check the engine against the reference (check). docs/cli.md is the manual.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <iostream>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "npy.hpp"
#include "png.hpp"
#include "spattn/attention.hpp"
#include "spattn/diagnostics.hpp"
#include "spattn/error.hpp"
#include "spattn/patterns.hpp"
#include "spattn/reference.hpp"
#include "spattn/select.hpp"

namespace {

using namespace spattn;

// A mistake in the command line: reported with the subcommand's name, exit status 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Option {
  const char* name;
  bool takes_value;
  const char* help;
};

class Args {
 public:
  Args(std::string command, std::vector<Option> options)
      : command_(std::move(command)), options_(std::move(options)) {}

  // Returns false when --help was given.
  bool parse(int argc, char** argv) {
    for (int i = 0; i < argc; ++i) {
      std::string tok = argv[i];
      if (tok == "--help" || tok == "-h") return false;
      if (tok.rfind("--", 0) != 0) fail("unexpected argument '" + tok + "'");
      std::string name = tok.substr(2), value;
      const size_t eq = name.find('=');
      const bool inline_value = eq != std::string::npos;
      if (inline_value) {
        value = name.substr(eq + 1);
        name = name.substr(0, eq);
      }
      const Option* opt = find(name);
      if (!opt) fail("unknown option --" + name);
      if (opt->takes_value && !inline_value) {
        if (i + 1 >= argc) fail("option --" + name + " needs a value");
        value = argv[++i];
      } else if (!opt->takes_value && inline_value) {
        fail("option --" + name + " takes no value");
      }
      values_[name] = opt->takes_value ? value : "1";
    }
    return true;
  }

  void print_help(const char* summary) const {
    std::cout << "usage: spattn " << command_ << " [options]\n\n" << summary << "\n\noptions:\n";
    for (const Option& o : options_) {
      std::string left = std::string("  --") + o.name + (o.takes_value ? " VALUE" : "");
      if (left.size() < 26) left.resize(26, ' ');
      else left += "\n" + std::string(26, ' ');
      std::cout << left << o.help << "\n";
    }
    std::cout << "  --help                  this text\n";
  }

  bool has(const std::string& name) const { return values_.count(name) != 0; }
  std::string str(const std::string& name, const std::string& fallback) const {
    auto it = values_.find(name);
    return it == values_.end() ? fallback : it->second;
  }
  int64_t integer(const std::string& name, int64_t fallback) const {
    return has(name) ? to_int(name, values_.at(name)) : fallback;
  }
  double real(const std::string& name, double fallback) const {
    return has(name) ? to_real(name, values_.at(name)) : fallback;
  }
  std::vector<double> reals(const std::string& name, std::vector<double> fallback) const {
    if (!has(name)) return fallback;
    std::vector<double> out;
    for (const std::string& s : split(values_.at(name))) out.push_back(to_real(name, s));
    return out;
  }
  std::vector<int64_t> integers(const std::string& name, std::vector<int64_t> fallback) const {
    if (!has(name)) return fallback;
    std::vector<int64_t> out;
    for (const std::string& s : split(values_.at(name))) out.push_back(to_int(name, s));
    return out;
  }
  [[noreturn]] void fail(const std::string& what) const {
    throw UsageError("spattn " + command_ + ": " + what + " (see spattn " + command_ + " --help)");
  }

 private:
  const Option* find(const std::string& name) const {
    for (const Option& o : options_)
      if (name == o.name) return &o;
    return nullptr;
  }
  static std::vector<std::string> split(const std::string& s) {
    std::vector<std::string> parts;
    std::stringstream in(s);
    std::string part;
    while (std::getline(in, part, ',')) parts.push_back(part);
    return parts;
  }
  int64_t to_int(const std::string& name, const std::string& s) const {
    try {
      size_t used = 0;
      const long long v = std::stoll(s, &used);
      if (used == s.size()) return v;
    } catch (const std::exception&) {
    }
    fail("--" + name + " must be an integer; got '" + s + "'");
  }
  double to_real(const std::string& name, const std::string& s) const {
    try {
      size_t used = 0;
      const double v = std::stod(s, &used);
      if (used == s.size() && std::isfinite(v)) return v;
    } catch (const std::exception&) {
    }
    fail("--" + name + " must be a number; got '" + s + "'");
  }

  std::string command_;
  std::vector<Option> options_;
  std::map<std::string, std::string> values_;
};

double now_ms() {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Inputs with positional structure: features are sinusoids of the token position shared by q
// and k, so q_i · k_j depends on i - j (local attention) plus per-head noise. Uniform random
// inputs would pool to nearly constant block means and make every selector look alike. Head h
// takes the phases of head h / group, so the query heads of a GQA group (group = Hq / Hkv)
// share their kv head's phases.
Tensor make_input(int64_t B, int64_t H, int64_t N, int64_t D, uint64_t seed, bool smooth,
                  DType dtype, double noise, uint64_t feature_seed, int64_t group = 1) {
  Tensor t = Tensor::empty({B, H, N, D}, DType::float32);
  if (!smooth) {
    fill_uniform(t, seed);
  } else {
    std::mt19937_64 feat(feature_seed), rng(seed);
    std::uniform_real_distribution<double> u(0.0, 1.0);
    std::vector<double> freq(static_cast<size_t>(D)), phase(static_cast<size_t>(H * D));
    for (auto& f : freq) f = 2.0 * M_PI / (8.0 * std::pow(double(std::max<int64_t>(N, 16)) / 8.0, u(feat)));
    for (auto& p : phase) p = 2.0 * M_PI * u(feat);
    float* x = t.ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t n = 0; n < N; ++n)
          for (int64_t d = 0; d < D; ++d)
            x[((b * H + h) * N + n) * D + d] =
                float(2.0 * std::sin(double(n) * freq[size_t(d)] + phase[size_t((h / group) * D + d)]) +
                      noise * (2.0 * u(rng) - 1.0));
  }
  if (dtype == DType::float32) return t;
  Tensor c = Tensor::empty({B, H, N, D}, dtype);
  for (int64_t i = 0; i < t.numel(); ++i) store_element(c, i, double(t.ptr<float>()[i]));
  return c;
}

DType parse_dtype(const Args& a) {
  const std::string s = a.str("dtype", "float32");
  if (s == "float32") return DType::float32;
  if (s == "bfloat16") return DType::bfloat16;
  if (s == "float16") return DType::float16;
  a.fail("--dtype must be float32, bfloat16 or float16; got '" + s + "'");
}

MaskRule parse_rule(const Args& a) {
  MaskRule r;
  r.causal = a.has("causal");
  r.window_left = a.integer("window-left", -1);
  r.window_right = a.integer("window-right", -1);
  if (r.window_left < -1 || r.window_right < -1)
    a.fail("--window-left/--window-right must be >= 0 or -1 (unbounded)");
  return r;
}

std::string fmt(double x, int prec = 4) {
  std::ostringstream s;
  s.setf(std::ios::fixed);
  s.precision(prec);
  s << x;
  return s.str();
}

void print_stats(const BlockPlan& plan) {
  const PlanStats s = plan_stats(plan);
  const PlanGeometry& g = plan.geometry();
  std::cout << "plan: batch " << g.batch << ", heads " << g.heads << ", q_len " << g.q_len
            << ", k_len " << g.k_len << ", blocks " << g.block_q << "x" << g.block_k
            << ", rule " << g.rule.to_string() << "\n"
            << "tiles: " << s.tiles << " of " << s.grid_tiles << " (" << s.full_tiles << " full, "
            << s.partial_tiles << " partial); rule allows " << s.allowed_tiles << "\n"
            << "density: " << fmt(s.density) << " of the grid, " << fmt(s.allowed_density)
            << " of the allowed tiles; sparsity " << fmt(1.0 - s.density) << "\n";
  if (g.heads > 1) {
    std::cout << "density per head:";
    for (double d : s.head_density) std::cout << " " << fmt(d, 3);
    std::cout << "\n";
  }
}

// ---- spattn mask ----------------------------------------------------------------------------

const std::vector<Option> kInputOptions = {
    {"q", true, "query tensor .npy (B,H,N,D) or (H,N,D); with --k"},
    {"k", true, "key tensor .npy; with --q"},
    {"v", true, "value tensor .npy (for --quality/--tune; default: generated)"},
    {"batch", true, "generated inputs: batch (1)"},
    {"heads", true, "generated inputs: query heads (8)"},
    {"kv-heads", true, "generated inputs: key/value heads (= heads)"},
    {"seq-len", true, "generated inputs: q and k length (4096)"},
    {"q-len", true, "generated inputs: query length (= seq-len)"},
    {"k-len", true, "generated inputs: key length (= seq-len)"},
    {"head-dim", true, "generated inputs: head dimension (64)"},
    {"data", true, "generated inputs: smooth (positional structure) or random (smooth)"},
    {"dtype", true, "generated inputs: float32, bfloat16 or float16 (float32)"},
    {"seed", true, "random seed for generated inputs and BigBird (0)"},
};

struct Inputs {
  Tensor q, k, v;
};

Tensor with_batch(Tensor t, const Args& a, const char* name) {
  if (t.ref().rank == 4) return t;
  if (t.ref().rank != 3) a.fail(std::string("--") + name + " must have rank 3 or 4; got " + t.ref().shape_string());
  Tensor r = Tensor::empty({1, t.size(0), t.size(1), t.size(2)}, t.dtype());
  std::memcpy(r.ref().data, t.ref().data, size_t(t.numel()) * size_t(dtype_size(t.dtype())));
  return r;
}

Inputs load_inputs(const Args& a) {
  Inputs in;
  if (a.has("q") != a.has("k")) a.fail("--q and --k must be given together");
  if (a.has("q")) {
    in.q = with_batch(tools::read_npy(a.str("q", "")), a, "q");
    in.k = with_batch(tools::read_npy(a.str("k", "")), a, "k");
  } else {
    const int64_t B = a.integer("batch", 1), H = a.integer("heads", 8);
    const int64_t Hkv = a.integer("kv-heads", H), N = a.integer("seq-len", 4096);
    const int64_t Nq = a.integer("q-len", N), Nk = a.integer("k-len", N), D = a.integer("head-dim", 64);
    if (B < 1 || H < 1 || Hkv < 1 || Nq < 0 || Nk < 0 || D < 1)
      a.fail("sizes must be positive (lengths may be 0)");
    if (H % Hkv) a.fail("--heads must be a multiple of --kv-heads");
    const std::string data = a.str("data", "smooth");
    if (data != "smooth" && data != "random") a.fail("--data must be smooth or random; got '" + data + "'");
    const uint64_t seed = uint64_t(a.integer("seed", 0));
    const DType dt = parse_dtype(a);
    in.q = make_input(B, H, Nq, D, seed * 3 + 1, data == "smooth", dt, 0.5, seed, H / Hkv);
    in.k = make_input(B, Hkv, Nk, D, seed * 3 + 2, data == "smooth", dt, 0.5, seed);
  }
  if (a.has("v")) {
    in.v = with_batch(tools::read_npy(a.str("v", "")), a, "v");
  } else {
    const TensorRef& k = in.k.ref();
    in.v = make_input(k.shape[0], k.shape[1], k.shape[2], k.shape[3],
                      uint64_t(a.integer("seed", 0)) * 3 + 3, false, in.q.dtype(), 0, 0);
  }
  return in;
}

HybridOptions hybrid_options(const Args& a, MaskRule rule) {
  HybridOptions o;
  o.top_k = a.reals("top-k", {0.03});
  o.top_p = a.reals("top-p", {0.20});
  o.scale = a.real("scale", 0.0);
  o.block_q = int(a.integer("block-q", 128));
  o.block_k = int(a.integer("block-k", 64));
  o.rule = rule;
  o.sink_blocks = a.integer("sinks", 0);
  o.local_blocks = a.integer("local", -1);
  o.num_threads = int(a.integer("threads", 0));
  const std::string gqa = a.str("gqa", "head");
  if (gqa == "head") o.gqa = GqaPlan::per_query_head;
  else if (gqa == "mean") o.gqa = GqaPlan::group_mean;
  else if (gqa == "max") o.gqa = GqaPlan::group_max;
  else a.fail("--gqa must be head, mean or max; got '" + gqa + "'");
  return o;
}

int cmd_mask(int argc, char** argv) {
  std::vector<Option> opts = kInputOptions;
  const std::vector<Option> more = {
      {"pattern", true,
       "hybrid, causal, window, mistral, dilated, strided, fixed, longformer, bigbird, document "
       "or video (hybrid)"},
      {"block-q", true, "query block size (128)"},
      {"block-k", true, "key block size (64)"},
      {"causal", false, "causal rule (bottom-right aligned)"},
      {"window-left", true, "rule: keys to the left a query may see (-1)"},
      {"window-right", true, "rule: keys to the right (-1)"},
      {"top-k", true, "hybrid: Top-k fraction, or one per plan head, comma separated (0.03)"},
      {"top-p", true, "hybrid: Top-p mass, or one per plan head (0.2)"},
      {"scale", true, "hybrid: score scale (1/sqrt(D))"},
      {"sinks", true, "hybrid: always keep the first N kv blocks (0)"},
      {"local", true, "hybrid: always keep kv blocks within N of the diagonal (off)"},
      {"gqa", true, "hybrid: head (plan per query head), mean or max (plan per kv group)"},
      {"left", true, "window/dilated/longformer: tokens (or positions) to the left (256)"},
      {"right", true, "window/dilated/longformer: to the right (window: 0, others: 256)"},
      {"window", true, "mistral: window in tokens (4096)"},
      {"dilation", true, "dilated/longformer: distance between attended positions (1)"},
      {"stride", true, "strided: stride (128)"},
      {"segment", true, "fixed: segment length (128)"},
      {"summary", true, "fixed: summary positions per segment (8)"},
      {"part", true, "strided/fixed: both, local or summary (both)"},
      {"global", true, "longformer: global token positions, comma separated"},
      {"window-blocks", true, "bigbird: window in blocks (3)"},
      {"global-blocks", true, "bigbird: global blocks (2)"},
      {"random-blocks", true, "bigbird: random blocks per row (3)"},
      {"cu-seqlens", true, "document: 0,n1,n1+n2,...,total"},
      {"video", true, "video: frames,height,width (product = sequence length)"},
      {"radius", true, "video: window radius per axis t,h,w in tokens, -1 = whole axis (1,1,1)"},
      {"threads", true, "CPU threads (all)"},
      {"png", true, "write the plan as a PNG heatmap"},
      {"scores-png", true, "hybrid: write the pooled block-score map as a PNG"},
      {"head", true, "head to draw, or 'all' for a grid (0)"},
      {"quality", false, "measure recall and relative L1 error against dense attention"},
      {"tune", true, "hybrid: l1:TARGET or recall:TARGET; per-head k and p are searched"},
  };
  opts.insert(opts.end(), more.begin(), more.end());
  Args a("mask", opts);
  if (!a.parse(argc, argv)) {
    a.print_help(
        "Builds a block plan from a pattern or the hybrid Top-k/Top-p rule on q/k (.npy files or\n"
        "generated), prints its statistics and optionally draws it.");
    return 0;
  }
  const std::string pattern = a.str("pattern", "hybrid");
  static const std::set<std::string> known = {"hybrid", "causal", "window", "mistral", "dilated",
                                              "strided", "fixed", "longformer", "bigbird",
                                              "document", "video"};
  if (!known.count(pattern)) a.fail("--pattern must be one of hybrid, causal, window, mistral, dilated, strided, fixed, longformer, bigbird, document, video; got '" + pattern + "'");
  if (pattern != "hybrid")
    for (const char* o : {"top-k", "top-p", "sinks", "local", "gqa", "scores-png", "tune", "scale"})
      if (a.has(o)) a.fail(std::string("--") + o + " applies to --pattern hybrid only");
  const MaskRule rule = parse_rule(a);
  Inputs in = load_inputs(a);
  const TensorRef &q = in.q.ref(), &k = in.k.ref();
  if (q.rank != 4 || k.rank != 4) a.fail("q and k must have rank 4");

  PlanGeometry geo;
  geo.batch = 1;
  geo.heads = 1;
  geo.q_len = q.shape[2];
  geo.k_len = k.shape[2];
  geo.block_q = int(a.integer("block-q", 128));
  geo.block_k = int(a.integer("block-k", 64));
  geo.rule = rule;
  auto part = [&]() {
    const std::string p = a.str("part", "both");
    if (p == "both") return FactorPart::both;
    if (p == "local") return FactorPart::local;
    if (p == "summary") return FactorPart::summary;
    a.fail("--part must be both, local or summary; got '" + p + "'");
  };

  const double t0 = now_ms();
  BlockPlan plan;
  HybridOptions hy;
  if (pattern == "hybrid") {
    hy = hybrid_options(a, rule);
    plan = select_hybrid(q, k, hy);
  } else if (pattern == "causal") {
    plan = causal_plan(geo);
  } else if (pattern == "window") {
    plan = sliding_window_plan(geo, a.integer("left", 256), a.integer("right", 0));
  } else if (pattern == "mistral") {
    plan = mistral_plan(geo, a.integer("window", 4096));
  } else if (pattern == "dilated") {
    plan = dilated_window_plan(geo, a.integer("left", 256), a.integer("right", 256),
                               a.integer("dilation", 1));
  } else if (pattern == "strided") {
    plan = strided_plan(geo, a.integer("stride", 128), part(), true);
  } else if (pattern == "fixed") {
    plan = fixed_plan(geo, a.integer("segment", 128), a.integer("summary", 8), part(), true);
  } else if (pattern == "longformer") {
    LongformerOptions o;
    o.left = a.integer("left", 256);
    o.right = a.integer("right", 256);
    o.dilation = a.integer("dilation", 1);
    o.global = a.integers("global", {});
    plan = longformer_plan(geo, o);
  } else if (pattern == "bigbird") {
    geo.heads = q.shape[1];
    BigBirdOptions o;
    o.window_blocks = a.integer("window-blocks", 3);
    o.global_blocks = a.integer("global-blocks", 2);
    o.random_blocks = a.integer("random-blocks", 3);
    o.seed = uint64_t(a.integer("seed", 0));
    plan = bigbird_plan(geo, o);
  } else if (pattern == "document") {
    if (!a.has("cu-seqlens")) a.fail("--pattern document needs --cu-seqlens");
    const std::vector<int64_t> cu = a.integers("cu-seqlens", {});
    plan = document_plan(geo, cu);
    std::cout << "tiles crossing a document boundary (computed in full): "
              << cross_document_tiles(plan, cu) << "\n";
  } else if (pattern == "video") {
    const std::vector<int64_t> thw = a.integers("video", {});
    const std::vector<int64_t> rad = a.integers("radius", {1, 1, 1});
    if (thw.size() != 3) a.fail("--video must be frames,height,width");
    if (rad.size() != 3) a.fail("--radius must be t,h,w");
    plan = video_window_plan(geo, VideoWindow{thw[0], thw[1], thw[2], rad[0], rad[1], rad[2]});
  }
  const double t1 = now_ms();
  std::cout << "pattern: " << pattern << " (built in " << fmt(t1 - t0, 2) << " ms)\n";
  print_stats(plan);

  AttentionParams params;
  params.mask = plan.geometry().rule;
  params.scale = hy.scale;
  params.num_threads = int(a.integer("threads", 0));
  if (a.has("quality")) {
    const PlanQuality pq = evaluate_plan(q, k, in.v, plan, params);
    std::cout << "quality: recall " << fmt(pq.recall) << ", relative L1 error " << fmt(pq.rel_l1)
              << "\n";
    if (pq.head_recall.size() > 1) {
      std::cout << "  head  density  recall  rel_l1\n";
      for (size_t h = 0; h < pq.head_recall.size(); ++h)
        std::cout << "  " << h << "  " << fmt(pq.head_density[h]) << "  " << fmt(pq.head_recall[h])
                  << "  " << fmt(pq.head_rel_l1[h]) << "\n";
    }
  }
  if (a.has("tune")) {
    const std::string spec = a.str("tune", "");
    const size_t colon = spec.find(':');
    TuneOptions to;
    to.base = hy;
    const std::string metric = spec.substr(0, colon);
    if (colon == std::string::npos || (metric != "l1" && metric != "recall"))
      a.fail("--tune must be l1:TARGET or recall:TARGET; got '" + spec + "'");
    to.metric = metric == "l1" ? TuneMetric::rel_l1 : TuneMetric::recall;
    to.target = [&] {
      try {
        return std::stod(spec.substr(colon + 1));
      } catch (const std::exception&) {
        a.fail("--tune target must be a number; got '" + spec.substr(colon + 1) + "'");
      }
    }();
    const TuneResult r = tune_hybrid(q, k, in.v, to);
    std::cout << "tuned for " << (metric == "l1" ? "relative L1 <= " : "recall >= ") << to.target
              << " in " << fmt(r.seconds, 2) << " s (" << r.evaluations << " sparse passes)\n"
              << "  head  top_k   top_p   density  recall  rel_l1\n";
    for (size_t h = 0; h < r.top_k.size(); ++h)
      std::cout << "  " << h << "  " << fmt(r.top_k[h]) << "  " << fmt(r.top_p[h]) << "  "
                << fmt(r.quality.head_density[h]) << "  " << fmt(r.quality.head_recall[h]) << "  "
                << fmt(r.quality.head_rel_l1[h]) << "\n";
    std::cout << "overall: density " << fmt(r.quality.density) << ", recall "
              << fmt(r.quality.recall) << ", relative L1 " << fmt(r.quality.rel_l1) << "\n";
    std::cout << "--top-k ";
    for (size_t h = 0; h < r.top_k.size(); ++h) std::cout << (h ? "," : "") << r.top_k[h];
    std::cout << " --top-p ";
    for (size_t h = 0; h < r.top_p.size(); ++h) std::cout << (h ? "," : "") << r.top_p[h];
    std::cout << "\n";
    plan = r.plan;
  }

  const std::string head_s = a.str("head", "0");
  int64_t head = 0;
  if (head_s == "all") head = -1;
  else head = a.integer("head", 0);
  if (a.has("png")) {
    const int64_t h = head >= plan.geometry().heads ? -2 : head;
    if (h == -2) a.fail("--head must be below the plan's " + std::to_string(plan.geometry().heads) + " heads");
    tools::write_png(a.str("png", ""), render_plan(plan, 0, h));
    std::cout << "wrote " << a.str("png", "") << "\n";
  }
  if (a.has("scores-png")) {
    const BlockScores s = hybrid_block_scores(q, k, hy);
    if (head >= s.geo.heads) a.fail("--head must be below the plan's " + std::to_string(s.geo.heads) + " heads");
    tools::write_png(a.str("scores-png", ""), render_scores(s, 0, head));
    std::cout << "wrote " << a.str("scores-png", "") << "\n";
  }
  return 0;
}

// ---- spattn bench ---------------------------------------------------------------------------

int cmd_bench(int argc, char** argv) {
  Args a("bench", {
                      {"seq-len", true, "sequence lengths, comma separated (4096)"},
                      {"batch", true, "batch (1)"},
                      {"heads", true, "query heads (8)"},
                      {"kv-heads", true, "key/value heads (= heads)"},
                      {"head-dim", true, "head dimension (128)"},
                      {"dtype", true, "float32, bfloat16 or float16 (bfloat16)"},
                      {"density", true, "target plan density via Top-k only (0.05)"},
                      {"threads", true, "thread counts, comma separated (0 = all)"},
                      {"reps", true, "repetitions; the minimum time is reported (3)"},
                      {"block-q", true, "query block size (128)"},
                      {"block-k", true, "key block size (64)"},
                      {"causal", false, "causal rule"},
                      {"seed", true, "input seed (0)"},
                  });
  if (!a.parse(argc, argv)) {
    a.print_help(
        "Times dense attention against the hybrid plan (Top-k = --density) at each length and\n"
        "thread count, with the selection time and the sparse output's relative L1 error.");
    return 0;
  }
  const std::vector<int64_t> lens = a.integers("seq-len", {4096}), threads = a.integers("threads", {0});
  const int64_t B = a.integer("batch", 1), H = a.integer("heads", 8), Hkv = a.integer("kv-heads", H);
  const int64_t D = a.integer("head-dim", 128), reps = a.integer("reps", 3);
  const double density = a.real("density", 0.05);
  if (B < 1 || H < 1 || Hkv < 1 || D < 1 || reps < 1) a.fail("sizes and --reps must be >= 1");
  if (H % Hkv) a.fail("--heads must be a multiple of --kv-heads");
  if (!(density > 0 && density <= 1)) a.fail("--density must be in (0, 1]");
  for (int64_t n : lens)
    if (n < 1) a.fail("--seq-len values must be >= 1");
  for (int64_t t : threads)
    if (t < 0) a.fail("--threads values must be >= 0");
  const DType dt = a.has("dtype") ? parse_dtype(a) : DType::bfloat16;
  const uint64_t seed = uint64_t(a.integer("seed", 0));
  MaskRule rule;
  rule.causal = a.has("causal");

  std::printf("%8s %7s %10s %10s %10s %8s %8s %9s\n", "N", "threads", "dense_ms", "select_ms",
              "sparse_ms", "density", "speedup", "rel_l1");
  for (int64_t N : lens) {
    const Tensor q = make_input(B, H, N, D, seed * 3 + 1, true, dt, 0.5, seed, H / Hkv);
    const Tensor k = make_input(B, Hkv, N, D, seed * 3 + 2, true, dt, 0.5, seed);
    const Tensor v = make_input(B, Hkv, N, D, seed * 3 + 3, false, dt, 0, 0);
    for (int64_t th : threads) {
      HybridOptions o;
      o.top_k = {density};
      o.top_p = {0.0};
      o.block_q = int(a.integer("block-q", 128));
      o.block_k = int(a.integer("block-k", 64));
      o.rule = rule;
      o.num_threads = int(th);
      AttentionParams params;
      params.mask = rule;
      params.num_threads = int(th);
      double dense_ms = INFINITY, select_ms = INFINITY, sparse_ms = INFINITY;
      BlockPlan plan;
      ForwardResult dense, sparse;
      for (int64_t r = 0; r < reps; ++r) {
        double t = now_ms();
        plan = select_hybrid(q, k, o);
        select_ms = std::min(select_ms, now_ms() - t);
        t = now_ms();
        sparse = forward(q, k, v, &plan, params);
        sparse_ms = std::min(sparse_ms, now_ms() - t);
        t = now_ms();
        dense = forward(q, k, v, static_cast<const BlockPlan*>(nullptr), params);
        dense_ms = std::min(dense_ms, now_ms() - t);
      }
      double diff = 0, ref = 0;
      for (int64_t i = 0; i < dense.out.numel(); ++i) {
        const double x = load_element(sparse.out, i), y = load_element(dense.out, i);
        diff += std::abs(x - y);
        ref += std::abs(y);
      }
      std::printf("%8lld %7lld %10.2f %10.2f %10.2f %8.4f %8.2f %9.4f\n", (long long)N,
                  (long long)th, dense_ms, select_ms, sparse_ms, plan.density(),
                  dense_ms / sparse_ms, ref > 0 ? diff / ref : 0.0);
      std::fflush(stdout);
    }
  }
  return 0;
}

// ---- spattn check ---------------------------------------------------------------------------

int cmd_check(int argc, char** argv) {
  Args a("check", {{"threads", true, "CPU threads (all)"},
                   {"verbose", false, "print every case, not only failures"}});
  if (!a.parse(argc, argv)) {
    a.print_help(
        "Runs the CPU engine's forward and backward against the float64 reference on small\n"
        "shapes (odd lengths, causal, windows, GQA, hybrid plans, bfloat16) and reports the\n"
        "errors. Exit status 1 when a case exceeds its tolerance.");
    return 0;
  }
  struct Case {
    int64_t B, Hq, Hkv, Nq, Nk, D;
    MaskRule rule;
    bool plan;
    DType dtype;
  };
  const std::vector<Case> cases = {
      {1, 2, 2, 129, 129, 64, {}, false, DType::float32},
      {2, 4, 2, 200, 177, 64, {true, -1, -1}, false, DType::float32},
      {1, 4, 1, 255, 300, 128, {true, -1, -1}, true, DType::float32},
      {1, 2, 2, 301, 301, 64, {false, 70, 30}, true, DType::float32},
      {1, 4, 2, 190, 190, 64, {true, -1, -1}, true, DType::bfloat16},
      {1, 2, 1, 17, 1000, 128, {}, true, DType::bfloat16},
  };
  AttentionParams base;
  base.num_threads = int(a.integer("threads", 0));
  if (base.num_threads < 0) a.fail("--threads must be >= 0");
  int failures = 0, run = 0;
  uint64_t seed = 1;
  for (const Case& c : cases) {
    const Tensor q = make_input(c.B, c.Hq, c.Nq, c.D, seed++, false, c.dtype, 0, 0);
    const Tensor k = make_input(c.B, c.Hkv, c.Nk, c.D, seed++, false, c.dtype, 0, 0);
    const Tensor v = make_input(c.B, c.Hkv, c.Nk, c.D, seed++, false, c.dtype, 0, 0);
    const Tensor dout = make_input(c.B, c.Hq, c.Nq, c.D, seed++, false, c.dtype, 0, 0);
    AttentionParams params = base;
    params.mask = c.rule;
    BlockPlan plan;
    if (c.plan) {
      HybridOptions o;
      o.block_q = 64;
      o.block_k = 32;
      o.rule = c.rule;
      o.top_k = {0.2};
      o.top_p = {0.5};
      plan = select_hybrid(q, k, o);
    }
    const BlockPlan* pp = c.plan ? &plan : nullptr;
    const ForwardResult got = forward(q, k, v, pp, params);
    const ForwardResult r64 = reference::forward(q, k, v, pp, params, reference::Compute::float64);
    const ForwardResult r32 = reference::forward(q, k, v, pp, params, reference::Compute::float32);
    const Gradients g = backward(q, k, v, got.out, got.lse, dout, pp, params);
    const Gradients g64 = reference::backward(q, k, v, dout, pp, params, reference::Compute::float64);
    const Gradients g32 = reference::backward(q, k, v, dout, pp, params, reference::Compute::float32);
    // A kernel may be a few times worse than a naive same-precision run, never more (FA3's rule).
    const double floor = c.dtype == DType::float32 ? 1e-5 : 1e-2;
    struct Item {
      const char* name;
      double err, naive;
    } items[] = {
        {"out", reference::relative_error(got.out, r64.out), reference::relative_error(r32.out, r64.out)},
        {"lse", reference::relative_error(got.lse, r64.lse), reference::relative_error(r32.lse, r64.lse)},
        {"dq", reference::relative_error(g.dq, g64.dq), reference::relative_error(g32.dq, g64.dq)},
        {"dk", reference::relative_error(g.dk, g64.dk), reference::relative_error(g32.dk, g64.dk)},
        {"dv", reference::relative_error(g.dv, g64.dv), reference::relative_error(g32.dv, g64.dv)},
    };
    for (const Item& it : items) {
      ++run;
      const double tol = std::max(4.0 * it.naive, floor);
      const bool ok = it.err <= tol;
      failures += !ok;
      if (!ok || a.has("verbose"))
        std::printf("%s %-3s %-8s B=%lld Hq=%lld Hkv=%lld Nq=%lld Nk=%lld D=%lld rule=%s plan=%s "
                    "err=%.2e tol=%.2e\n",
                    ok ? "ok  " : "FAIL", it.name, dtype_name(c.dtype), (long long)c.B,
                    (long long)c.Hq, (long long)c.Hkv, (long long)c.Nq, (long long)c.Nk,
                    (long long)c.D, c.rule.to_string().c_str(), c.plan ? "hybrid" : "dense",
                    it.err, tol);
    }
  }
  std::printf("spattn check: %d of %d comparisons within tolerance\n", run - failures, run);
  return failures ? 1 : 0;
}

void print_usage() {
  std::cout << "usage: spattn <command> [options]\n\n"
               "commands:\n"
               "  mask    build a block plan (pattern or hybrid rule), print stats, draw PNGs\n"
               "  bench   time dense vs block-sparse attention on the CPU\n"
               "  check   self-test of the CPU engine against the reference\n\n"
               "`spattn <command> --help` describes each command's options.\n";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    print_usage();
    std::cerr << "spattn: a command is required (mask, bench or check)\n";
    return 2;
  }
  const std::string cmd = argv[1];
  if (cmd == "--help" || cmd == "-h" || cmd == "help") {
    print_usage();
    return 0;
  }
  try {
    if (cmd == "mask") return cmd_mask(argc - 2, argv + 2);
    if (cmd == "bench") return cmd_bench(argc - 2, argv + 2);
    if (cmd == "check") return cmd_check(argc - 2, argv + 2);
    std::cerr << "spattn: unknown command '" << cmd << "' (expected mask, bench or check)\n";
    return 2;
  } catch (const UsageError& e) {
    std::cerr << e.what() << "\n";
    return 2;
  } catch (const spattn::Error& e) {
    std::cerr << "spattn " << cmd << ": " << e.what() << "\n";
    return 1;
  }
}
