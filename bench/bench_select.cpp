// Selector cost against the attention it serves (CPU): the hybrid Top-k/Top-p selection for
// B=1, H=8, N=32768, D=128 (bfloat16) next to the forward pass over a 5%-density plan.
// The bar: selection <= 5% of that forward, or the selector eats the sparsity's gain.
#include <benchmark/benchmark.h>

#include <chrono>

#include "spattn/attention.hpp"
#include "spattn/select.hpp"

namespace {

using namespace spattn;

constexpr int64_t kB = 1, kH = 8, kN = 32768, kD = 128;

struct Inputs {
  Tensor q, k, v;
};

const Inputs& inputs() {
  static const Inputs in = [] {
    Inputs r;
    r.q = Tensor::empty({kB, kH, kN, kD}, DType::bfloat16);
    r.k = Tensor::empty({kB, kH, kN, kD}, DType::bfloat16);
    r.v = Tensor::empty({kB, kH, kN, kD}, DType::bfloat16);
    fill_uniform(r.q, 1);
    fill_uniform(r.k, 2);
    fill_uniform(r.v, 3);
    return r;
  }();
  return in;
}

HybridOptions options(double top_k, double top_p) {
  HybridOptions o;  // blocks 128 x 64, as in SpargeAttention2
  o.top_k = {top_k};
  o.top_p = {top_p};
  return o;
}

// Top-k only at 5%: the plan the forward below runs.
void BM_SelectTopK5(benchmark::State& state) {
  const Inputs& in = inputs();
  const HybridOptions o = options(0.05, 0.0);
  double density = 0;
  for (auto _ : state) {
    BlockPlan plan = select_hybrid(in.q, in.k, o);
    density = plan.density();
    benchmark::DoNotOptimize(plan);
  }
  state.counters["density"] = density;
}

// The paper's setting (k = 3%, p = 20%): Top-p needs the whole ranked row.
void BM_SelectHybrid(benchmark::State& state) {
  const Inputs& in = inputs();
  const HybridOptions o = options(0.03, 0.20);
  for (auto _ : state) benchmark::DoNotOptimize(select_hybrid(in.q, in.k, o));
}

// Selection and the 5%-density forward it serves, timed in the same iteration.
void BM_SelectVsSparseForward5(benchmark::State& state) {
  const Inputs& in = inputs();
  const HybridOptions o = options(0.05, 0.0);
  double select_s = 0, forward_s = 0, density = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    BlockPlan plan = select_hybrid(in.q, in.k, o);
    const auto t1 = std::chrono::steady_clock::now();
    ForwardResult r = forward(in.q, in.k, in.v, &plan);
    const auto t2 = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(r);
    select_s += std::chrono::duration<double>(t1 - t0).count();
    forward_s += std::chrono::duration<double>(t2 - t1).count();
    density = plan.density();
  }
  state.counters["select_ms"] = 1e3 * select_s / double(state.iterations());
  state.counters["forward_ms"] = 1e3 * forward_s / double(state.iterations());
  state.counters["select_share"] = select_s / forward_s;
  state.counters["density"] = density;
}

}  // namespace

BENCHMARK(BM_SelectTopK5)->Unit(benchmark::kMillisecond)->MinTime(2.0)->UseRealTime();
BENCHMARK(BM_SelectHybrid)->Unit(benchmark::kMillisecond)->MinTime(2.0)->UseRealTime();
BENCHMARK(BM_SelectVsSparseForward5)->Unit(benchmark::kMillisecond)->Iterations(3)->UseRealTime();

BENCHMARK_MAIN();
