// Plan writers that fill caller-provided arrays (PlanBuffers), dispatched by device: host
// inputs run the CPU builders and copy; CUDA inputs run the GPU kernels (src/cuda/select/).
// Everything that does not depend on the device is checked here, once, with the same messages
// for both paths.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "cuda/select/select_cuda.hpp"
#include "spattn/error.hpp"
#include "spattn/select.hpp"

namespace spattn {

namespace {

void check_options(const char* where, const TensorRef& q, const TensorRef& k,
                   const HybridOptions& opt) {
  for (auto [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}}) {
    SPATTN_CHECK(t->rank == 4, where, ": ", name, " must have rank 4 (B, H, N, D); got ",
                 t->shape_string());
    SPATTN_CHECK(t->data != nullptr || t->numel() == 0, where, ": ", name,
                 " must point to memory; got a null pointer");
  }
  SPATTN_CHECK(k.device == q.device, where, ": k must be on q's device ", to_string(q.device),
               "; got ", to_string(k.device));
  SPATTN_CHECK(q.shape[0] >= 1, where, ": batch must be >= 1; got ", q.shape[0]);
  SPATTN_CHECK(k.shape[0] == q.shape[0], where, ": k.shape[0] (batch) must equal q's ",
               q.shape[0], "; got ", k.shape[0]);
  SPATTN_CHECK(k.shape[3] == q.shape[3], where, ": k.shape[3] (head dim) must equal q's ",
               q.shape[3], "; got ", k.shape[3]);
  SPATTN_CHECK(k.shape[1] >= 1 && q.shape[1] % k.shape[1] == 0, where,
               ": q heads must be a multiple of k heads (GQA); got q heads ", q.shape[1],
               ", k heads ", k.shape[1]);
  SPATTN_CHECK(opt.scale >= 0.0 && std::isfinite(opt.scale), where,
               ": scale must be finite and >= 0 (0 = 1/sqrt(D)); got ", opt.scale);
  SPATTN_CHECK(opt.sink_blocks >= 0, where, ": sink_blocks must be >= 0; got ", opt.sink_blocks);
  SPATTN_CHECK(opt.local_blocks >= -1, where,
               ": local_blocks must be >= 0 or -1 (off); got ", opt.local_blocks);
  const int64_t plan_heads = opt.gqa == GqaPlan::per_query_head ? q.shape[1] : k.shape[1];
  for (auto [v, name] : {std::pair{&opt.top_k, "top_k"}, std::pair{&opt.top_p, "top_p"}}) {
    SPATTN_CHECK(v->size() == 1 || int64_t(v->size()) == plan_heads, where, ": ", name,
                 " must have 1 or ", plan_heads, " (plan heads) entries; got ", v->size());
    for (double x : *v)
      SPATTN_CHECK(x >= 0.0 && x <= 1.0, where, ": ", name, " values must be in [0, 1]; got ",
                   x);
  }
}

// out must describe `expected` (the plan the writer produces) with room for every row.
void check_buffers(const char* where, const PlanBuffers& out, const PlanGeometry& expected) {
  const PlanGeometry& g = out.geo;
  SPATTN_CHECK(g == expected, where,
               ": out.geo must equal the plan's geometry (batch ", expected.batch, ", heads ",
               expected.heads, ", q_len ", expected.q_len, ", k_len ", expected.k_len,
               ", blocks ", expected.block_q, "x", expected.block_k, ", rule ",
               expected.rule.to_string(), "); got batch ", g.batch, ", heads ", g.heads,
               ", q_len ", g.q_len, ", k_len ", g.k_len, ", blocks ", g.block_q, "x", g.block_k,
               ", rule ", g.rule.to_string());
  const int64_t need = std::max<int64_t>(g.num_k_blocks(), 1);
  SPATTN_CHECK(out.capacity >= need, where,
               ": out.capacity must be >= max(num_k_blocks, 1) = ", need, "; got ",
               out.capacity);
  if (g.num_rows() > 0)
    SPATTN_CHECK(out.kv_index && out.num_full && out.num_partial, where,
                 ": out.kv_index, out.num_full and out.num_partial must point to memory; got ",
                 out.kv_index ? "" : "kv_index ", out.num_full ? "" : "num_full ",
                 out.num_partial ? "" : "num_partial ", "null");
}

void copy_to_host(const BlockPlan& plan, const PlanBuffers& out) {
  const int64_t rows = plan.geometry().num_rows();
  if (rows == 0) return;
  const int64_t cap = int64_t(plan.kv_index().size()) / rows;
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(out.kv_index + r * out.capacity, plan.kv_index().data() + r * cap,
                size_t(cap) * sizeof(int32_t));
  std::memcpy(out.num_full, plan.num_full().data(), size_t(rows) * sizeof(int32_t));
  std::memcpy(out.num_partial, plan.num_partial().data(), size_t(rows) * sizeof(int32_t));
}

}  // namespace

PlanGeometry hybrid_geometry(const TensorRef& q, const TensorRef& k, const HybridOptions& opt) {
  check_options("hybrid_geometry", q, k, opt);
  PlanGeometry g;
  g.batch = q.shape[0];
  g.heads = opt.gqa == GqaPlan::per_query_head ? q.shape[1] : k.shape[1];
  g.q_len = q.shape[2];
  g.k_len = k.shape[2];
  g.block_q = opt.block_q;
  g.block_k = opt.block_k;
  g.rule = opt.rule;
  g.validate("hybrid_geometry");
  return g;
}

void select_hybrid_into(const TensorRef& q, const TensorRef& k, const HybridOptions& opt,
                        const PlanBuffers& out, void* stream) {
  constexpr const char* where = "select_hybrid_into";
  check_options(where, q, k, opt);
  PlanGeometry g;
  g.batch = q.shape[0];
  g.heads = opt.gqa == GqaPlan::per_query_head ? q.shape[1] : k.shape[1];
  g.q_len = q.shape[2];
  g.k_len = k.shape[2];
  g.block_q = opt.block_q;
  g.block_k = opt.block_k;
  g.rule = opt.rule;
  g.validate(where);
  check_buffers(where, out, g);
  if (q.device.kind == DeviceKind::cpu) {
    copy_plan_to(select_hybrid(q, k, opt), out, stream);
    return;
  }
  cuda::select_hybrid(q, k, opt, out, stream);
}

void copy_plan_to(const BlockPlan& host_plan, const PlanBuffers& out, void* stream) {
  check_buffers("copy_plan_to", out, host_plan.geometry());
  if (out.device.kind == DeviceKind::cpu)
    copy_to_host(host_plan, out);
  else
    cuda::copy_plan(host_plan, out, stream);
}

void dense_plan_into(const PlanBuffers& out, void* stream) {
  out.geo.validate("dense_plan_into");
  check_buffers("dense_plan_into", out, out.geo);
  if (out.device.kind == DeviceKind::cpu)
    copy_to_host(BlockPlan::dense(out.geo), out);
  else
    cuda::dense_plan(out, stream);
}

}  // namespace spattn
