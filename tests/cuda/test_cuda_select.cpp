// GPU selector tests: select_hybrid_into on CUDA tensors must give the CPU selector's plan for the
// same inputs. Every case draws fresh random inputs, poisons the device plan arrays, runs the GPU
// selector and compares each row with select_hybrid (block lists, full/partial split, counts).
// A row may differ only where expf rounding moves a Top-p stopping point: such rows are counted,
// reported, and must sit at an exact float tie of the prefix mass with the threshold (checked in
// float64 against the CPU's row distribution).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <ostream>
#include <string>
#include <vector>

#include "cuda_test_util.hpp"
#include "spattn/attention.hpp"
#include "spattn/error.hpp"
#include "spattn/select.hpp"

namespace {

using namespace spattn;

// Device copy of a host tensor's storage (one dense block) with the same strides, optionally
// starting `shift` elements into the allocation (to test unaligned views).
struct DeviceTensor {
  void* ptr = nullptr;
  size_t bytes = 0;
  TensorRef ref;
  DeviceTensor(const TensorRef& host, int64_t shift = 0) {
    const size_t es = size_t(dtype_size(host.dtype));
    bytes = size_t(host.numel()) * es;
    if (cudaMalloc(&ptr, bytes + size_t(shift) * es + 16) != cudaSuccess) throw Error("cudaMalloc");
    ref = host;
    ref.data = static_cast<char*>(ptr) + shift * int64_t(es);
    ref.device = Device{DeviceKind::cuda, 0};
    upload(host);
  }
  void upload(const TensorRef& host) const {
    if (bytes && cudaMemcpy(ref.data, host.data, bytes, cudaMemcpyHostToDevice) != cudaSuccess)
      throw Error("cudaMemcpy");
  }
  DeviceTensor(const DeviceTensor&) = delete;
  DeviceTensor& operator=(const DeviceTensor&) = delete;
  ~DeviceTensor() { cudaFree(ptr); }
};

// Plan arrays in device memory for a geometry, with a host read-back.
struct DevicePlanBuffers {
  PlanBuffers buf;
  explicit DevicePlanBuffers(const PlanGeometry& geo, int64_t extra_capacity = 0) {
    buf.geo = geo;
    buf.capacity = std::max<int64_t>(geo.num_k_blocks(), 1) + extra_capacity;
    buf.device = Device{DeviceKind::cuda, 0};
    const size_t rows = size_t(std::max<int64_t>(geo.num_rows(), 1));
    void* p = nullptr;
    if (cudaMalloc(&p, rows * size_t(buf.capacity) * 4) != cudaSuccess) throw Error("cudaMalloc");
    buf.kv_index = static_cast<int32_t*>(p);
    if (cudaMalloc(&p, rows * 4) != cudaSuccess) throw Error("cudaMalloc");
    buf.num_full = static_cast<int32_t*>(p);
    if (cudaMalloc(&p, rows * 4) != cudaSuccess) throw Error("cudaMalloc");
    buf.num_partial = static_cast<int32_t*>(p);
    poison();
  }
  ~DevicePlanBuffers() {
    cudaFree(buf.kv_index);
    cudaFree(buf.num_full);
    cudaFree(buf.num_partial);
  }
  DevicePlanBuffers(const DevicePlanBuffers&) = delete;
  DevicePlanBuffers& operator=(const DevicePlanBuffers&) = delete;
  void poison() const {
    const size_t rows = size_t(std::max<int64_t>(buf.geo.num_rows(), 1));
    cudaMemset(buf.kv_index, 0xff, rows * size_t(buf.capacity) * 4);
    cudaMemset(buf.num_full, 0xff, rows * 4);
    cudaMemset(buf.num_partial, 0xff, rows * 4);
  }
  struct Host {
    std::vector<int32_t> idx, nf, np;
  };
  Host download() const {
    Host h;
    const size_t rows = size_t(buf.geo.num_rows());
    h.idx.resize(rows * size_t(buf.capacity));
    h.nf.resize(rows);
    h.np.resize(rows);
    cudaDeviceSynchronize();
    cudaMemcpy(h.idx.data(), buf.kv_index, h.idx.size() * 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(h.nf.data(), buf.num_full, rows * 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(h.np.data(), buf.num_partial, rows * 4, cudaMemcpyDeviceToHost);
    return h;
  }
};

struct Case {
  std::string name;
  int64_t B = 1, Hq = 2, Hkv = 2, Nq = 512, Nk = 512, D = 64;
  DType dtype = DType::bfloat16;
  bool bnhd = false;  // memory order B, N, H, D (else B, H, N, D)
  bool causal = false;
  int64_t wl = -1, wr = -1;
  int block_q = 128, block_k = 64;
  GqaPlan gqa = GqaPlan::per_query_head;
  std::vector<double> top_k{0.03}, top_p{0.20};
  int64_t sinks = 0, local = -1;
  double amplitude = 1.0;  // inputs uniform in [-a, a): larger values give peaked rows
  int64_t shift = 0;       // device views start this many elements into their allocation
};

std::ostream& operator<<(std::ostream& os, const Case& c) { return os << c.name; }

HybridOptions options_of(const Case& c) {
  HybridOptions o;
  o.top_k = c.top_k;
  o.top_p = c.top_p;
  o.block_q = c.block_q;
  o.block_k = c.block_k;
  o.rule.causal = c.causal;
  o.rule.window_left = c.wl;
  o.rule.window_right = c.wr;
  o.sink_blocks = c.sinks;
  o.local_blocks = c.local;
  o.gqa = c.gqa;
  return o;
}

// Rows where the GPU plan differs from the CPU plan; each must be explained by a Top-p float
// tie: every differing block sits at a ranked position whose prefix mass is within 1e-5 (relative)
// of p x row total, computed in float64 from the CPU's row distribution.
struct Comparison {
  int64_t rows = 0, mismatched = 0, unexplained = 0;
  std::string first_unexplained;
};

Comparison compare(const BlockPlan& ref, const DevicePlanBuffers::Host& got, int64_t capacity,
                   const BlockScores& scores, const HybridOptions& opt) {
  Comparison c;
  const PlanGeometry& g = ref.geometry();
  const int64_t nqb = g.num_q_blocks(), nkb = g.num_k_blocks();
  for (int64_t b = 0; b < g.batch; ++b)
    for (int64_t h = 0; h < g.heads; ++h)
      for (int64_t qb = 0; qb < nqb; ++qb) {
        const int64_t row = (b * g.heads + h) * nqb + qb;
        ++c.rows;
        const auto rf = ref.full_tiles(b, h, qb), rp = ref.partial_tiles(b, h, qb);
        const int32_t nf = got.nf[size_t(row)], np = got.np[size_t(row)];
        const int32_t* gi = got.idx.data() + row * capacity;
        bool same = nf == int32_t(rf.size()) && np == int32_t(rp.size());
        if (same) same = std::equal(rf.begin(), rf.end(), gi) && std::equal(rp.begin(), rp.end(), gi + nf);
        if (same) continue;
        ++c.mismatched;
        // The two block sets.
        std::vector<uint8_t> in_ref(static_cast<size_t>(nkb)), in_got(static_cast<size_t>(nkb));
        for (int32_t kb : ref.tiles(b, h, qb)) in_ref[size_t(kb)] = 1;
        bool sane = nf >= 0 && np >= 0 && nf + np <= nkb;
        for (int32_t i = 0; sane && i < nf + np; ++i) {
          sane = gi[i] >= 0 && gi[i] < nkb;
          if (sane) in_got[size_t(gi[i])] = 1;
        }
        // Ranked order and prefix mass from the CPU distribution.
        std::vector<int32_t> order;
        double total = 0;
        for (int64_t kb = 0; kb < nkb; ++kb)
          if (scores.at(b, h, qb, kb) >= 0) {
            order.push_back(int32_t(kb));
            total += scores.at(b, h, qb, kb);
          }
        std::stable_sort(order.begin(), order.end(), [&](int32_t x, int32_t y) {
          return scores.at(b, h, qb, x) > scores.at(b, h, qb, y);
        });
        const double p = opt.top_p.size() == 1 ? opt.top_p[0] : opt.top_p[size_t(h)];
        const double target = p * total;
        bool explained = sane && p > 0;
        double cum = 0;
        for (size_t j = 0; explained && j < order.size(); ++j) {
          const double before = cum;
          cum += scores.at(b, h, qb, order[j]);
          if (in_ref[size_t(order[j])] != in_got[size_t(order[j])])
            explained = std::abs(before - target) <= 1e-5 * total ||
                        std::abs(cum - target) <= 1e-5 * total;
        }
        if (!explained) {
          ++c.unexplained;
          if (c.first_unexplained.empty()) {
            std::string s = "row (b " + std::to_string(b) + ", h " + std::to_string(h) + ", qb " +
                            std::to_string(qb) + "): cpu";
            for (int32_t kb : ref.tiles(b, h, qb)) s += " " + std::to_string(kb);
            s += " (" + std::to_string(rf.size()) + " full); gpu";
            for (int32_t i = 0; i < std::min<int32_t>(nf + np, 64) && sane; ++i)
              s += " " + std::to_string(gi[i]);
            s += " (" + std::to_string(nf) + " full, " + std::to_string(np) + " partial)";
            c.first_unexplained = s;
          }
        }
      }
  return c;
}

class SelectCase : public ::testing::TestWithParam<Case> {};

TEST_P(SelectCase, MatchesCpu) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const Case& c = GetParam();
  const std::vector<int> order = c.bnhd ? std::vector<int>{0, 2, 1, 3} : std::vector<int>{};
  Tensor q = Tensor::empty({c.B, c.Hq, c.Nq, c.D}, c.dtype, order);
  Tensor k = Tensor::empty({c.B, c.Hkv, c.Nk, c.D}, c.dtype, order);
  static uint64_t seed = 1000;
  for (int rep = 0; rep < 2; ++rep) {  // fresh inputs each time
    fill_uniform(q, ++seed, -c.amplitude, c.amplitude);
    fill_uniform(k, ++seed, -c.amplitude, c.amplitude);
    const HybridOptions opt = options_of(c);
    const BlockPlan ref = select_hybrid(q, k, opt);
    DeviceTensor dq(q, c.shift), dk(k, c.shift);
    DevicePlanBuffers out(ref.geometry(), rep);  // rep 1: capacity larger than needed
    select_hybrid_into(dq.ref, dk.ref, opt, out.buf, nullptr);
    CUDA_OK(cudaDeviceSynchronize());
    const auto got = out.download();
    const BlockScores scores = hybrid_block_scores(q, k, opt);
    const Comparison cmp = compare(ref, got, out.buf.capacity, scores, opt);
    std::printf("[ select ] %s rep %d: %lld rows, %lld differ (%lld unexplained), density %.4f\n",
                c.name.c_str(), rep, (long long)cmp.rows, (long long)cmp.mismatched,
                (long long)cmp.unexplained, ref.density());
    RecordProperty("mismatched_rows_" + std::to_string(rep), int(cmp.mismatched));
    EXPECT_EQ(cmp.unexplained, 0) << cmp.first_unexplained;
    // The read-back must be a valid plan (sorted runs, correct full/partial split).
    if (cmp.unexplained == 0) {
      PlanView v = out.buf.view();
      v.kv_index = got.idx.data();
      v.num_full = got.nf.data();
      v.num_partial = got.np.data();
      v.device = Device{};
      EXPECT_NO_THROW(validate_plan(v, "gpu plan"));
    }
  }
}

std::vector<Case> cases() {
  std::vector<Case> v;
  auto add = [&](Case c) { v.push_back(std::move(c)); };
  {
    Case c;
    c.name = "B1_H4_N1000_D64_bf16";
    c.Hq = c.Hkv = 4;
    c.Nq = c.Nk = 1000;
    add(c);
  }
  {
    Case c;
    c.name = "B2_H3_N777_D128_fp16_bnhd_causal_sink1_local1";
    c.B = 2;
    c.Hq = c.Hkv = 3;
    c.Nq = c.Nk = 777;
    c.D = 128;
    c.dtype = DType::float16;
    c.bnhd = true;
    c.causal = true;
    c.sinks = 1;
    c.local = 1;
    add(c);
  }
  {
    Case c;
    c.name = "N300x1111_D64_f32_window200_50_blk64x32";
    c.Nq = 300;
    c.Nk = 1111;
    c.dtype = DType::float32;
    c.wl = 200;
    c.wr = 50;
    c.block_q = 64;
    c.block_k = 32;
    c.amplitude = 2;
    add(c);
  }
  {
    Case c;
    c.name = "GQA8x2_mean_N640_D128_bf16_perhead";
    c.Hq = 8;
    c.Hkv = 2;
    c.Nq = c.Nk = 640;
    c.D = 128;
    c.gqa = GqaPlan::group_mean;
    c.top_k = {0.05, 0.0};
    c.top_p = {0.3, 0.5};
    add(c);
  }
  {
    Case c;
    c.name = "GQA6x3_max_N1500_D64_bf16_bnhd_causal";
    c.Hq = 6;
    c.Hkv = 3;
    c.Nq = c.Nk = 1500;
    c.gqa = GqaPlan::group_max;
    c.bnhd = true;
    c.causal = true;
    c.amplitude = 2;
    add(c);
  }
  {
    Case c;
    c.name = "GQA4x2_perquery_N900_D64_perhead_k_p";
    c.Hq = 4;
    c.Hkv = 2;
    c.Nq = c.Nk = 900;
    c.top_k = {0.0, 0.1, 0.03, 1.0};
    c.top_p = {0.9, 0.0, 1.0, 0.2};
    add(c);
  }
  {
    Case c;
    c.name = "topk_only_N2000_D128_bf16_causal";
    c.Nq = c.Nk = 2000;
    c.D = 128;
    c.causal = true;
    c.top_p = {0.0};
    c.top_k = {0.07};
    add(c);
  }
  {
    Case c;
    c.name = "topp_only_N2000_D64_fp16_amp3";
    c.Nq = c.Nk = 2000;
    c.dtype = DType::float16;
    c.top_k = {0.0};
    c.top_p = {0.4};
    c.amplitude = 3;
    add(c);
  }
  {
    Case c;
    c.name = "none_sinks2_local0_N1024_causal";
    c.Nq = c.Nk = 1024;
    c.causal = true;
    c.top_k = {0.0};
    c.top_p = {0.0};
    c.sinks = 2;
    c.local = 0;
    add(c);
  }
  {
    Case c;
    c.name = "H2_N8192_D128_bf16_amp3";
    c.Nq = c.Nk = 8192;
    c.D = 128;
    c.amplitude = 3;
    add(c);
  }
  {
    Case c;
    c.name = "f64_D72_N600_blk32x16_causal";
    c.Nq = c.Nk = 600;
    c.D = 72;
    c.dtype = DType::float64;
    c.block_q = 32;
    c.block_k = 16;
    c.causal = true;
    add(c);
  }
  {
    Case c;
    c.name = "Nq500_Nk200_causal_empty_rows";
    c.Nq = 500;
    c.Nk = 200;
    c.block_q = 64;
    c.block_k = 32;
    c.causal = true;
    c.local = 2;
    add(c);
  }
  {
    Case c;
    c.name = "blk256x256_N3000_D64_bf16";
    c.Nq = c.Nk = 3000;
    c.block_q = c.block_k = 256;
    c.top_k = {0.2};
    add(c);
  }
  {
    Case c;
    c.name = "D36_bf16_unaligned_scalar_path_N700";
    c.Nq = c.Nk = 700;
    c.D = 36;
    c.shift = 1;
    add(c);
  }
  return v;
}

INSTANTIATE_TEST_SUITE_P(Shapes, SelectCase, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return info.param.name; });

// ---- argument checks and the host path ----------------------------------------------------------

TEST(SelectInto, HostPathEqualsSelectHybrid) {
  Tensor q = Tensor::empty({1, 2, 300, 32}, DType::float32);
  Tensor k = Tensor::empty({1, 2, 300, 32}, DType::float32);
  fill_uniform(q, 1);
  fill_uniform(k, 2);
  HybridOptions opt;
  opt.block_q = 64;
  opt.block_k = 32;
  const BlockPlan ref = select_hybrid(q, k, opt);
  PlanBuffers out;
  out.geo = hybrid_geometry(q, k, opt);
  out.capacity = out.geo.num_k_blocks() + 3;
  std::vector<int32_t> idx(size_t(out.geo.num_rows() * out.capacity)), nf(size_t(out.geo.num_rows())),
      np(nf.size());
  out.kv_index = idx.data();
  out.num_full = nf.data();
  out.num_partial = np.data();
  select_hybrid_into(q, k, opt, out);
  PlanView v = out.view();
  const BlockPlan got = BlockPlan::from_view(v);
  EXPECT_EQ(got.to_block_mask(), ref.to_block_mask());
  EXPECT_EQ(got.num_full(), ref.num_full());
}

TEST(SelectInto, RejectsBadBuffers) {
  Tensor q = Tensor::empty({1, 2, 256, 32}, DType::float32);
  Tensor k = Tensor::empty({1, 2, 256, 32}, DType::float32);
  fill_uniform(q, 1);
  fill_uniform(k, 2);
  HybridOptions opt;
  PlanBuffers out;
  out.geo = hybrid_geometry(q, k, opt);
  std::vector<int32_t> idx(64), nf(8), np(8);
  out.kv_index = idx.data();
  out.num_full = nf.data();
  out.num_partial = np.data();
  out.capacity = 1;  // needs 4
  try {
    select_hybrid_into(q, k, opt, out);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("out.capacity must be >= max(num_k_blocks, 1) = 4; got 1"),
              std::string::npos)
        << e.what();
  }
  out.capacity = 4;
  out.geo.heads = 1;
  try {
    select_hybrid_into(q, k, opt, out);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("out.geo must equal"), std::string::npos) << e.what();
  }
  if (!have_gpu()) return;
  // CUDA inputs with host buffers.
  DeviceTensor dq(q), dk(k);
  out.geo.heads = 2;
  try {
    select_hybrid_into(dq.ref, dk.ref, opt, out);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("out (plan buffers) must be on q's device"),
              std::string::npos)
        << e.what();
  }
  try {
    select_hybrid_into(dq.ref, k, opt, out);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("k must be on q's device"), std::string::npos) << e.what();
  }
}

