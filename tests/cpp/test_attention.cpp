// CPU forward against the float64 reference over shapes chosen from the tile sizes: sequence
// tails, Nq != Nk, GQA/MQA, causal and windowed rules, random plans of every density and
// broadcast, empty rows, every dtype, both memory orders, strided views and Dv != Dqk.
//
// Tolerance (FlashAttention-3's rule): error vs float64 <= kFactor × (error of the naive
// same-precision run, reference::forward(..., Compute::float32), vs float64) + a floor of a few
// units in the last place of the output dtype (float64 inputs: the floor alone, 1e-13). kFactor = 3: the tiled kernel sums in a different
// order and rescales with an online max, each worth about one naive error, never an order of
// magnitude; a wrong mask or a wrong tile shows up as errors of order 1.
#include <cstdio>
#include <cstdlib>

#include "test_attention_util.hpp"

namespace spattn::testing {
namespace {

constexpr double kFactor = 3.0;

struct ForwardOutputs {
  Buffer4 out;
  Tensor lse;
};

ForwardOutputs run_forward(const Case& c, const Problem& p) {
  ForwardOutputs r;
  r.out = make_buffer(c.B, c.Hq, c.Nq, c.Dv, c.dtype, c.order, c.pad);
  fill_value(r.out.view, std::nan(""));  // poison: every element must be written
  r.lse = Tensor::empty({c.B, c.Hq, c.Nq}, c.dtype == DType::float64 ? DType::float64
                                                                     : DType::float32);
  fill_value(r.lse, std::nan(""));
  forward(p.q.view, p.k.view, p.v.view, p.view_ptr(), p.params, r.out.view, r.lse);
  return r;
}

void check_forward(const Case& c) {
  SCOPED_TRACE(c.describe());
  const Problem p = make_problem(c);
  const ForwardOutputs got = run_forward(c, p);
  const auto ref = reference::forward(p.q.view, p.k.view, p.v.view, p.plan_ptr(), p.params,
                                      reference::Compute::float64);
  const auto naive = reference::forward(p.q.view, p.k.view, p.v.view, p.plan_ptr(), p.params,
                                        reference::Compute::float32);
  ASSERT_FALSE(has_nan(got.out.view));
  ASSERT_FALSE(has_nan(got.lse));
  const double out_err = reference::relative_error(got.out.view, ref.out);
  const double out_base = reference::relative_error(naive.out, ref.out);
  const double lse_err = reference::relative_error(got.lse, ref.lse);
  const double lse_base = reference::relative_error(naive.lse, ref.lse);
  if (std::getenv("SPATTN_TEST_VERBOSE"))
    std::printf("%s\n  out %.3g (naive %.3g)  lse %.3g (naive %.3g)\n", c.describe().c_str(),
                out_err, out_base, lse_err, lse_base);
  EXPECT_LE(out_err, tolerance(c.dtype, kFactor, out_base));
  EXPECT_LE(lse_err, tolerance(c.dtype, kFactor, lse_base));

  // Empty rows: lse = -inf exactly where the reference has it, and out exactly 0 there.
  int64_t empty = 0;
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.Hq; ++h)
      for (int64_t i = 0; i < c.Nq; ++i) {
        const bool ref_empty = std::isinf(ref.lse.get({b, h, i}));
        const double l = got.lse.get({b, h, i});
        ASSERT_EQ(ref_empty, l == -std::numeric_limits<double>::infinity())
            << "lse at (" << b << ", " << h << ", " << i << ") = " << l;
        if (!ref_empty) continue;
        ++empty;
        for (int64_t d = 0; d < c.Dv; ++d)
          ASSERT_EQ(load_element(got.out.view, offset_of(got.out.view, {b, h, i, d})), 0.0);
      }
  if (c.use_plan && c.density == 0.0) EXPECT_EQ(empty, c.B * c.Hq * c.Nq);
}

TEST(CpuForward, SequenceLengths) {
  for (int64_t n : {1, 17, 127, 128, 129}) {
    for (bool causal : {false, true}) {
      Case c;
      c.Nq = c.Nk = n;
      c.rule.causal = causal;
      check_forward(c);
    }
  }
}

TEST(CpuForward, LongSequence) {
  Case c;
  c.Hq = c.Hkv = 1;
  c.Nq = c.Nk = 1000;
  check_forward(c);
  c.rule.causal = true;
  c.dtype = DType::bfloat16;
  check_forward(c);
}

TEST(CpuForward, UnequalLengths) {
  const std::pair<int64_t, int64_t> lengths[] = {{17, 129}, {129, 17}, {100, 300}, {1, 200},
                                                 {200, 1}};
  for (auto [nq, nk] : lengths)
    for (bool causal : {false, true}) {
      Case c;
      c.Nq = nq;
      c.Nk = nk;
      c.rule.causal = causal;  // causal with Nq > Nk leaves the first Nq - Nk rows empty
      check_forward(c);
    }
}

TEST(CpuForward, GroupedQueryHeads) {
  for (int64_t group : {1, 2, 8}) {
    Case c;
    c.B = 2;
    c.Hkv = 2;
    c.Hq = 2 * group;
    c.Nq = 40;
    c.Nk = 70;
    c.rule.causal = group == 2;
    check_forward(c);
  }
}

TEST(CpuForward, WindowRules) {
  const MaskRule rules[] = {{false, 16, 16}, {true, 24, -1}, {false, 0, 0}, {false, -1, 5},
                            {true, 0, -1}};
  for (const MaskRule& rule : rules)
    for (auto [nq, nk] : {std::pair<int64_t, int64_t>{150, 150}, {70, 130}}) {
      Case c;
      c.Nq = nq;
      c.Nk = nk;
      c.rule = rule;
      check_forward(c);
    }
}

TEST(CpuForward, RandomPlans) {
  for (double density : {0.0, 0.05, 0.5, 1.0})
    for (bool causal : {false, true}) {
      Case c;
      c.B = 2;
      c.Hq = 4;
      c.Hkv = 2;
      c.Nq = 150;
      c.Nk = 200;
      c.use_plan = true;
      c.density = density;
      c.plan_batch = 2;
      c.plan_heads = 4;
      c.rule.causal = causal;
      c.seed = 11 + uint64_t(density * 100);
      check_forward(c);
    }
}

TEST(CpuForward, PlanBroadcast) {
  // heads = 1, Hkv or Hq; batch = 1 (broadcast) or B.
  for (int64_t heads : {1, 2, 4})
    for (int64_t batch : {1, 2}) {
      Case c;
      c.B = 2;
      c.Hq = 4;
      c.Hkv = 2;
      c.Nq = c.Nk = 100;
      c.use_plan = true;
      c.density = 0.5;
      c.plan_heads = heads;
      c.plan_batch = batch;
      c.rule = MaskRule{false, 40, 10};
      c.seed = uint64_t(heads * 10 + batch);
      check_forward(c);
    }
}

TEST(CpuForward, PlanBlockSizes) {
  const std::pair<int, int> blocks[] = {{128, 64}, {16, 256}, {256, 16}, {64, 64}};
  for (auto [bq, bk] : blocks) {
    Case c;
    c.Nq = 300;
    c.Nk = 280;
    c.use_plan = true;
    c.density = 0.6;
    c.block_q = bq;
    c.block_k = bk;
    c.rule.causal = true;
    check_forward(c);
  }
}

TEST(CpuForward, EveryDtype) {
  for (DType t : {DType::float32, DType::bfloat16, DType::float16, DType::float64})
    for (bool plan : {false, true}) {
      Case c;
      c.dtype = t;
      c.Nq = 129;
      c.Nk = 77;
      c.rule.causal = true;
      c.use_plan = plan;
      c.density = 0.5;
      c.plan_heads = 2;
      check_forward(c);
    }
}

TEST(CpuForward, MemoryOrdersAndStrides) {
  for (DType t : {DType::float32, DType::bfloat16})
    for (Order order : {Order::bhnd, Order::bnhd})
      for (int64_t pad : {0, 5}) {
        Case c;
        c.B = 2;
        c.Hq = 4;
        c.Hkv = 2;
        c.Nq = 70;
        c.Nk = 90;
        c.dtype = t;
        c.order = order;
        c.pad = pad;
        check_forward(c);
      }
}

TEST(CpuForward, HeadDims) {
  const std::pair<int64_t, int64_t> dims[] = {{48, 80}, {80, 16}, {1, 1}, {33, 7},
                                              {128, 128}, {256, 64}, {512, 512}};
  for (auto [d, dv] : dims)
    for (DType t : {DType::float32, DType::bfloat16}) {
      Case c;
      c.Hq = c.Hkv = 1;
      c.Nq = 40;
      c.Nk = 50;
      c.D = d;
      c.Dv = dv;
      c.dtype = t;
      c.rule.causal = true;
      check_forward(c);
    }
}

TEST(CpuForward, EmptyInputs) {
  // Nk = 0: every row is empty; Nq = 0: nothing to write.
  for (auto [nq, nk] : {std::pair<int64_t, int64_t>{5, 0}, {0, 5}}) {
    Case c;
    c.Nq = nq;
    c.Nk = nk;
    check_forward(c);
  }
}

TEST(CpuForward, IndependentOfThreadCount) {
  Case c;
  c.B = 2;
  c.Hq = 4;
  c.Hkv = 2;
  c.Nq = c.Nk = 300;
  c.use_plan = true;
  c.density = 0.5;
  c.plan_heads = 4;
  c.threads = 1;
  const Problem p1 = make_problem(c);
  const ForwardOutputs a = run_forward(c, p1);
  c.threads = 2;
  const Problem p2 = make_problem(c);
  const ForwardOutputs b = run_forward(c, p2);
  EXPECT_EQ(reference::relative_error(a.out.view, b.out.view), 0.0);
  EXPECT_EQ(reference::relative_error(a.lse, b.lse), 0.0);
}

TEST(CpuForward, ExplicitScale) {
  Case c;
  c.Nq = c.Nk = 65;
  Problem p = make_problem(c);
  p.params.scale = 0.37;
  const ForwardOutputs got = run_forward(c, p);
  const auto ref = reference::forward(p.q.view, p.k.view, p.v.view, nullptr, p.params);
  EXPECT_LE(reference::relative_error(got.out.view, ref.out), 1e-5);
  EXPECT_LE(reference::relative_error(got.lse, ref.lse), 1e-5);
}

}  // namespace
}  // namespace spattn::testing
