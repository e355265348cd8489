// CUDA backend tests. Every case draws fresh random inputs, poisons the GPU outputs with NaN,
// runs forward and backward on the device and compares with the float64 reference; the
// tolerance comes from a naive float32 run of the same inputs (FlashAttention-3's rule). The
// backward pass is also run twice and compared bit for bit.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <cstdlib>
#include <cstring>
#include <random>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/launch.hpp"  // transpose_plan, tested directly
#include "cuda_test_util.hpp"
#include "spattn/attention.hpp"
#include "spattn/error.hpp"
#include "spattn/reference.hpp"

namespace {

using namespace spattn;

// Device copy of a host tensor with the same strides (host storage is one dense block).
struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  TensorRef ref;
  DeviceBuffer() = default;
  explicit DeviceBuffer(const TensorRef& host) {
    bytes = size_t(host.numel()) * dtype_size(host.dtype);
    if (cudaMalloc(&ptr, std::max<size_t>(bytes, 16)) != cudaSuccess) throw Error("cudaMalloc");
    if (bytes && cudaMemcpy(ptr, host.data, bytes, cudaMemcpyHostToDevice) != cudaSuccess)
      throw Error("cudaMemcpy");
    ref = host;
    ref.data = ptr;
    ref.device = Device{DeviceKind::cuda, 0};
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
  void poison() const { cudaMemset(ptr, 0xff, bytes); }  // NaN in every float format used
  void to_host(const TensorRef& host) const {
    if (bytes) cudaMemcpy(host.data, ptr, bytes, cudaMemcpyDeviceToHost);
  }
};

// Plan arrays on the device.
struct DevicePlan {
  DeviceBuffer idx, nf, np;
  PlanView view;
  explicit DevicePlan(const BlockPlan& plan)
      : idx(make_ref(const_cast<int32_t*>(plan.kv_index().data()), DType::float32,
                     {int64_t(plan.kv_index().size())})),
        nf(make_ref(const_cast<int32_t*>(plan.num_full().data()), DType::float32,
                    {int64_t(plan.num_full().size())})),
        np(make_ref(const_cast<int32_t*>(plan.num_partial().data()), DType::float32,
                    {int64_t(plan.num_partial().size())})) {
    view = plan.view();
    view.kv_index = static_cast<const int32_t*>(idx.ptr);
    view.num_full = static_cast<const int32_t*>(nf.ptr);
    view.num_partial = static_cast<const int32_t*>(np.ptr);
    view.device = Device{DeviceKind::cuda, 0};
  }
};

struct Case {
  int64_t B = 1, Hq = 2, Hkv = 2, Nq = 128, Nk = 128, D = 64;
  DType dtype = DType::bfloat16;
  MaskRule rule{};
  double density = -1;  // < 0: dense (plan == nullptr)
  int block_q = 128, block_k = 64;
  bool bnhd = false;       // storage order B, N, H, D
  bool plan_per_q_head = false;  // plan heads = Hq (else Hkv)

