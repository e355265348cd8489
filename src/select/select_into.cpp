// Plan writers that fill caller-provided arrays (PlanBuffers), dispatched by device: host
// inputs run the CPU builders and copy; CUDA inputs run the GPU kernels (src/cuda/select/).
// Everything that does not depend on the device is checked here, once, with the same messages
// for both paths.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "cuda/select/select_cuda.hpp"
#include "select/hybrid_inputs.hpp"
#include "spattn/error.hpp"
#include "spattn/select.hpp"

namespace spattn {

namespace {

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
  detail::check_hybrid_inputs("hybrid_geometry", q, k, opt);
  return detail::hybrid_plan_geometry("hybrid_geometry", q, k, opt);
}

void select_hybrid_into(const TensorRef& q, const TensorRef& k, const HybridOptions& opt,
                        const PlanBuffers& out, void* stream) {
  constexpr const char* where = "select_hybrid_into";
  detail::check_hybrid_inputs(where, q, k, opt);
  const PlanGeometry g = detail::hybrid_plan_geometry(where, q, k, opt);
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