// ---- dense plans and copies on the device ------------------------------------------------------

TEST(SelectInto, DenseAndCopyOnDevice) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  for (int variant = 0; variant < 4; ++variant) {
    PlanGeometry g;
    g.batch = 2;
    g.heads = 3;
    g.q_len = variant % 2 ? 1000 : 777;
    g.k_len = variant < 2 ? 1000 : 1333;
    g.block_q = variant == 3 ? 32 : 128;
    g.block_k = 64;
    g.rule.causal = variant != 2;
    if (variant >= 2) g.rule.window_left = 300;
    const BlockPlan ref = BlockPlan::dense(g);
    DevicePlanBuffers out(g, variant);
    dense_plan_into(out.buf);
    auto got = out.download();
    Comparison c;
    for (int64_t r = 0; r < g.num_rows(); ++r) {
      const int64_t qb = r % g.num_q_blocks(), h = (r / g.num_q_blocks()) % 3, b = r / (3 * g.num_q_blocks());
      const auto t = ref.tiles(b, h, qb);
      const auto f = ref.full_tiles(b, h, qb);
      std::vector<int32_t> gt(got.idx.begin() + r * out.buf.capacity,
                              got.idx.begin() + r * out.buf.capacity + got.nf[size_t(r)] + got.np[size_t(r)]);
      const bool ok = got.nf[size_t(r)] == int32_t(f.size()) &&
                      got.np[size_t(r)] == int32_t(t.size() - f.size()) &&
                      std::equal(f.begin(), f.end(), gt.begin());
      std::sort(gt.begin(), gt.end());
      c.mismatched += !(ok && gt == t);
    }
    EXPECT_EQ(c.mismatched, 0) << "dense variant " << variant;
    out.poison();
    copy_plan_to(ref, out.buf);
    got = out.download();
    for (int64_t r = 0; r < g.num_rows(); ++r) {
      ASSERT_EQ(got.nf[size_t(r)], ref.num_full()[size_t(r)]);
      ASSERT_EQ(got.np[size_t(r)], ref.num_partial()[size_t(r)]);
    }
  }
}

