// The CPU engine on a representative problem: B=1, H=8, N=4096, D=64, bfloat16, with inputs
// whose attention is concentrated the way trained DiT attention is (tokens attend mostly to
// tokens of the same spatial neighbourhood). Dense attention against block-sparse plans chosen by
// the hybrid Top-k ∪ Top-p selector at a few budgets: time, density, speed-up and the error of
// the output against the dense output.
//
//   build/bench/spattn_demo [N]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include <omp.h>

#include "spattn/attention.hpp"
#include "spattn/reference.hpp"
#include "spattn/select.hpp"

namespace {

using namespace spattn;

// q and k: a shared per-neighbourhood direction plus noise, so q_i·k_j is large when i and j
// share a neighbourhood (256 tokens; 1 key in 50 belongs to a random other neighbourhood).
void fill_structured(Tensor& q, Tensor& k, Tensor& v, uint64_t seed) {
  const int64_t H = q.size(1), N = q.size(2), D = q.size(3);
  const int64_t groups = std::max<int64_t>(N / 256, 1);
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_int_distribution<int64_t> any_group(0, groups - 1);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (int64_t h = 0; h < H; ++h) {
    std::vector<double> centre(size_t(groups * D));
    for (double& c : centre) c = normal(rng);
    for (int64_t i = 0; i < N; ++i) {
      const int64_t gq = std::min(i / 256, groups - 1);
      const int64_t gk = unit(rng) < 0.98 ? std::min(i / 256, groups - 1) : any_group(rng);
      for (int64_t d = 0; d < D; ++d) {
        q.set({0, h, i, d}, centre[size_t(gq * D + d)] + 0.3 * normal(rng));
        k.set({0, h, i, d}, centre[size_t(gk * D + d)] + 0.3 * normal(rng));
        v.set({0, h, i, d}, normal(rng));
      }
    }
  }
}

// Median wall time of `reps` calls, after one warm-up.
template <class Fn>
double median_ms(Fn&& fn, int reps) {
  fn();
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                    .count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t N = argc > 1 ? std::atoll(argv[1]) : 4096;
  const int64_t B = 1, H = 8, D = 64;
  const DType dtype = DType::bfloat16;
  Tensor q = Tensor::empty({B, H, N, D}, dtype), k = Tensor::empty({B, H, N, D}, dtype),
         v = Tensor::empty({B, H, N, D}, dtype);
  fill_structured(q, k, v, 42);
  Tensor out = Tensor::empty({B, H, N, D}, dtype), lse = Tensor::empty({B, H, N}, DType::float32);
  AttentionParams params;

  std::printf("spattn CPU engine: B=%lld H=%lld N=%lld D=%lld %s, %d threads\n", (long long)B,
              (long long)H, (long long)N, (long long)D, dtype_name(dtype), omp_get_max_threads());

  const double dense_ms = median_ms([&] { forward(q, k, v, nullptr, params, out, lse); }, 3);
  Tensor dense_out = Tensor::empty({B, H, N, D}, dtype);
  forward(q, k, v, nullptr, params, dense_out, lse);

  std::printf("\n%-28s %9s %10s %9s %14s\n", "plan", "density", "fwd ms", "speed-up",
              "error vs dense");
  std::printf("%-28s %9.3f %10.1f %9.2f %14s\n", "dense", 1.0, dense_ms, 1.0, "-");
  {
    const BlockPlan all = BlockPlan::dense(PlanGeometry{1, 1, N, N, 128, 64, MaskRule{}});
    const PlanView view = all.view();
    const double ms = median_ms([&] { forward(q, k, v, &view, params, out, lse); }, 3);
    std::printf("%-28s %9.3f %10.1f %9.2f %14.4f\n", "plan listing every tile", all.density(), ms,
                dense_ms / ms, reference::relative_error(out, dense_out));
  }
  struct Budget {
    double top_k, top_p;
  };
  for (const Budget& budget : {Budget{0.25, 0.0}, Budget{0.10, 0.50}, Budget{0.05, 0.30},
                               Budget{0.03, 0.20}}) {
    HybridOptions opt;
    opt.top_k = {budget.top_k};
    opt.top_p = {budget.top_p};
    const BlockPlan plan = select_hybrid(q, k, opt);
    const PlanView view = plan.view();
    const double ms = median_ms([&] { forward(q, k, v, &view, params, out, lse); }, 3);
    char name[64];
    std::snprintf(name, sizeof name, "hybrid top-k %.0f%% top-p %.0f%%", budget.top_k * 100,
                  budget.top_p * 100);
    std::printf("%-28s %9.3f %10.1f %9.2f %14.4f\n", name, plan.density(), ms, dense_ms / ms,
                reference::relative_error(out, dense_out));
  }
  std::printf("\nerror: max |out - dense out| / max |dense out| over all elements.\n");
  return 0;
}
