// Times spattn's CUDA forward and forward+backward with CUDA events on one shape, dense and
// with random block plans, and prints one JSON object per measurement (bench_cuda.py merges
// them with the PyTorch peers into one table).
//
//   bench_cuda [--seq 32768] [--heads 12] [--dim 128] [--iters 20] [--densities 0.15,0.10,0.05]
//              [--block-q 128] [--block-k 64] [--causal 0|1|both] [--seed 1] [--dense 1|0]
//              [--cooldown 1.0]
//
// --dense 0 skips the dense rows (bench_cuda.py measures them once, with its first plan blocks);
// --cooldown is the idle time in seconds before each measurement.
//
// Timing protocol: the one of triton.testing.do_bench, which bench_cuda.py uses for the PyTorch
// rows, so every row of the table is measured the same way: 25 ms of warm-up calls, then at
// least 100 ms (and at least --iters) of repetitions, each preceded by a 256 MB memset that
// flushes L2 and keeps the GPU busy while the host enqueues the call (so host-side launch work
// is not timed), an event pair around each call, no synchronisation between repetitions; the
// median of the per-call times. Both sides idle --cooldown seconds before each measurement.
//
// Block masks come from a counter hash (splitmix64 of (head, query block, kv block) and the
// seed) so that bench_cuda.py rebuilds exactly the same mask for FlexAttention.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "cuda_bench_util.hpp"
#include "spattn/attention.hpp"
#include "spattn/error.hpp"

namespace {

// Uniform in [-1, 1) from a hash of the element index (host side, then one copy): never zeros.
void fill_random(void* device, int64_t n, uint64_t seed) {
  std::vector<uint16_t> host(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const float x = float(splitmix64(uint64_t(i) ^ (seed << 40)) >> 40) * (2.0f / 16777216.0f) - 1.0f;
    host[size_t(i)] = spattn::to_bfloat16(x).bits;
  }
  check(cudaMemcpy(device, host.data(), size_t(n) * 2, cudaMemcpyHostToDevice), "input copy");
}

}  // namespace