  std::string name() const {
    std::ostringstream s;
    s << dtype_name(dtype) << "_B" << B << "_H" << Hq << "x" << Hkv << "_N" << Nq << "x" << Nk
      << "_D" << D << "_" << (rule.is_unrestricted() ? "none" : rule.to_string())
      << (density < 0 ? "_dense" : "_p" + std::to_string(int(density * 100)) + "_" +
                                       std::to_string(block_q) + "x" + std::to_string(block_k))
      << (bnhd ? "_bnhd" : "") << (plan_per_q_head ? "_qheads" : "");
    std::string r = s.str();
    for (char& c : r)
      if (!isalnum(static_cast<unsigned char>(c))) c = '_';
    return r;
  }
};

// Readable ctest/gtest parameter descriptions instead of the raw bytes of a Case.
void PrintTo(const Case& c, std::ostream* os) { *os << c.name(); }

Tensor make_input(std::vector<int64_t> shape, DType dtype, bool bnhd, uint64_t seed) {
  Tensor t = Tensor::empty(shape, dtype, bnhd ? std::vector<int>{0, 2, 1, 3} : std::vector<int>{});
  fill_uniform(t, seed, -1.0, 1.0);
  return t;
}
Tensor make_output(std::vector<int64_t> shape, DType dtype, bool bnhd) {
  return Tensor::empty(shape, dtype,
                       bnhd && shape.size() == 4 ? std::vector<int>{0, 2, 1, 3} : std::vector<int>{});
}

BlockPlan random_plan(const Case& c, uint64_t seed) {
  PlanGeometry g;
  g.batch = c.B;
  g.heads = c.plan_per_q_head ? c.Hq : c.Hkv;
  g.q_len = c.Nq;
  g.k_len = c.Nk;
  g.block_q = c.block_q;
  g.block_k = c.block_k;
  g.rule = c.rule;
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<uint8_t> mask(size_t(g.num_rows() * g.num_k_blocks()));
  for (auto& m : mask) m = u(rng) < c.density ? 1 : 0;
  return BlockPlan::from_block_mask(g, mask);
}

void run_case(const Case& c, uint64_t seed) {
  SCOPED_TRACE(c.name());
  AttentionParams params;
  params.mask = c.rule;
  const Tensor q = make_input({c.B, c.Hq, c.Nq, c.D}, c.dtype, c.bnhd, seed * 7 + 1);
  const Tensor k = make_input({c.B, c.Hkv, c.Nk, c.D}, c.dtype, c.bnhd, seed * 7 + 2);
  const Tensor v = make_input({c.B, c.Hkv, c.Nk, c.D}, c.dtype, c.bnhd, seed * 7 + 3);
  const Tensor dout = make_input({c.B, c.Hq, c.Nq, c.D}, c.dtype, c.bnhd, seed * 7 + 4);
  BlockPlan plan;
  const bool sparse = c.density >= 0;
  if (sparse) plan = random_plan(c, seed * 7 + 5);
  const BlockPlan* host_plan = sparse ? &plan : nullptr;

  // GPU forward.
  DeviceBuffer dq_(q), dk_(k), dv_(v), ddo(dout);
  Tensor out = make_output({c.B, c.Hq, c.Nq, c.D}, c.dtype, c.bnhd);
  Tensor lse = make_output({c.B, c.Hq, c.Nq}, DType::float32, false);
  DeviceBuffer dout_buf(out), dlse(lse);
  std::unique_ptr<DevicePlan> dplan;
  if (sparse) dplan = std::make_unique<DevicePlan>(plan);
  const PlanView* pv = sparse ? &dplan->view : nullptr;
  dout_buf.poison();
  dlse.poison();
  forward(dq_.ref, dk_.ref, dv_.ref, pv, params, dout_buf.ref, dlse.ref);
  CUDA_OK(cudaDeviceSynchronize());
  dout_buf.to_host(out);
  dlse.to_host(lse);

  // References: float64 truth, float32 naive run for the tolerance.
  const ForwardResult ref = reference::forward(q, k, v, host_plan, params, reference::Compute::float64);
  const ForwardResult naive = reference::forward(q, k, v, host_plan, params, reference::Compute::float32);
  const double e_out = reference::relative_error(out, ref.out);
  const double e_naive = reference::relative_error(naive.out, ref.out);
  EXPECT_LE(e_out, 3 * e_naive + 2e-3) << "out error " << e_out << " vs naive " << e_naive;
  const double e_lse = reference::relative_error(lse, ref.lse);
  EXPECT_LE(e_lse, 1e-4) << "lse error " << e_lse;

  // The CPU engine on the same inputs, where it is built.
  if (backend_supports(Device{}, c.dtype, c.D, c.D).ok && c.Nq * c.Nk <= 200000) {
    try {
      const ForwardResult cpu = forward(q, k, v, host_plan, params);
      const double e_cpu = reference::relative_error(out, cpu.out);
      EXPECT_LE(e_cpu, 3 * e_naive + 4e-3) << "out vs CPU engine " << e_cpu;
    } catch (const Error& e) {
      ADD_FAILURE() << "CPU engine failed: " << e.what();
    }
  }

  // GPU backward, twice, on the GPU's own out and lse.
  const Tensor gq = make_output({c.B, c.Hq, c.Nq, c.D}, c.dtype, c.bnhd);
  const Tensor gk = make_output({c.B, c.Hkv, c.Nk, c.D}, c.dtype, c.bnhd);
  const Tensor gv = make_output({c.B, c.Hkv, c.Nk, c.D}, c.dtype, c.bnhd);
  DeviceBuffer bq(gq), bk(gk), bv(gv);
  std::vector<std::vector<unsigned char>> first;
  for (int run = 0; run < 2; ++run) {
    bq.poison();
    bk.poison();
    bv.poison();
    backward(dq_.ref, dk_.ref, dv_.ref, dout_buf.ref, dlse.ref, ddo.ref, pv, params, bq.ref,
             bk.ref, bv.ref);
    CUDA_OK(cudaDeviceSynchronize());
    std::vector<std::vector<unsigned char>> now;
    for (const DeviceBuffer* b : {&bq, &bk, &bv}) {
      now.emplace_back(b->bytes);
      if (b->bytes) cudaMemcpy(now.back().data(), b->ptr, b->bytes, cudaMemcpyDeviceToHost);
    }
    if (run == 0) first = now;
    else EXPECT_TRUE(first == now) << "backward is not bitwise deterministic";
  }
  bq.to_host(gq);
  bk.to_host(gk);
  bv.to_host(gv);
  const Gradients gref = reference::backward(q, k, v, dout, host_plan, params, reference::Compute::float64);
  const Gradients gnaive = reference::backward(q, k, v, dout, host_plan, params, reference::Compute::float32);
  const std::pair<const char*, std::array<const Tensor*, 3>> grads[] = {
      {"dq", {&gq, &gref.dq, &gnaive.dq}},
      {"dk", {&gk, &gref.dk, &gnaive.dk}},
      {"dv", {&gv, &gref.dv, &gnaive.dv}}};
  for (const auto& [name, t] : grads) {
    const double e = reference::relative_error(*t[0], *t[1]);
    const double en = reference::relative_error(*t[2], *t[1]);
    EXPECT_LE(e, 4 * en + 4e-3) << name << " error " << e << " vs naive " << en;
  }
}

// Forward kernel choice (SPATTN_CUDA_FORWARD): the main suite asks for the sm_90a kernel, which
// then runs wherever it applies on an H100/H200 (and a refused tensor map fails the test instead
// of falling back); the Sm80 suite repeats a subset on the mma.sync kernel.
class ForwardPathScope {
 public:
  explicit ForwardPathScope(const char* path) { setenv("SPATTN_CUDA_FORWARD", path, 1); }
  ~ForwardPathScope() { unsetenv("SPATTN_CUDA_FORWARD"); }
  ForwardPathScope(const ForwardPathScope&) = delete;
  ForwardPathScope& operator=(const ForwardPathScope&) = delete;
};

// Backward kernel choice (SPATTN_CUDA_BACKWARD), the same way: the main suite runs the sm_90a
// dq and dk/dv passes wherever they apply, the Sm80 suite the mma.sync passes.
class BackwardPathScope {
 public:
  explicit BackwardPathScope(const char* path) { setenv("SPATTN_CUDA_BACKWARD", path, 1); }
  ~BackwardPathScope() { unsetenv("SPATTN_CUDA_BACKWARD"); }
  BackwardPathScope(const BackwardPathScope&) = delete;
  BackwardPathScope& operator=(const BackwardPathScope&) = delete;
};

class CudaAttention : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    if (!have_gpu()) GTEST_SKIP() << "no CUDA device (or the CUDA backend is not built)";
  }
};