// ---- CUDA graph: selector + forward captured, replayed on new inputs ----------------------------

TEST(SelectInto, GraphCaptureSelectorAndForward) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const int64_t B = 1, H = 4, N = 2048, D = 128;
  Tensor q = Tensor::empty({B, H, N, D}, DType::bfloat16);
  Tensor k = Tensor::empty({B, H, N, D}, DType::bfloat16);
  Tensor v = Tensor::empty({B, H, N, D}, DType::bfloat16);
  fill_uniform(q, 11, -2, 2);
  fill_uniform(k, 12, -2, 2);
  fill_uniform(v, 13);
  Tensor o = Tensor::zeros({B, H, N, D}, DType::bfloat16);
  Tensor l = Tensor::zeros({B, H, N}, DType::float32);
  DeviceTensor dq(q), dk(k), dv(v), dout(o), dlse(l);
  HybridOptions opt;
  opt.rule.causal = true;
  opt.sink_blocks = 1;
  AttentionParams params;
  params.mask = opt.rule;
  DevicePlanBuffers plan(hybrid_geometry(q, k, opt));
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  params.stream = stream;
  const PlanView pv = plan.buf.view();
  auto run = [&] {
    select_hybrid_into(dq.ref, dk.ref, opt, plan.buf, stream);
    forward(dq.ref, dk.ref, dv.ref, &pv, params, dout.ref, dlse.ref);
  };
  auto read = [&](std::vector<uint16_t>& out_bits, DevicePlanBuffers::Host& p) {
    CUDA_OK(cudaStreamSynchronize(stream));
    out_bits.resize(size_t(o.numel()));
    CUDA_OK(cudaMemcpy(out_bits.data(), dout.ref.data, out_bits.size() * 2, cudaMemcpyDeviceToHost));
    p = plan.download();
  };
  // Eager run (also loads modules and sets kernel attributes outside the capture).
  run();
  std::vector<uint16_t> eager, replayed;
  DevicePlanBuffers::Host eager_plan, replay_plan;
  read(eager, eager_plan);

  cudaGraph_t graph;
  CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  run();  // any host synchronisation inside would fail the capture
  CUDA_OK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec;
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  plan.poison();
  CUDA_OK(cudaMemset(dout.ref.data, 0xff, dout.bytes));
  CUDA_OK(cudaGraphLaunch(exec, stream));
  read(replayed, replay_plan);
  EXPECT_EQ(replay_plan.nf, eager_plan.nf);
  EXPECT_EQ(replay_plan.np, eager_plan.np);
  EXPECT_EQ(replay_plan.idx, eager_plan.idx);
  EXPECT_TRUE(replayed == eager) << "graph replay output differs from the eager run";

  // New inputs in the same buffers: the replay must select from them, like an eager run does.
  fill_uniform(q, 21, -2, 2);
  fill_uniform(k, 22, -2, 2);
  dq.upload(q);
  dk.upload(k);
  CUDA_OK(cudaGraphLaunch(exec, stream));
  read(replayed, replay_plan);
  run();
  read(eager, eager_plan);
  EXPECT_EQ(replay_plan.idx, eager_plan.idx);
  EXPECT_EQ(replay_plan.nf, eager_plan.nf);
  EXPECT_TRUE(replayed == eager);
  // And that plan is the CPU selector's.
  const BlockPlan ref = select_hybrid(q, k, opt);
  const Comparison cmp = compare(ref, eager_plan, plan.buf.capacity, hybrid_block_scores(q, k, opt), opt);
  EXPECT_EQ(cmp.unexplained, 0) << cmp.first_unexplained;

  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

}  // namespace
