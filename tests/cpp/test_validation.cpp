// Every argument check of the attention entry points (src/core/attention.cpp) and of plan
// validation (validate_plan in src/core/plan.cpp, reached through forward): each message must
// name the function, the argument, what was expected and what was given.
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "spattn/attention.hpp"
#include "spattn/error.hpp"

namespace spattn {
namespace {

// Runs fn, expects spattn::Error, and checks that its message contains every fragment.
void expect_error(const std::function<void()>& fn, const std::vector<std::string>& fragments) {
  try {
    fn();
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const std::string& f : fragments)
      EXPECT_NE(msg.find(f), std::string::npos) << "message \"" << msg << "\" lacks \"" << f << "\"";
    return;
  }
  ADD_FAILURE() << "no spattn::Error thrown; expected one mentioning " << fragments.front();
}

// A valid small problem; each test breaks one thing.
struct Args {
  int64_t B = 2, Hq = 4, Hkv = 2, Nq = 40, Nk = 50, D = 16, Dv = 8;
  Tensor q = Tensor::zeros({B, Hq, Nq, D}, DType::float32);
  Tensor k = Tensor::zeros({B, Hkv, Nk, D}, DType::float32);
  Tensor v = Tensor::zeros({B, Hkv, Nk, Dv}, DType::float32);
  Tensor out = Tensor::zeros({B, Hq, Nq, Dv}, DType::float32);
  Tensor lse = Tensor::zeros({B, Hq, Nq}, DType::float32);
  Tensor dout = Tensor::zeros({B, Hq, Nq, Dv}, DType::float32);
  Tensor dq = Tensor::zeros({B, Hq, Nq, D}, DType::float32);
  Tensor dk = Tensor::zeros({B, Hkv, Nk, D}, DType::float32);
  Tensor dv = Tensor::zeros({B, Hkv, Nk, Dv}, DType::float32);
  AttentionParams params;

  TensorRef qr = q, kr = k, vr = v, outr = out, lser = lse, doutr = dout, dqr = dq, dkr = dk,
            dvr = dv;
  const PlanView* plan = nullptr;