TEST_P(CudaAttention, MatchesReference) {
  ForwardPathScope path("sm90");
  BackwardPathScope backward_path("sm90");
  run_case(GetParam(), std::hash<std::string>{}(GetParam().name()));
}

class CudaAttentionSm80 : public CudaAttention {};

TEST_P(CudaAttentionSm80, MatchesReference) {
  ForwardPathScope path("sm80");
  BackwardPathScope backward_path("sm80");
  run_case(GetParam(), std::hash<std::string>{}(GetParam().name()) + 1);
}

std::vector<Case> all_cases() {
  std::vector<Case> cs;
  MaskRule none{}, causal{true, -1, -1}, window{false, 96, 32}, causal_window{true, 100, -1};
  // Every length class, dense and at the default plan geometry, both head dims.
  for (int64_t n : {1, 17, 127, 128, 129, 1000})
    for (int64_t d : {64, 128})
      for (const MaskRule& r : {none, causal}) {
        Case c;
        c.Nq = c.Nk = n;
        c.D = d;
        c.rule = r;
        cs.push_back(c);
        c.density = 0.5;
        cs.push_back(c);
      }
  // Densities 0, 5, 15, 50, 100% on a longer sequence.
  for (double dens : {0.0, 0.05, 0.15, 0.5, 1.0})
    for (const MaskRule& r : {none, causal}) {
      Case c;
      c.Nq = c.Nk = 1000;
      c.D = 128;
      c.rule = r;
      c.density = dens;
      cs.push_back(c);
    }
  // GQA 1 / 2 / 8 (and MQA), plans per kv head and per query head.
  for (int64_t hkv : {8, 4, 1})
    for (bool per_q : {false, true}) {
      Case c;
      c.Hq = 8;
      c.Hkv = hkv;
      c.Nq = c.Nk = 200;
      c.density = 0.3;
      c.plan_per_q_head = per_q;
      cs.push_back(c);
    }
  // Nq != Nk (bottom-right causal alignment), windows.
  for (auto [nq, nk] : {std::pair<int64_t, int64_t>{129, 1000}, {1000, 129}, {17, 300}, {300, 17}})
    for (const MaskRule& r : {none, causal, window, causal_window})
      for (double dens : {-1.0, 0.4}) {
        Case c;
        c.Nq = nq;
        c.Nk = nk;
        c.rule = r;
        c.density = dens;
        c.D = (nq + nk) % 2 ? 128 : 64;
        cs.push_back(c);
      }
  // Other plan block sizes (native: >= 128 x 64; generic: smaller).
  for (auto [bq, bk] : {std::pair<int, int>{128, 128}, {256, 64}, {256, 256}, {64, 64},
                        {16, 16}, {32, 128}, {128, 32}})
    for (const MaskRule& r : {none, causal_window}) {
      Case c;
      c.Nq = 333;
      c.Nk = 517;
      c.block_q = bq;
      c.block_k = bk;
      c.rule = r;
      c.density = 0.35;
      cs.push_back(c);
    }
  // B,N,H,D storage, batch > 1, float16.
  for (DType dt : {DType::bfloat16, DType::float16})
    for (bool bnhd : {false, true}) {
      Case c;
      c.B = 2;
      c.Hq = 4;
      c.Hkv = 2;
      c.Nq = c.Nk = 257;
      c.dtype = dt;
      c.bnhd = bnhd;
      c.rule = causal;
      c.density = 0.5;
      cs.push_back(c);
      c.density = -1;
      c.D = 128;
      cs.push_back(c);
    }
  // Head dim 256 (Hopper forward with 64-key steps; mma.sync backward with 64-row dq CTAs and
  // dk/dv in two column halves): lengths, dense and the default plan, then GQA with Nq != Nk,
  // a window, a 128 x 128 plan, float16 in B,N,H,D storage, a generic 32 x 128 plan.
  for (int64_t n : {17, 129, 1000})
    for (const MaskRule& r : {none, causal}) {
      Case c;
      c.Nq = c.Nk = n;
      c.D = 256;
      c.rule = r;
      cs.push_back(c);
      c.density = 0.5;
      cs.push_back(c);
    }
  {
    Case c;
    c.D = 256;
    c.Hq = 8;
    c.Hkv = 2;
    c.Nq = 300;
    c.Nk = 517;
    c.rule = causal_window;
    c.density = 0.4;
    c.block_k = 128;
    c.dtype = DType::float16;
    c.bnhd = true;
    cs.push_back(c);
    // A generic (small-block) plan: the 64-row dq CTA spans several plan rows.
    c.dtype = DType::bfloat16;
    c.bnhd = false;
    c.Hq = c.Hkv = 2;
    c.block_q = 32;
    c.block_k = 128;
    c.rule = none;
    c.density = 0.35;
    cs.push_back(c);
  }
  // Drop repeats (the loops above overlap in a few shapes).
  std::vector<Case> unique;
  std::vector<std::string> seen;
  for (const Case& c : cs) {
    if (std::find(seen.begin(), seen.end(), c.name()) != seen.end()) continue;
    seen.push_back(c.name());
    unique.push_back(c);
  }
  return unique;
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaAttention, ::testing::ValuesIn(all_cases()),
                         [](const ::testing::TestParamInfo<Case>& i) { return i.param.name(); });

