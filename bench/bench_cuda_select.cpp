// Times the GPU hybrid selector (select_hybrid_into on CUDA tensors) with CUDA events, beside the
// sparse forward it feeds: the forward with the selector's own plan and with a random plan of
// 5% density (bench_cuda's mask). Prints a Markdown table and one JSON line per shape.
//
//   bench_cuda_select [--seq 32768] [--heads 12] [--dim 128] [--iters 50] [--top-k 0.03]
//                     [--top-p 0.20] [--causal 0|1|both] [--seed 1]
//
// The pooling stage alone is timed too (select stage = all − pool), and a device-to-device copy
// of q and k gives the bandwidth floor for reading them once.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cuda/select/select_cuda.hpp"
#include "cuda_bench_util.hpp"
#include "spattn/attention.hpp"
#include "spattn/error.hpp"
#include "spattn/select.hpp"

namespace {

// Smooth positional structure plus noise (bf16): rows are peaked as in real attention maps, so
// Top-p keeps few blocks; pure noise would make every row flat.
void fill_structured(void* device, int64_t H, int64_t N, int64_t D, uint64_t seed) {
  std::vector<uint16_t> host(size_t(H * N * D));
  for (int64_t h = 0; h < H; ++h)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t d = 0; d < D; ++d) {
        const size_t i = size_t((h * N + n) * D + d);
        const float noise = float(splitmix64(i ^ (seed << 40)) >> 40) * (2.0f / 16777216.0f) - 1.0f;
        const float pos = std::sin(0.002f * float(n) * float(1 + d % 7) + float(d));
        host[i] = spattn::to_bfloat16(0.5f * noise + pos).bits;
      }
  check(cudaMemcpy(device, host.data(), host.size() * 2, cudaMemcpyHostToDevice), "input copy");
}

}  // namespace