  void fwd() const { forward(qr, kr, vr, plan, params, outr, lser); }
  void bwd() const { backward(qr, kr, vr, outr, lser, doutr, plan, params, dqr, dkr, dvr); }
};

TensorRef with_shape(TensorRef t, std::initializer_list<int64_t> shape) {
  int d = 0;
  for (int64_t s : shape) t.shape[d++] = s;
  return t;
}

TEST(Validation, ValidArgumentsRun) {
  Args a;
  EXPECT_NO_THROW(a.fwd());
  EXPECT_NO_THROW(a.bwd());
}

TEST(Validation, NullPointer) {
  Args a;
  a.qr.data = nullptr;
  expect_error([&] { a.fwd(); }, {"forward: q must point to memory", "got a null pointer"});
}

TEST(Validation, Rank) {
  Args a;
  a.kr.rank = 3;
  expect_error([&] { a.fwd(); }, {"forward: k must have rank 4", "got rank 3", "(2, 2, 50)"});
}

TEST(Validation, Dtype) {
  Args a;
  Tensor v64 = Tensor::zeros({a.B, a.Hkv, a.Nk, a.Dv}, DType::float64);
  a.vr = v64;
  expect_error([&] { a.fwd(); }, {"forward: v must have q's dtype float32", "got float64"});
}

TEST(Validation, Device) {
  Args a;
  a.kr.device = Device{DeviceKind::cuda, 1};
  expect_error([&] { a.fwd(); }, {"forward: k must be on q's device cpu", "got cuda:1"});
}

TEST(Validation, LastDimensionStride) {
  Args a;
  a.qr.stride[3] = 2;
  expect_error([&] { a.fwd(); },
               {"forward: q must have unit stride in its last dimension", "got stride 2"});
}

TEST(Validation, BatchMismatch) {
  Args a;
  a.kr = with_shape(a.kr, {1, 2, 50, 16});
  expect_error([&] { a.fwd(); }, {"forward: k.shape[0] (batch) must equal q's 2", "got 1"});
}

TEST(Validation, HeadDimMismatch) {
  Args a;
  a.kr = with_shape(a.kr, {2, 2, 50, 8});
  expect_error([&] { a.fwd(); }, {"forward: k.shape[3] (head dim) must equal q's 16", "got 8"});
}

TEST(Validation, ValueShape) {
  Args a;
  a.vr = with_shape(a.vr, {2, 2, 49, 8});
  expect_error([&] { a.fwd(); }, {"forward: v must have shape (2, 2, 50, 8)", "got (2, 2, 49, 8)"});
}

TEST(Validation, GroupedHeads) {
  Args a;
  Tensor k3 = Tensor::zeros({2, 3, 50, 16}, DType::float32);
  Tensor v3 = Tensor::zeros({2, 3, 50, 8}, DType::float32);
  a.kr = k3;
  a.vr = v3;
  expect_error([&] { a.fwd(); },
               {"forward: q heads must be a multiple of k heads", "got q heads 4, k heads 3"});
}

TEST(Validation, HeadDimSupport) {
  Args a;
  Tensor q = Tensor::zeros({1, 1, 4, 600}, DType::float32);
  Tensor k = Tensor::zeros({1, 1, 4, 600}, DType::float32);
  Tensor v = Tensor::zeros({1, 1, 4, 8}, DType::float32);
  Tensor o = Tensor::zeros({1, 1, 4, 8}, DType::float32);
  Tensor l = Tensor::zeros({1, 1, 4}, DType::float32);
  expect_error([&] { forward(q, k, v, nullptr, {}, o, l); },
               {"forward: q.shape[3] (head dim of q and k) must be in [1, 512]", "got 600"});
  Tensor v2 = Tensor::zeros({1, 1, 4, 513}, DType::float32);
  Tensor q2 = Tensor::zeros({1, 1, 4, 8}, DType::float32);
  Tensor k2 = Tensor::zeros({1, 1, 4, 8}, DType::float32);
  Tensor o2 = Tensor::zeros({1, 1, 4, 513}, DType::float32);
  expect_error([&] { forward(q2, k2, v2, nullptr, {}, o2, l); },
               {"forward: v.shape[3] (head dim of v) must be in [1, 512]", "got 513"});
  EXPECT_TRUE(backend_supports(Device{}, DType::bfloat16, 256, 512).ok);
  EXPECT_FALSE(backend_supports(Device{}, DType::float32, 0, 64).ok);
}

TEST(Validation, Scale) {
  Args a;
  a.params.scale = -1.0;
  expect_error([&] { a.fwd(); }, {"forward: params.scale must be finite and >= 0", "got -1"});
  a.params.scale = std::numeric_limits<double>::infinity();
  expect_error([&] { a.fwd(); }, {"forward: params.scale must be finite", "got inf"});
}

TEST(Validation, Threads) {
  Args a;
  a.params.num_threads = -3;
  expect_error([&] { a.fwd(); }, {"forward: params.num_threads must be >= 0", "got -3"});
}

TEST(Validation, Window) {
  Args a;
  a.params.mask.window_left = -5;
  expect_error([&] { a.fwd(); },
               {"forward: params.mask window sizes must be >= 0 or -1", "got (-5, -1)"});
}

TEST(Validation, OutAndLse) {
  Args a;
  a.outr = with_shape(a.outr, {2, 4, 40, 16});
  expect_error([&] { a.fwd(); }, {"forward: out must have shape (2, 4, 40, 8)", "got (2, 4, 40, 16)"});
  Args b;
  b.outr.rank = 3;
  expect_error([&] { b.fwd(); }, {"forward: out must have rank 4", "got rank 3"});
  Args c;
  Tensor o16 = Tensor::zeros({2, 4, 40, 8}, DType::bfloat16);
  c.outr = o16;
  expect_error([&] { c.fwd(); }, {"forward: out must have q's dtype float32", "got bfloat16"});
  Args d;
  d.outr.stride[3] = 3;
  expect_error([&] { d.fwd(); }, {"forward: out must have unit stride", "got stride 3"});
  Args e;
  e.outr.device = Device{DeviceKind::cuda, 0};
  expect_error([&] { e.fwd(); }, {"forward: out must be on q's device cpu", "got cuda:0"});
  Args f;
  Tensor l64 = Tensor::zeros({2, 4, 40}, DType::float64);
  f.lser = l64;
  expect_error([&] { f.fwd(); }, {"forward: lse must have dtype float32", "got float64"});
  Args g;
  g.lser = with_shape(g.lser, {2, 4, 41});
  expect_error([&] { g.fwd(); }, {"forward: lse must have shape (2, 4, 40)", "got (2, 4, 41)"});
  Args h;
  h.lser.rank = 4;
  expect_error([&] { h.fwd(); }, {"forward: lse must have rank 3", "got rank 4"});
  Args i;
  i.lser.device = Device{DeviceKind::cuda, 0};
  expect_error([&] { i.fwd(); }, {"forward: lse must be on q's device cpu", "got cuda:0"});
}

TEST(Validation, BackwardTensors) {
  {
    Args a;
    a.doutr = with_shape(a.doutr, {2, 4, 40, 9});
    expect_error([&] { a.bwd(); }, {"backward: dout must have shape (2, 4, 40, 8)", "got (2, 4, 40, 9)"});
  }
  {
    Args a;
    a.dqr = with_shape(a.dqr, {2, 4, 40, 8});
    expect_error([&] { a.bwd(); }, {"backward: dq must have shape (2, 4, 40, 16)", "got (2, 4, 40, 8)"});
  }
  {
    Args a;
    a.dkr = with_shape(a.dkr, {2, 4, 50, 16});
    expect_error([&] { a.bwd(); }, {"backward: dk must have shape (2, 2, 50, 16)", "got (2, 4, 50, 16)"});
  }
  {
    Args a;
    a.dvr = with_shape(a.dvr, {2, 2, 50, 16});
    expect_error([&] { a.bwd(); }, {"backward: dv must have shape (2, 2, 50, 8)", "got (2, 2, 50, 16)"});
  }
  {
    Args a;
    Tensor d16 = Tensor::zeros({2, 2, 50, 16}, DType::float16);
    a.dkr = d16;
    expect_error([&] { a.bwd(); }, {"backward: dk must have q's dtype float32", "got float16"});
  }
  {
    Args a;
    a.dvr.stride[3] = 4;
    expect_error([&] { a.bwd(); }, {"backward: dv must have unit stride", "got stride 4"});
  }
  {
    Args a;
    a.dqr.rank = 2;
    expect_error([&] { a.bwd(); }, {"backward: dq must have rank 4", "got rank 2"});
  }
  {
    Args a;
    a.doutr.device = Device{DeviceKind::cuda, 0};
    expect_error([&] { a.bwd(); }, {"backward: dout must be on q's device cpu", "got cuda:0"});
  }
  {
    Args a;  // backward also runs every forward check
    a.outr = with_shape(a.outr, {2, 4, 39, 8});
    expect_error([&] { a.bwd(); }, {"backward: out must have shape (2, 4, 40, 8)", "got (2, 4, 39, 8)"});
  }
}

TEST(Validation, AllocatingOverloads) {
  Args a;
  TensorRef q = a.q;
  q.device = Device{DeviceKind::cuda, 0};
  expect_error([&] { forward(q, a.k, a.v, static_cast<const BlockPlan*>(nullptr)); },
               {"forward: the allocating overload takes host tensors", "got q on cuda:0"});
  expect_error([&] { backward(q, a.k, a.v, a.out, a.lse, a.dout, static_cast<const BlockPlan*>(nullptr)); },
               {"backward: the allocating overload takes host tensors", "got q on cuda:0"});
  TensorRef q3 = a.q;
  q3.rank = 3;
  expect_error([&] { forward(q3, a.k, a.v, static_cast<const BlockPlan*>(nullptr)); },
               {"forward: q and v must have rank 4", "got 3 and 4"});
  expect_error([&] { backward(q3, a.k, a.v, a.out, a.lse, a.dout, static_cast<const BlockPlan*>(nullptr)); },
               {"backward: q, k and v must have rank 4", "got 3, 4, 4"});
}

// ---- plans ----------------------------------------------------------------------------------

struct PlanArgs : Args {
  PlanGeometry geo{2, 4, 40, 50, 16, 16, MaskRule{}};
  std::vector<int32_t> kv_index, num_full, num_partial;
  PlanView view;