// Every third shape on the mma.sync forward (the fallback for generic plans and other GPUs).
std::vector<Case> sm80_cases() {
  std::vector<Case> cs;
  const std::vector<Case> all = all_cases();
  for (size_t i = 0; i < all.size(); i += 3) cs.push_back(all[i]);
  return cs;
}
INSTANTIATE_TEST_SUITE_P(ShapesSm80, CudaAttentionSm80, ::testing::ValuesIn(sm80_cases()),
                         [](const ::testing::TestParamInfo<Case>& i) { return i.param.name(); });

// The sm_90a forward against the mma.sync forward on one large sparse problem and one dense
// causal one: many tiles per CTA (the TMA ring wraps many times), both heads layouts.
// Variants 2 (5% plan) and 3 (D = 64, dense causal sliding window) have several 128-row query
// tiles per SM, run by CTAs in turn; the 5% plan leaves some query tiles with no key tile at
// all (rows written as zeros between tiles that have work).
TEST(CudaAttentionPaths, Sm90MatchesSm80OnLongSequences) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  for (int variant = 0; variant < 4; ++variant) {
    Case c;
    c.Hq = variant >= 2 ? 16 : 4;
    c.Hkv = variant == 1 ? 1 : 4;
    c.Nq = c.Nk = 4096 + 37;
    c.D = variant == 3 ? 64 : 128;
    c.bnhd = variant == 1;
    c.density = variant == 1 || variant == 3 ? -1.0 : variant == 2 ? 0.05 : 0.2;
    c.rule = variant == 1 ? MaskRule{true, -1, -1}
             : variant == 3 ? MaskRule{true, 300, -1}  // causal sliding window
                            : MaskRule{};
    SCOPED_TRACE(c.name());
    const Tensor q = make_input({c.B, c.Hq, c.Nq, c.D}, c.dtype, c.bnhd, 101 + variant);
    const Tensor k = make_input({c.B, c.Hkv, c.Nk, c.D}, c.dtype, c.bnhd, 201 + variant);
    const Tensor v = make_input({c.B, c.Hkv, c.Nk, c.D}, c.dtype, c.bnhd, 301 + variant);
    BlockPlan plan;
    if (c.density >= 0) plan = random_plan(c, 401);
    std::unique_ptr<DevicePlan> dplan;
    if (c.density >= 0) dplan = std::make_unique<DevicePlan>(plan);
    const PlanView* pv = dplan ? &dplan->view : nullptr;
    DeviceBuffer bq(q), bk(k), bv(v);
    AttentionParams params;
    params.mask = c.rule;
    Tensor outs[2] = {make_output({c.B, c.Hq, c.Nq, c.D}, c.dtype, c.bnhd),
                      make_output({c.B, c.Hq, c.Nq, c.D}, c.dtype, c.bnhd)};
    Tensor lses[2] = {make_output({c.B, c.Hq, c.Nq}, DType::float32, false),
                      make_output({c.B, c.Hq, c.Nq}, DType::float32, false)};
    for (int i = 0; i < 2; ++i) {
      ForwardPathScope path(i == 0 ? "sm90" : "sm80");
      DeviceBuffer o(outs[i]), l(lses[i]);
      o.poison();
      l.poison();
      forward(bq.ref, bk.ref, bv.ref, pv, params, o.ref, l.ref);
      CUDA_OK(cudaDeviceSynchronize());
      o.to_host(outs[i]);
      l.to_host(lses[i]);
    }
    EXPECT_LE(reference::relative_error(outs[0], outs[1]), 1e-2);
    EXPECT_LE(reference::relative_error(lses[0], lses[1]), 1e-5);
  }
}