int main(int argc, char** argv) {
  using namespace spattn;
  int64_t N = 32768, H = 12, D = 128;
  int iters = 20, block_q = 128, block_k = 64;
  uint64_t seed = 1;
  bool with_dense = true;
  double cooldown_s = 1.0;
  std::string causal_arg = "both";
  std::vector<double> densities = {0.15, 0.10, 0.05};
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--seq") N = std::stoll(v);
    else if (a == "--heads") H = std::stoll(v);
    else if (a == "--dim") D = std::stoll(v);
    else if (a == "--iters") iters = std::stoi(v);
    else if (a == "--block-q") block_q = std::stoi(v);
    else if (a == "--block-k") block_k = std::stoi(v);
    else if (a == "--seed") seed = std::stoull(v);
    else if (a == "--causal") causal_arg = v;
    else if (a == "--dense" && (v == "0" || v == "1")) with_dense = v == "1";
    else if (a == "--cooldown" && std::stod(v) >= 0) cooldown_s = std::stod(v);
    else if (a == "--densities") {
      densities.clear();
      size_t pos = 0;
      while (pos < v.size()) {
        const size_t end = v.find(',', pos);
        densities.push_back(std::stod(v.substr(pos, end - pos)));
        pos = end == std::string::npos ? v.size() : end + 1;
      }
    } else {
      std::fprintf(stderr,
                   "bench_cuda: unknown argument or bad value: %s %s (--dense takes 0 or 1, "
                   "--cooldown seconds >= 0)\n",
                   a.c_str(), v.c_str());
      return 2;
    }
  }
  if (!cuda_backend_available()) {
    std::fprintf(stderr, "bench_cuda: no CUDA device\n");
    return 2;
  }
  cudaDeviceProp prop;
  check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");

  const Device dev{DeviceKind::cuda, 0};
  const int64_t n = H * N * D;
  Buf q(n * 2), k(n * 2), v(n * 2), o(n * 2), dout(n * 2), dq(n * 2), dk(n * 2), dv(n * 2),
      lse(H * N * 4);
  int s = 0;
  for (void* p : {q.p, k.p, v.p, dout.p}) fill_random(p, n, seed * 1000 + s++);
  auto ref4 = [&](void* p) { return make_ref(p, DType::bfloat16, {1, H, N, D}, {}, dev); };
  const TensorRef tq = ref4(q.p), tk = ref4(k.p), tv = ref4(v.p), to = ref4(o.p),
                  tdo = ref4(dout.p), tdq = ref4(dq.p), tdk = ref4(dk.p), tdv = ref4(dv.p);
  const TensorRef tl = make_ref(lse.p, DType::float32, {1, H, N}, {}, dev);

  // do_bench's cache flush: 256 MB, larger than the L2.
  constexpr size_t kFlushBytes = size_t(256) << 20;
  Buf l2_flush(kFlushBytes);
  cudaEvent_t e0, e1;
  check(cudaEventCreate(&e0), "cudaEventCreate");
  check(cudaEventCreate(&e1), "cudaEventCreate");

  std::vector<bool> causals;
  if (causal_arg == "0" || causal_arg == "both") causals.push_back(false);
  if (causal_arg == "1" || causal_arg == "both") causals.push_back(true);
  for (bool causal : causals) {
    AttentionParams params;
    params.mask.causal = causal;
    std::vector<double> runs;
    if (with_dense) runs.push_back(-1.0);
    runs.insert(runs.end(), densities.begin(), densities.end());
    for (double density : runs) {
      BlockPlan plan;
      PlanView view;
      std::vector<Buf*> plan_bufs;
      const PlanView* pv = nullptr;
      double computed = causal ? 0.5 : 1.0;  // share of the N x N grid computed
      if (density >= 0) {
        PlanGeometry g;
        g.batch = 1;
        g.heads = H;
        g.q_len = g.k_len = N;
        g.block_q = block_q;
        g.block_k = block_k;
        g.rule = params.mask;
        const int64_t nqb = g.num_q_blocks(), nkb = g.num_k_blocks();
        std::vector<uint8_t> mask(size_t(H * nqb * nkb));
        for (size_t i = 0; i < mask.size(); ++i)
          mask[i] = double(splitmix64(i + seed * 0x1000000000ull) >> 11) * 0x1.0p-53 < density;
        plan = BlockPlan::from_block_mask(g, mask);
        computed = plan.density();
        view = plan.view();
        auto upload = [&](const std::vector<int32_t>& a) {
          Buf* b = new Buf(a.size() * 4);
          check(cudaMemcpy(b->p, a.data(), a.size() * 4, cudaMemcpyHostToDevice), "plan copy");
          plan_bufs.push_back(b);
          return static_cast<const int32_t*>(b->p);
        };
        view.kv_index = upload(plan.kv_index());
        view.num_full = upload(plan.num_full());
        view.num_partial = upload(plan.num_partial());
        view.device = dev;
        pv = &view;
      }
      auto time_it = [&](bool with_backward) {
        // Idle first, so each measurement starts from the same clocks (a dense fwd+bwd run
        // before it otherwise leaves the GPU clocked down for the next one).
        std::this_thread::sleep_for(std::chrono::duration<double>(cooldown_s));
        auto call = [&] {
          forward(tq, tk, tv, pv, params, to, tl);
          if (with_backward) backward(tq, tk, tv, to, tl, tdo, pv, params, tdq, tdk, tdv);
        };
        // Estimate from 5 calls (after one that loads the modules), as do_bench does.
        call();
        check(cudaEventRecord(e0), "cudaEventRecord");
        for (int i = 0; i < 5; ++i) call();
        check(cudaEventRecord(e1), "cudaEventRecord");
        check(cudaEventSynchronize(e1), "cudaEventSynchronize");
        float est = 0;
        check(cudaEventElapsedTime(&est, e0, e1), "cudaEventElapsedTime");
        est = std::max(est / 5, 1e-3f);
        const int warmup = std::max(1, int(25.f / est));
        const int reps = std::max(iters, int(100.f / est));
        for (int i = 0; i < warmup; ++i) call();
        const size_t n = static_cast<size_t>(reps);
        std::vector<cudaEvent_t> start(n), end(n);
        for (int i = 0; i < reps; ++i) {
          check(cudaEventCreate(&start[size_t(i)]), "cudaEventCreate");
          check(cudaEventCreate(&end[size_t(i)]), "cudaEventCreate");
        }
        for (int i = 0; i < reps; ++i) {
          check(cudaMemsetAsync(l2_flush.p, 0, kFlushBytes), "cudaMemsetAsync (L2 flush)");
          check(cudaEventRecord(start[size_t(i)]), "cudaEventRecord");
          call();
          check(cudaEventRecord(end[size_t(i)]), "cudaEventRecord");
        }
        check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
        std::vector<float> ms(n);
        for (int i = 0; i < reps; ++i) {
          check(cudaEventElapsedTime(&ms[size_t(i)], start[size_t(i)], end[size_t(i)]),
                "cudaEventElapsedTime");
          cudaEventDestroy(start[size_t(i)]);
          cudaEventDestroy(end[size_t(i)]);
        }
        return median(ms);
      };
      const float fwd = time_it(false);
      const float fwdbwd = time_it(true);
      // Poison check: a finite output proves every element was written.
      std::printf(
          "{\"impl\": \"spattn\", \"gpu\": \"%s\", \"causal\": %d, \"density\": %.4f, "
          "\"computed\": %.5f, \"block\": \"%dx%d\", \"fwd_ms\": %.4f, \"fwdbwd_ms\": %.4f, "
          "\"N\": %lld, \"H\": %lld, \"D\": %lld}\n",
          prop.name, int(causal), density, computed, block_q, block_k, fwd, fwdbwd,
          (long long)N, (long long)H, (long long)D);
      std::fflush(stdout);
      for (Buf* b : plan_bufs) delete b;
    }
  }
  return 0;
}
