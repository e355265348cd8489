// CPU engine throughput on one shape (default B=1, H=8, N=8192, D=64): dense and 5%-density
// block-sparse (random plan, 128×64 tiles), forward and forward + backward, float32 and bfloat16.
//
// FLOPs: 4·N²·D·H per forward, 2.5× that for forward + backward (the usual FlashAttention
// count). "GFLOP/s" is the dense-equivalent count over time for dense runs and the count of the
// tiles actually listed for sparse runs; "dense_ms" and "speedup" compare each sparse run with the
// dense run of the same dtype and pass measured earlier in the same process.
//
//   build/bench/bench_attention [--benchmark_filter=...]   (SPATTN_BENCH_N=4096 shrinks N)
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <map>
#include <random>
#include <string>

#include "spattn/attention.hpp"

namespace {

using namespace spattn;

constexpr int64_t kBatch = 1, kHeads = 8, kDim = 64;
constexpr int kThreads = 2;

int64_t seq_len() {
  const char* env = std::getenv("SPATTN_BENCH_N");
  return env ? std::atoll(env) : 8192;
}

BlockPlan random_plan(int64_t n, double density, uint64_t seed) {
  PlanGeometry geo{1, kHeads, n, n, 128, 64, MaskRule{}};
  std::mt19937_64 rng(seed);
  std::bernoulli_distribution keep(density);
  std::vector<uint8_t> mask(size_t(geo.num_rows() * geo.num_k_blocks()));
  for (auto& m : mask) m = keep(rng);
  return BlockPlan::from_block_mask(geo, mask);
}

std::map<std::string, double>& dense_seconds() {
  static std::map<std::string, double> m;
  return m;
}

// state.range(0): dtype; range(1): density in percent (100 = dense, no plan); range(2): 1 = with
// backward.
void BM_Attention(benchmark::State& state) {
  const DType dtype = DType(state.range(0));
  const int64_t percent = state.range(1);
  const bool with_backward = state.range(2) != 0;
  const int64_t n = seq_len();
  const std::vector<int64_t> shape{kBatch, kHeads, n, kDim};
  Tensor q = Tensor::empty(shape, dtype), k = Tensor::empty(shape, dtype),
         v = Tensor::empty(shape, dtype), dout = Tensor::empty(shape, dtype);
  fill_uniform(q, 1);
  fill_uniform(k, 2);
  fill_uniform(v, 3);
  fill_uniform(dout, 4);
  Tensor out = Tensor::empty(shape, dtype);
  Tensor lse = Tensor::empty({kBatch, kHeads, n}, DType::float32);
  Tensor dq = Tensor::empty(shape, dtype), dk = Tensor::empty(shape, dtype),
         dv = Tensor::empty(shape, dtype);
  BlockPlan plan;
  PlanView view;
  const PlanView* plan_ptr = nullptr;
  double density = 1.0;
  if (percent < 100) {
    plan = random_plan(n, percent / 100.0, 7);
    view = plan.view();
    plan_ptr = &view;
    density = plan.density();
  }
  AttentionParams params;
  params.num_threads = kThreads;

  double elapsed = 0.0;
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    forward(q, k, v, plan_ptr, params, out, lse);
    if (with_backward) backward(q, k, v, out, lse, dout, plan_ptr, params, dq, dk, dv);
    elapsed += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  const double per_iter = elapsed / double(std::max<int64_t>(state.iterations(), 1));

  const double flops = 4.0 * double(n) * double(n) * kDim * kHeads * kBatch *
                       (with_backward ? 2.5 : 1.0) * density;
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["density"] = density;
  const std::string key = std::string(dtype_name(dtype)) + (with_backward ? " fwd+bwd" : " fwd");
  state.SetLabel(key + (percent < 100 ? " sparse" : " dense"));
  if (percent >= 100) {
    dense_seconds()[key] = per_iter;
  } else if (dense_seconds().count(key)) {
    state.counters["dense_ms"] = dense_seconds()[key] * 1e3;
    state.counters["speedup"] = dense_seconds()[key] / per_iter;
  }
}

void args(benchmark::internal::Benchmark* b) {
  for (int backward : {0, 1})
    for (DType t : {DType::float32, DType::bfloat16})
      for (int percent : {100, 5}) b->Args({int64_t(t), percent, backward});
}

}  // namespace

BENCHMARK(BM_Attention)
    ->Apply(args)
    ->ArgNames({"dtype", "percent", "bwd"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(2.0);

BENCHMARK_MAIN();