// The sm_90a backward against the mma.sync backward on long sequences: many 128-query steps
// per dk/dv CTA over a GQA group (the Q/dO ring wraps many times), many key tiles per dq CTA,
// sparse with 128 x 64 and 256 x 256 plans, dense causal, both head layouts.
TEST(CudaAttentionPaths, Sm90BackwardMatchesSm80OnLongSequences) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  for (int variant = 0; variant < 3; ++variant) {
    Case c;
    c.Hq = 4;
    c.Hkv = variant == 1 ? 1 : variant == 2 ? 2 : 4;
    c.Nq = c.Nk = 4096 + 37;
    c.D = 128;
    c.bnhd = variant == 1;
    c.density = variant == 1 ? -1.0 : 0.2;
    c.rule = variant == 1 ? MaskRule{true, -1, -1} : MaskRule{};
    if (variant == 2) c.block_q = c.block_k = 256;
    SCOPED_TRACE(c.name());
    const Tensor q = make_input({c.B, c.Hq, c.Nq, c.D}, c.dtype, c.bnhd, 111 + variant);
    const Tensor k = make_input({c.B, c.Hkv, c.Nk, c.D}, c.dtype, c.bnhd, 211 + variant);
    const Tensor v = make_input({c.B, c.Hkv, c.Nk, c.D}, c.dtype, c.bnhd, 311 + variant);
    const Tensor dout = make_input({c.B, c.Hq, c.Nq, c.D}, c.dtype, c.bnhd, 511 + variant);
    BlockPlan plan;
    if (c.density >= 0) plan = random_plan(c, 411 + variant);
    std::unique_ptr<DevicePlan> dplan;
    if (c.density >= 0) dplan = std::make_unique<DevicePlan>(plan);
    const PlanView* pv = dplan ? &dplan->view : nullptr;
    DeviceBuffer bq(q), bk(k), bv(v), bdo(dout);
    AttentionParams params;
    params.mask = c.rule;
    Tensor out = make_output({c.B, c.Hq, c.Nq, c.D}, c.dtype, c.bnhd);
    Tensor lse = make_output({c.B, c.Hq, c.Nq}, DType::float32, false);
    DeviceBuffer o(out), l(lse);
    forward(bq.ref, bk.ref, bv.ref, pv, params, o.ref, l.ref);
    std::vector<Tensor> grads[2];
    for (int i = 0; i < 2; ++i) {
      BackwardPathScope path(i == 0 ? "sm90" : "sm80");
      grads[i] = {make_output({c.B, c.Hq, c.Nq, c.D}, c.dtype, c.bnhd),
                  make_output({c.B, c.Hkv, c.Nk, c.D}, c.dtype, c.bnhd),
                  make_output({c.B, c.Hkv, c.Nk, c.D}, c.dtype, c.bnhd)};
      DeviceBuffer gq(grads[i][0]), gk(grads[i][1]), gv(grads[i][2]);
      gq.poison();
      gk.poison();
      gv.poison();
      backward(bq.ref, bk.ref, bv.ref, o.ref, l.ref, bdo.ref, pv, params, gq.ref, gk.ref, gv.ref);
      CUDA_OK(cudaDeviceSynchronize());
      gq.to_host(grads[i][0]);
      gk.to_host(grads[i][1]);
      gv.to_host(grads[i][2]);
    }
    const char* names[3] = {"dq", "dk", "dv"};
    for (int t = 0; t < 3; ++t)
      EXPECT_LE(reference::relative_error(grads[0][t], grads[1][t]), 2e-2) << names[t];
  }
}