int main(int argc, char** argv) {
  using namespace spattn;
  int64_t N = 32768, H = 12, D = 128;
  int iters = 50;
  double top_k = 0.03, top_p = 0.20;
  uint64_t seed = 1;
  std::string causal_arg = "both";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--seq") N = std::stoll(v);
    else if (a == "--heads") H = std::stoll(v);
    else if (a == "--dim") D = std::stoll(v);
    else if (a == "--iters") iters = std::stoi(v);
    else if (a == "--top-k") top_k = std::stod(v);
    else if (a == "--top-p") top_p = std::stod(v);
    else if (a == "--seed") seed = std::stoull(v);
    else if (a == "--causal") causal_arg = v;
    else {
      std::fprintf(stderr, "bench_cuda_select: unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  if (!cuda_backend_available()) {
    std::fprintf(stderr, "bench_cuda_select: no CUDA device\n");
    return 2;
  }
  cudaDeviceProp prop;
  check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  const Device dev{DeviceKind::cuda, 0};
  const int64_t n = H * N * D;
  Buf q(n * 2), k(n * 2), v(n * 2), o(n * 2), lse(H * N * 4), copy_dst(2 * n * 2);
  fill_structured(q.p, H, N, D, seed);
  fill_structured(k.p, H, N, D, seed + 1);
  fill_structured(v.p, H, N, D, seed + 2);
  auto ref4 = [&](void* p) { return make_ref(p, DType::bfloat16, {1, H, N, D}, {}, dev); };
  const TensorRef tq = ref4(q.p), tk = ref4(k.p), tv = ref4(v.p), to = ref4(o.p);
  const TensorRef tl = make_ref(lse.p, DType::float32, {1, H, N}, {}, dev);

  cudaEvent_t e0, e1;
  check(cudaEventCreate(&e0), "cudaEventCreate");
  check(cudaEventCreate(&e1), "cudaEventCreate");
  auto time_it = [&](auto&& fn) {
    std::vector<float> ms;
    for (int it = 0; it < iters + 3; ++it) {
      check(cudaEventRecord(e0), "cudaEventRecord");
      fn();
      check(cudaEventRecord(e1), "cudaEventRecord");
      check(cudaEventSynchronize(e1), "cudaEventSynchronize");
      float t = 0;
      check(cudaEventElapsedTime(&t, e0, e1), "cudaEventElapsedTime");
      if (it >= 3) ms.push_back(t);
    }
    check(cudaGetLastError(), "kernels");
    return median(ms);
  };

  // Floor: reading q and k once (a copy of both reads and writes them: count both).
  const float copy_ms = time_it([&] {
    check(cudaMemcpyAsync(copy_dst.p, q.p, size_t(n) * 2, cudaMemcpyDeviceToDevice), "copy");
    check(cudaMemcpyAsync(static_cast<char*>(copy_dst.p) + n * 2, k.p, size_t(n) * 2,
                          cudaMemcpyDeviceToDevice),
          "copy");
  });
  const double copy_tbs = 4.0 * double(n) * 2 / (copy_ms * 1e-3) / 1e12;
  const double floor_us = 2.0 * double(n) * 2 / (copy_tbs * 1e12) * 1e6;

  std::vector<bool> causals;
  if (causal_arg == "0" || causal_arg == "both") causals.push_back(false);
  if (causal_arg == "1" || causal_arg == "both") causals.push_back(true);
  std::printf("GPU: %s; B=1, H=%lld, N=%lld, D=%lld, bf16, k=%.3f p=%.3f; copy %.2f TB/s -> "
              "reading q and k once takes %.1f us\n\n",
              prop.name, (long long)H, (long long)N, (long long)D, top_k, top_p, copy_tbs, floor_us);
  std::printf("| causal | selector us | pool us | select us | plan density | fwd (own plan) ms | "
              "fwd (5%% random) ms | selector / fwd 5%% |\n|---|---|---|---|---|---|---|---|\n");
  for (bool causal : causals) {
    HybridOptions opt;
    opt.top_k = {top_k};
    opt.top_p = {top_p};
    opt.rule.causal = causal;
    AttentionParams params;
    params.mask = opt.rule;
    const PlanGeometry geo = hybrid_geometry(tq, tk, opt);
    const int64_t rows = geo.num_rows(), cap = geo.num_k_blocks();
    Buf idx(rows * cap * 4), nf(rows * 4), np(rows * 4);
    PlanBuffers out{geo, cap, static_cast<int32_t*>(idx.p), static_cast<int32_t*>(nf.p),
                    static_cast<int32_t*>(np.p), dev};
    const float sel_ms = time_it([&] { select_hybrid_into(tq, tk, opt, out); });
    const float pool_ms = time_it([&] { cuda::select_hybrid(tq, tk, opt, out, nullptr, cuda::kStagePool); });
    // The selector's plan (valid: the last call ran every stage... re-run to be sure).
    select_hybrid_into(tq, tk, opt, out);
    check(cudaDeviceSynchronize(), "select");
    std::vector<int32_t> hnf(static_cast<size_t>(rows)), hnp(static_cast<size_t>(rows));
    check(cudaMemcpy(hnf.data(), nf.p, rows * 4, cudaMemcpyDeviceToHost), "read plan");
    check(cudaMemcpy(hnp.data(), np.p, rows * 4, cudaMemcpyDeviceToHost), "read plan");
    int64_t tiles = 0;
    for (int64_t r = 0; r < rows; ++r) tiles += hnf[size_t(r)] + hnp[size_t(r)];
    const double density = double(tiles) / double(rows * cap);
    const PlanView own = out.view();
    const float fwd_own = time_it([&] { forward(tq, tk, tv, &own, params, to, tl); });

    // bench_cuda's random 5% mask.
    std::vector<uint8_t> mask(size_t(rows * cap));
    for (size_t i = 0; i < mask.size(); ++i)
      mask[i] = double(splitmix64(i + seed * 0x1000000000ull) >> 11) * 0x1.0p-53 < 0.05;
    const BlockPlan rnd = BlockPlan::from_block_mask(geo, mask);
    Buf ridx(rows * cap * 4), rnf(rows * 4), rnp(rows * 4);
    PlanBuffers rout{geo, cap, static_cast<int32_t*>(ridx.p), static_cast<int32_t*>(rnf.p),
                     static_cast<int32_t*>(rnp.p), dev};
    copy_plan_to(rnd, rout);
    check(cudaDeviceSynchronize(), "plan copy");
    const PlanView rv = rout.view();
    const float fwd_rnd = time_it([&] { forward(tq, tk, tv, &rv, params, to, tl); });

    std::printf("| %d | %.1f | %.1f | %.1f | %.4f | %.3f | %.3f (density %.4f) | %.1f%% |\n",
                int(causal), sel_ms * 1e3, pool_ms * 1e3, (sel_ms - pool_ms) * 1e3, density,
                fwd_own, fwd_rnd, rnd.density(), 100.0 * sel_ms / fwd_rnd);
    std::fflush(stdout);
    std::fprintf(stderr,
                 "{\"bench\": \"select\", \"gpu\": \"%s\", \"causal\": %d, \"select_us\": %.2f, "
                 "\"pool_us\": %.2f, \"density\": %.5f, \"fwd_own_ms\": %.4f, \"fwd_5pct_ms\": %.4f, "
                 "\"floor_us\": %.2f}\n",
                 prop.name, int(causal), sel_ms * 1e3, pool_ms * 1e3, density, fwd_own, fwd_rnd,
                 floor_us);
  }
  return 0;
}
