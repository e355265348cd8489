// Shared by the attention tests: random problems (shapes, dtypes, memory orders, masks, plans)
// and the tolerance rule against the float64 reference.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "spattn/attention.hpp"
#include "spattn/reference.hpp"

namespace spattn::testing {

enum class Order { bhnd, bnhd };

struct Case {
  int64_t B = 1, Hq = 2, Hkv = 1, Nq = 64, Nk = 64, D = 32, Dv = 32;
  DType dtype = DType::float32;
  Order order = Order::bhnd;
  MaskRule rule{};
  bool use_plan = false;
  double density = 1.0;
  int64_t plan_batch = 1, plan_heads = 1;
  int block_q = 32, block_k = 16;
  int64_t pad = 0;  // extra elements after each row of D: a non-contiguous view
  uint64_t seed = 1;
  int threads = 0;

  std::string describe() const {
    std::ostringstream s;
    s << "B=" << B << " Hq=" << Hq << " Hkv=" << Hkv << " Nq=" << Nq << " Nk=" << Nk
      << " D=" << D << " Dv=" << Dv << " " << dtype_name(dtype)
      << (order == Order::bnhd ? " BNHD" : " BHND") << " rule=" << rule.to_string();
    if (use_plan)
      s << " plan(density=" << density << ", batch=" << plan_batch << ", heads=" << plan_heads
        << ", " << block_q << "x" << block_k << ")";
    if (pad) s << " pad=" << pad;
    return s.str();
  }
};

// A (B, H, N, D) buffer in the case's memory order, with `pad` unused elements after each row.
struct Buffer4 {
  Tensor storage;
  TensorRef view;
};

inline Buffer4 make_buffer(int64_t B, int64_t H, int64_t N, int64_t D, DType dtype, Order order,
                           int64_t pad) {
  Buffer4 buf;
  const int64_t row = D + pad;
  if (order == Order::bhnd) {
    buf.storage = Tensor::zeros({B, H, N, row}, dtype);
    buf.view = make_ref(buf.storage.ref().data, dtype, {B, H, N, D},
                        {H * N * row, N * row, row, 1});
  } else {
    buf.storage = Tensor::zeros({B, N, H, row}, dtype);
    buf.view = make_ref(buf.storage.ref().data, dtype, {B, H, N, D},
                        {N * H * row, row, H * row, 1});
  }
  return buf;
}

inline Buffer4 random_buffer(int64_t B, int64_t H, int64_t N, int64_t D, DType dtype,
                             Order order, int64_t pad, uint64_t seed) {
  Buffer4 buf = make_buffer(B, H, N, D, dtype, order, pad);
  fill_uniform(buf.view, seed);
  return buf;
}

inline BlockPlan random_plan(const Case& c) {
  PlanGeometry geo{c.plan_batch, c.plan_heads, c.Nq, c.Nk, c.block_q, c.block_k, c.rule};
  std::mt19937_64 rng(c.seed * 7919 + 13);
  std::bernoulli_distribution keep(c.density);
  std::vector<uint8_t> mask(size_t(geo.num_rows() * geo.num_k_blocks()));
  for (auto& m : mask) m = keep(rng) ? 1 : 0;
  return BlockPlan::from_block_mask(geo, mask);
}

struct Problem {
  Buffer4 q, k, v;
  std::optional<BlockPlan> plan;
  PlanView plan_view;
  AttentionParams params;

  const BlockPlan* plan_ptr() const { return plan ? &*plan : nullptr; }
  const PlanView* view_ptr() const { return plan ? &plan_view : nullptr; }
};

inline Problem make_problem(const Case& c) {
  Problem p;
  p.q = random_buffer(c.B, c.Hq, c.Nq, c.D, c.dtype, c.order, c.pad, c.seed);
  p.k = random_buffer(c.B, c.Hkv, c.Nk, c.D, c.dtype, c.order, c.pad, c.seed + 1);
  p.v = random_buffer(c.B, c.Hkv, c.Nk, c.Dv, c.dtype, c.order, c.pad, c.seed + 2);
  if (c.use_plan) {
    p.plan = random_plan(c);
    p.plan_view = p.plan->view();
  }
  p.params.mask = c.rule;
  p.params.num_threads = c.threads;
  return p;
}

// The floor under every tolerance, for cases where the naive run happens to be exact (one key
// per row, all-empty plans): a few unit roundoffs of the stored dtype.
inline double error_floor(DType t) {
  switch (t) {
    case DType::float32: return 0x1p-22;
    case DType::bfloat16: return 0x1p-8;
    case DType::float16: return 0x1p-11;
    case DType::float64: return 1e-13;
  }
  return 0;
}

// The naive run computes in float32, so for float64 inputs only the floor applies.
inline double tolerance(DType t, double factor, double naive_error) {
  return (t == DType::float64 ? 0.0 : factor * naive_error) + error_floor(t);
}

// True when any element is NaN.
inline bool has_nan(const TensorRef& t) {
  bool nan = false;
  const int64_t n = t.numel();
  std::array<int64_t, kMaxRank> idx{};
  for (int64_t e = 0; e < n; ++e) {
    int64_t off = 0;
    for (int d = 0; d < t.rank; ++d) off += idx[d] * t.stride[d];
    nan = nan || std::isnan(load_element(t, off));
    for (int d = t.rank - 1; d >= 0 && ++idx[d] == t.shape[d]; --d) idx[d] = 0;
  }
  return nan;
}

}  // namespace spattn::testing