TEST(CudaAttentionErrors, UnsupportedHeadDimIsAClearError) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const Support s = backend_supports(Device{DeviceKind::cuda, 0}, DType::bfloat16, 96, 96);
  EXPECT_FALSE(s.ok);
  EXPECT_NE(s.reason.find("head dims"), std::string::npos) << s.reason;
  const Support f = backend_supports(Device{DeviceKind::cuda, 0}, DType::float32, 64, 64);
  EXPECT_FALSE(f.ok);
}

TEST(CudaAttentionErrors, MisalignedRowsAreRejected) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  // Rows of 64 elements stored with a row stride of 68: not a multiple of 8.
  void* mem = nullptr;
  ASSERT_EQ(cudaMalloc(&mem, 1 << 20), cudaSuccess);
  const Device dev{DeviceKind::cuda, 0};
  const TensorRef q = make_ref(mem, DType::bfloat16, {1, 1, 16, 64}, {16 * 68, 16 * 68, 68, 1}, dev);
  void* o = nullptr;
  ASSERT_EQ(cudaMalloc(&o, 1 << 16), cudaSuccess);
  const TensorRef out = make_ref(o, DType::bfloat16, {1, 1, 16, 64}, {}, dev);
  const TensorRef lse = make_ref(static_cast<char*>(o) + 4096, DType::float32, {1, 1, 16}, {}, dev);
  EXPECT_THROW(forward(q, q, q, nullptr, AttentionParams{}, out, lse), Error);
  cudaFree(mem);
  cudaFree(o);
}