  // A plan whose every row lists kv block 0 (a full tile for qb < 2, partial for the tail qb).
  PlanArgs() {
    const int64_t rows = geo.num_rows(), cap = geo.num_k_blocks();
    kv_index.assign(size_t(rows * cap), 0);
    num_full.assign(size_t(rows), 0);
    num_partial.assign(size_t(rows), 0);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t qb = r % geo.num_q_blocks();
      (geo.classify(qb, 0) == TileKind::full ? num_full : num_partial)[size_t(r)] = 1;
    }
    refresh();
  }
  void refresh() {
    view.geo = geo;
    view.capacity = geo.num_k_blocks();
    view.kv_index = kv_index.data();
    view.num_full = num_full.data();
    view.num_partial = num_partial.data();
    plan = &view;
  }
};

TEST(PlanValidation, ValidPlanRuns) {
  PlanArgs a;
  EXPECT_NO_THROW(a.fwd());
  EXPECT_NO_THROW(a.bwd());
}

TEST(PlanValidation, Geometry) {
  {
    PlanArgs a;
    a.geo.q_len = 41;
    a.refresh();
    expect_error([&] { a.fwd(); }, {"forward: plan geometry must match q/k lengths (40, 50)",
                                    "got plan q_len=41, k_len=50"});
  }
  {
    PlanArgs a;
    a.geo.batch = 3;
    a.refresh();
    expect_error([&] { a.fwd(); }, {"forward: plan batch must be 1 or 2", "got 3"});
  }
  {
    PlanArgs a;
    a.geo.heads = 3;
    a.refresh();
    expect_error([&] { a.fwd(); },
                 {"forward: plan heads must be 1, the k heads (2) or the q heads (4)", "got 3"});
  }
  {
    PlanArgs a;
    a.params.mask.causal = true;
    expect_error([&] { a.fwd(); }, {"forward: params.mask must equal the rule the plan was built with (none)",
                                    "got causal"});
  }
  {
    PlanArgs a;
    a.view.device = Device{DeviceKind::cuda, 0};
    expect_error([&] { a.fwd(); }, {"forward: plan must be on q's device cpu", "got cuda:0"});
  }
  {
    PlanArgs a;
    a.geo.block_q = 24;
    a.refresh();
    expect_error([&] { a.fwd(); }, {"forward: block_q must be a power of two in [16, 256]", "got 24"});
  }
  {
    PlanArgs a;
    a.geo.block_k = 512;
    a.refresh();
    expect_error([&] { a.fwd(); }, {"forward: block_k must be a power of two in [16, 256]", "got 512"});
  }
}

