// CPU backward: gradients against the float64 reference over the same shape families as the
// forward, the reference and the CPU float64 backward against central finite differences, zero
// gradients for empty rows, and independence from the thread count.
//
// Tolerance: error vs float64 <= kFactor × (error of the naive same-precision run,
// reference::backward(..., Compute::float32), vs float64) + a floor (float64 inputs: the floor
// alone). kFactor = 4, one more than the forward's 3: the kernel recomputes P from its own
// rounded lse and takes delta = rowsum(dO ∘ O) from the stored (rounded) output where the naive
// run uses its exact softmax, each worth about one naive error. The naive backward accumulates
// dq, dk and dv in double, so for float32 its error hides the accumulation a float32 kernel
// must do; the float32 floor therefore grows like a random walk of rounding errors,
// error_floor × sqrt(terms summed), terms = max(Nk, Nq × group size).
#include <cstdio>
#include <cstdlib>
#include <functional>

#include "test_attention_util.hpp"

namespace spattn::testing {
namespace {

constexpr double kFactor = 4.0;

double grad_floor(const Case& c) {
  if (c.dtype != DType::float32) return error_floor(c.dtype);
  const double terms = double(std::max(c.Nk, c.Nq * (c.Hq / c.Hkv)));
  return error_floor(c.dtype) * std::sqrt(std::max(terms, 1.0));
}

struct Grads {
  Buffer4 out, dout, dq, dk, dv;
  Tensor lse;
};

Grads run_backward(const Case& c, const Problem& p) {
  Grads g;
  g.out = make_buffer(c.B, c.Hq, c.Nq, c.Dv, c.dtype, c.order, c.pad);
  g.lse = Tensor::empty({c.B, c.Hq, c.Nq},
                        c.dtype == DType::float64 ? DType::float64 : DType::float32);
  forward(p.q.view, p.k.view, p.v.view, p.view_ptr(), p.params, g.out.view, g.lse);
  g.dout = random_buffer(c.B, c.Hq, c.Nq, c.Dv, c.dtype, c.order, c.pad, c.seed + 3);
  g.dq = make_buffer(c.B, c.Hq, c.Nq, c.D, c.dtype, c.order, c.pad);
  g.dk = make_buffer(c.B, c.Hkv, c.Nk, c.D, c.dtype, c.order, c.pad);
  g.dv = make_buffer(c.B, c.Hkv, c.Nk, c.Dv, c.dtype, c.order, c.pad);
  for (const Buffer4* b : {&g.dq, &g.dk, &g.dv}) fill_value(b->view, std::nan(""));  // poison
  backward(p.q.view, p.k.view, p.v.view, g.out.view, g.lse, g.dout.view, p.view_ptr(), p.params,
           g.dq.view, g.dk.view, g.dv.view);
  return g;
}

void check_backward(const Case& c) {
  SCOPED_TRACE(c.describe());
  const Problem p = make_problem(c);
  const Grads got = run_backward(c, p);
  const auto ref = reference::backward(p.q.view, p.k.view, p.v.view, got.dout.view, p.plan_ptr(),
                                       p.params, reference::Compute::float64);
  const auto naive = reference::backward(p.q.view, p.k.view, p.v.view, got.dout.view,
                                         p.plan_ptr(), p.params, reference::Compute::float32);
  const std::tuple<const char*, const TensorRef*, const Tensor*, const Tensor*> parts[] = {
      {"dq", &got.dq.view, &ref.dq, &naive.dq},
      {"dk", &got.dk.view, &ref.dk, &naive.dk},
      {"dv", &got.dv.view, &ref.dv, &naive.dv}};
  for (const auto& [name, mine, exact, base] : parts) {
    ASSERT_FALSE(has_nan(*mine)) << name;
    const double err = reference::relative_error(*mine, *exact);
    const double base_err = reference::relative_error(*base, *exact);
    if (std::getenv("SPATTN_TEST_VERBOSE"))
      std::printf("%s %s %.3g (naive %.3g)\n", c.describe().c_str(), name, err, base_err);
    const double tol = (c.dtype == DType::float64 ? 0.0 : kFactor * base_err) + grad_floor(c);
    EXPECT_LE(err, tol) << name;
  }
  // Queries that see no key get exactly zero dq.
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.Hq; ++h)
      for (int64_t i = 0; i < c.Nq; ++i) {
        if (!std::isinf(got.lse.get({b, h, i}))) continue;
        for (int64_t d = 0; d < c.D; ++d)
          ASSERT_EQ(load_element(got.dq.view, offset_of(got.dq.view, {b, h, i, d})), 0.0);
      }
}

TEST(CpuBackward, SequenceLengths) {
  for (int64_t n : {1, 17, 128, 129})
    for (bool causal : {false, true}) {
      Case c;
      c.Nq = c.Nk = n;
      c.rule.causal = causal;
      check_backward(c);
    }
}

TEST(CpuBackward, LongSequence) {
  Case c;
  c.Hq = c.Hkv = 1;
  c.Nq = c.Nk = 1000;
  c.D = c.Dv = 16;
  c.rule.causal = true;
  check_backward(c);
}

TEST(CpuBackward, UnequalLengths) {
  const std::pair<int64_t, int64_t> lengths[] = {{17, 129}, {129, 17}, {100, 300}};
  for (auto [nq, nk] : lengths)
    for (bool causal : {false, true}) {
      Case c;
      c.Nq = nq;
      c.Nk = nk;
      c.rule.causal = causal;
      check_backward(c);
    }
}

TEST(CpuBackward, GroupedQueryHeads) {
  for (int64_t group : {1, 2, 8}) {
    Case c;
    c.B = 2;
    c.Hkv = 2;
    c.Hq = 2 * group;
    c.Nq = 40;
    c.Nk = 70;
    c.rule.causal = group != 2;
    check_backward(c);
  }
}

TEST(CpuBackward, WindowRules) {
  for (const MaskRule& rule : {MaskRule{false, 16, 16}, MaskRule{true, 24, -1},
                               MaskRule{false, 0, 0}}) {
    Case c;
    c.Nq = 90;
    c.Nk = 130;
    c.rule = rule;
    check_backward(c);
  }
}

TEST(CpuBackward, RandomPlans) {
  for (double density : {0.0, 0.05, 0.5, 1.0})
    for (bool causal : {false, true}) {
      Case c;
      c.B = 2;
      c.Hq = 4;
      c.Hkv = 2;
      c.Nq = 150;
      c.Nk = 120;
      c.use_plan = true;
      c.density = density;
      c.plan_batch = 2;
      c.plan_heads = 4;
      c.rule.causal = causal;
      c.seed = 21 + uint64_t(density * 100);
      check_backward(c);
    }
}

TEST(CpuBackward, PlanBroadcast) {
  for (int64_t heads : {1, 2, 4})
    for (int64_t batch : {1, 2}) {
      Case c;
      c.B = 2;
      c.Hq = 4;
      c.Hkv = 2;
      c.Nq = c.Nk = 80;
      c.use_plan = true;
      c.density = 0.5;
      c.plan_heads = heads;
      c.plan_batch = batch;
      c.rule = MaskRule{true, 30, -1};
      c.seed = uint64_t(heads * 10 + batch);
      check_backward(c);
    }
}

TEST(CpuBackward, EveryDtypeOrderAndHeadDims) {
  for (DType t : {DType::float32, DType::bfloat16, DType::float16, DType::float64})
    for (Order order : {Order::bhnd, Order::bnhd}) {
      Case c;
      c.dtype = t;
      c.order = order;
      c.Hq = 4;
      c.Hkv = 2;
      c.Nq = 70;
      c.Nk = 50;
      c.D = 24;
      c.Dv = 40;
      c.pad = order == Order::bnhd ? 3 : 0;
      c.rule.causal = true;
      c.use_plan = true;
      c.density = 0.7;
      c.plan_heads = 2;
      check_backward(c);
    }
}

TEST(CpuBackward, LargeHeadDims) {
  for (auto [d, dv] : {std::pair<int64_t, int64_t>{256, 128}, {1, 3}, {512, 512}}) {
    Case c;
    c.Hq = c.Hkv = 1;
    c.Nq = 33;
    c.Nk = 45;
    c.D = d;
    c.Dv = dv;
    check_backward(c);
  }
}

TEST(CpuBackward, IndependentOfThreadCount) {
  Case c;
  c.B = 2;
  c.Hq = 4;
  c.Hkv = 1;
  c.Nq = c.Nk = 200;
  c.rule.causal = true;
  c.threads = 1;
  const Grads a = run_backward(c, make_problem(c));
  c.threads = 2;
  const Grads b = run_backward(c, make_problem(c));
  EXPECT_EQ(reference::relative_error(a.dq.view, b.dq.view), 0.0);
  EXPECT_EQ(reference::relative_error(a.dk.view, b.dk.view), 0.0);
  EXPECT_EQ(reference::relative_error(a.dv.view, b.dv.view), 0.0);
}

// Central finite differences of L = sum(out ∘ W) in float64: the derivative of L along each
// input element is the gradient that backward(dout = W) returns.
void check_finite_differences(const Case& c) {
  SCOPED_TRACE(c.describe());
  Problem p = make_problem(c);
  const Grads got = run_backward(c, p);
  const auto ref = reference::backward(p.q.view, p.k.view, p.v.view, got.dout.view, p.plan_ptr(),
                                       p.params, reference::Compute::float64);
  auto loss = [&]() {
    const ForwardResult r = forward(p.q.view, p.k.view, p.v.view, p.plan_ptr(), p.params);
    double sum = 0.0;
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t h = 0; h < c.Hq; ++h)
        for (int64_t i = 0; i < c.Nq; ++i)
          for (int64_t d = 0; d < c.Dv; ++d)
            sum += r.out.get({b, h, i, d}) *
                   load_element(got.dout.view, offset_of(got.dout.view, {b, h, i, d}));
    return sum;
  };
  const double h = 1e-6;
  const std::tuple<const char*, const TensorRef*, const TensorRef*, const Tensor*> inputs[] = {
      {"q", &p.q.view, &got.dq.view, &ref.dq},
      {"k", &p.k.view, &got.dk.view, &ref.dk},
      {"v", &p.v.view, &got.dv.view, &ref.dv}};
  for (const auto& [name, x, mine, exact] : inputs) {
    const TensorRef& t = *x;
    for (int64_t b = 0; b < t.shape[0]; ++b)
      for (int64_t hh = 0; hh < t.shape[1]; ++hh)
        for (int64_t n = 0; n < t.shape[2]; ++n)
          for (int64_t d = 0; d < t.shape[3]; ++d) {
            const int64_t off = offset_of(t, {b, hh, n, d});
            const double x0 = load_element(t, off);
            store_element(t, off, x0 + h);
            const double up = loss();
            store_element(t, off, x0 - h);
            const double down = loss();
            store_element(t, off, x0);
            const double fd = (up - down) / (2 * h);
            const double g_cpu = load_element(*mine, offset_of(*mine, {b, hh, n, d}));
            const double g_ref = exact->get({b, hh, n, d});
            ASSERT_NEAR(g_cpu, fd, 1e-7 + 1e-6 * std::abs(fd))
                << "cpu d" << name << " at (" << b << ", " << hh << ", " << n << ", " << d << ")";
            ASSERT_NEAR(g_ref, fd, 1e-7 + 1e-6 * std::abs(fd))
                << "reference d" << name << " at (" << b << ", " << hh << ", " << n << ", " << d
                << ")";
          }
  }
}

TEST(CpuBackward, FiniteDifferencesDense) {
  Case c;
  c.dtype = DType::float64;
  c.Hq = 2;
  c.Hkv = 1;
  c.Nq = 6;
  c.Nk = 9;
  c.D = 3;
  c.Dv = 4;
  c.rule.causal = true;
  check_finite_differences(c);
}

TEST(CpuBackward, FiniteDifferencesPlan) {
  Case c;
  c.dtype = DType::float64;
  c.Hq = 2;
  c.Hkv = 2;
  c.Nq = 35;
  c.Nk = 40;
  c.D = 2;
  c.Dv = 3;
  c.use_plan = true;
  c.density = 0.6;
  c.plan_heads = 2;
  c.block_q = 16;
  c.block_k = 16;
  c.rule = MaskRule{false, 20, 3};
  check_finite_differences(c);
}

}  // namespace
}  // namespace spattn::testing