TEST(CudaAttentionStreams, RunsOnACallerStream) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  Case c;
  c.Nq = c.Nk = 300;
  const Tensor q = make_input({1, 2, 300, 64}, c.dtype, false, 11);
  DeviceBuffer dq(q);
  Tensor out = make_output({1, 2, 300, 64}, c.dtype, false);
  Tensor lse = make_output({1, 2, 300}, DType::float32, false);
  DeviceBuffer dout(out), dlse(lse);
  cudaStream_t s;
  CUDA_OK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  AttentionParams params;
  params.stream = s;
  dout.poison();
  forward(dq.ref, dq.ref, dq.ref, nullptr, params, dout.ref, dlse.ref);
  CUDA_OK(cudaStreamSynchronize(s));
  CUDA_OK(cudaStreamDestroy(s));
  dout.to_host(out);
  dlse.to_host(lse);
  const ForwardResult ref = reference::forward(q, q, q, nullptr, AttentionParams{});
  EXPECT_LE(reference::relative_error(out, ref.out), 2e-2);
}


// The device plan transpose against a host transpose, on plans with empty rows, full and
// partial runs, and query-block counts around the kernel's 32- and 128-block chunks.
TEST(CudaPlanTranspose, MatchesHostTranspose) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(7);
  for (const int nqb : {1, 31, 32, 33, 128, 129, 300}) {
    for (const int nkb : {1, 5, 70}) {
      SCOPED_TRACE("query blocks " + std::to_string(nqb) + ", kv blocks " + std::to_string(nkb));
      const int batch = 2, heads = 3;
      const int64_t rows = int64_t(batch) * heads * nqb, cap = nkb + 1;  // a spare column
      std::vector<int32_t> index(rows * cap, -7), nf(rows), np(rows);
      std::uniform_real_distribution<double> u01(0.0, 1.0);
      for (int64_t r = 0; r < rows; ++r) {
        const double density = r % 5 == 0 ? 0.0 : u01(rng);  // every fifth row empty
        std::vector<int32_t> full, partial;
        for (int kb = 0; kb < nkb; ++kb)
          if (u01(rng) < density) (u01(rng) < 0.7 ? full : partial).push_back(kb);
        nf[r] = int32_t(full.size());
        np[r] = int32_t(partial.size());
        std::copy(full.begin(), full.end(), index.begin() + r * cap);
        std::copy(partial.begin(), partial.end(), index.begin() + r * cap + nf[r]);
      }
      // Host transpose: per (batch, head, kv block), the query blocks listing it, full first.
      const int64_t trows = int64_t(batch) * heads * nkb;
      std::vector<std::vector<int32_t>> want_full(trows), want_partial(trows);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t head_row = r / nqb;
        const int qb = int(r % nqb);
        for (int e = 0; e < nf[r] + np[r]; ++e) {
          const int64_t t = head_row * nkb + index[r * cap + e];
          (e < nf[r] ? want_full : want_partial)[t].push_back(qb);
        }
      }
      auto upload = [](const std::vector<int32_t>& v) {
        int32_t* d = nullptr;
        EXPECT_EQ(cudaMalloc(&d, v.size() * sizeof(int32_t)), cudaSuccess);
        EXPECT_EQ(cudaMemcpy(d, v.data(), v.size() * sizeof(int32_t), cudaMemcpyHostToDevice),
                  cudaSuccess);
        return std::unique_ptr<int32_t, decltype(&cudaFree)>(d, &cudaFree);
      };
      auto d_index = upload(index), d_nf = upload(nf), d_np = upload(np);
      // Outputs poisoned so unwritten counts show.
      auto t_index = upload(std::vector<int32_t>(trows * nqb, -1));
      auto t_nf = upload(std::vector<int32_t>(trows, -1));
      auto t_np = upload(std::vector<int32_t>(trows, -1));
      cuda::PlanArgs plan;
      plan.index = d_index.get();
      plan.num_full = d_nf.get();
      plan.num_partial = d_np.get();
      plan.capacity = cap;
      plan.batch = batch;
      plan.heads = heads;
      plan.rows = nqb;
      CUDA_OK(cuda::transpose_plan(plan, nkb, t_index.get(), t_nf.get(), t_np.get(), nullptr));
      CUDA_OK(cudaDeviceSynchronize());
      std::vector<int32_t> got_index(trows * nqb), got_nf(trows), got_np(trows);
      auto download = [](std::vector<int32_t>& v, const int32_t* d) {
        return cudaMemcpy(v.data(), d, v.size() * sizeof(int32_t), cudaMemcpyDeviceToHost);
      };
      CUDA_OK(download(got_index, t_index.get()));
      CUDA_OK(download(got_nf, t_nf.get()));
      CUDA_OK(download(got_np, t_np.get()));
      for (int64_t t = 0; t < trows; ++t) {
        ASSERT_EQ(got_nf[t], int32_t(want_full[t].size())) << "transposed row " << t;
        ASSERT_EQ(got_np[t], int32_t(want_partial[t].size())) << "transposed row " << t;
        std::vector<int32_t> want = want_full[t];
        want.insert(want.end(), want_partial[t].begin(), want_partial[t].end());
        const std::vector<int32_t> got(got_index.begin() + t * nqb,
                                       got_index.begin() + t * nqb + int64_t(want.size()));
        ASSERT_EQ(got, want) << "transposed row " << t;
      }
    }
  }
}

}  // namespace