TEST(PlanValidation, GeometryDirect) {
  // Checks that the entry point's own checks reach first; validate_plan states them itself.
  PlanArgs a;
  PlanView v = a.view;
  v.geo.batch = 0;
  expect_error([&] { validate_plan(v, "where"); }, {"where: plan batch must be >= 1", "got 0"});
  v = a.view;
  v.geo.heads = 0;
  expect_error([&] { validate_plan(v, "where"); }, {"where: plan heads must be >= 1", "got 0"});
  v = a.view;
  v.geo.q_len = -1;
  expect_error([&] { validate_plan(v, "where"); }, {"where: plan q_len must be >= 0", "got -1"});
  v = a.view;
  v.geo.k_len = -2;
  expect_error([&] { validate_plan(v, "where"); }, {"where: plan k_len must be >= 0", "got -2"});
  v = a.view;
  v.geo.q_len = v.geo.k_len = int64_t(1) << 40;
  expect_error([&] { validate_plan(v, "where"); }, {"where: plan has too many blocks for int32 indices"});
  v = a.view;
  v.geo.rule.window_right = -4;
  expect_error([&] { validate_plan(v, "where"); },
               {"where: window sizes must be >= 0 or -1", "got (-1, -4)"});
}

TEST(PlanValidation, Contents) {
  {
    PlanArgs a;
    a.view.capacity = 0;
    expect_error([&] { a.fwd(); }, {"forward: plan capacity must be >= 1", "got 0"});
  }
  {
    PlanArgs a;
    a.view.num_full = nullptr;
    expect_error([&] { a.fwd(); }, {"forward: plan arrays must not be null"});
  }
  {
    PlanArgs a;
    a.num_full[1] = -1;
    expect_error([&] { a.fwd(); }, {"forward: plan row (b=0, h=0, qb=1)",
                                    "must hold 0 <= num_full + num_partial <= capacity (4)",
                                    "got num_full=-1, num_partial=0"});
  }
  {
    PlanArgs a;
    a.kv_index[0] = 4;
    expect_error([&] { a.fwd(); }, {"forward: plan row (b=0, h=0, qb=0) kv block index must be in [0, 4)",
                                    "got 4"});
  }
  {
    PlanArgs a;  // two full tiles out of order
    a.num_full[0] = 2;
    a.kv_index[0] = 2;
    a.kv_index[1] = 1;
    expect_error([&] { a.fwd(); }, {"forward: plan row (b=0, h=0, qb=0) indices must be strictly ascending within the full run",
                                    "got 2 then 1"});
  }
  {
    PlanArgs a;  // kv block 3 (keys 48..49) is cut by the tail: it cannot be full
    a.num_full[0] = 2;
    a.kv_index[0] = 0;
    a.kv_index[1] = 3;
    expect_error([&] { a.fwd(); }, {"forward: plan row (b=0, h=0, qb=0) marks kv block 3 full",
                                    "expected partial"});
  }
  {
    PlanArgs a;  // a causal rule empties kv block 3 for query block 0
    a.geo.rule.causal = true;
    a.params.mask.causal = true;
    a.refresh();
    a.num_full[0] = 0;
    a.num_partial[0] = 1;
    a.kv_index[0] = 3;
    expect_error([&] { a.fwd(); }, {"forward: plan row (b=0, h=0, qb=0) lists kv block 3",
                                    "which the rule (causal) leaves empty"});
  }
  {
    PlanArgs a;  // block 0 in both runs
    a.num_full[0] = 1;
    a.num_partial[0] = 1;
    a.kv_index[0] = 0;
    a.kv_index[1] = 0;
    expect_error([&] { a.fwd(); }, {"forward: plan row (b=0, h=0, qb=0) lists kv block 0 twice"});
  }
}

}  // namespace
}  // namespace spattn
