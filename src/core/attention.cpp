// Argument validation and backend dispatch for the attention entry points.
#include "spattn/attention.hpp"

#include <cmath>

#include "core/problem.hpp"
#include "cpu/cpu_attention.hpp"
#include "cuda/cuda_attention.hpp"
#include "spattn/error.hpp"

namespace spattn {

namespace detail {
namespace {

void check_tensor(const char* where, const char* name, const TensorRef& t, int rank) {
  SPATTN_CHECK(t.data != nullptr || t.numel() == 0, where, ": ", name,
               " must point to memory; got a null pointer");
  SPATTN_CHECK(t.rank == rank, where, ": ", name, " must have rank ", rank, "; got rank ",
               t.rank, " with shape ", t.shape_string());
}

void check_shape(const char* where, const char* name, const TensorRef& t,
                 std::initializer_list<int64_t> expected) {
  int d = 0;
  bool same = int(expected.size()) == t.rank;
  for (int64_t e : expected) same = same && t.shape[d++] == e;
  if (same) return;
  std::string want = "(";
  d = 0;
  for (int64_t e : expected) want += (d++ ? ", " : "") + std::to_string(e);
  want += ")";
  detail::throw_error(where, ": ", name, " must have shape ", want, "; got ", t.shape_string());
}

void check_same(const char* where, const char* name, const TensorRef& t, const TensorRef& q) {
  SPATTN_CHECK(t.dtype == q.dtype, where, ": ", name, " must have q's dtype ",
               dtype_name(q.dtype), "; got ", dtype_name(t.dtype));
  SPATTN_CHECK(t.device == q.device, where, ": ", name, " must be on q's device ",
               to_string(q.device), "; got ", to_string(t.device));
}

// Kernels read each (b, h, n) row of D elements as one run: the last dim must be unit-stride.
void check_rows(const char* where, const char* name, const TensorRef& t) {
  SPATTN_CHECK(t.shape[t.rank - 1] <= 1 || t.stride[t.rank - 1] == 1, where, ": ", name,
               " must have unit stride in its last dimension; got stride ",
               t.stride[t.rank - 1]);
}

AttentionProblem check_common(const char* where, const TensorRef& q, const TensorRef& k,
                              const TensorRef& v, const PlanView* plan,
                              const AttentionParams& params) {
  check_tensor(where, "q", q, 4);
  check_tensor(where, "k", k, 4);
  check_tensor(where, "v", v, 4);
  check_same(where, "k", k, q);
  check_same(where, "v", v, q);
  check_rows(where, "q", q);
  check_rows(where, "k", k);
  check_rows(where, "v", v);

  AttentionProblem p;
  p.batch = q.shape[0];
  p.heads_q = q.shape[1];
  p.q_len = q.shape[2];
  p.dim_qk = q.shape[3];
  p.heads_kv = k.shape[1];
  p.k_len = k.shape[2];
  p.dim_v = v.shape[3];
  p.dtype = q.dtype;
  SPATTN_CHECK(k.shape[0] == p.batch, where, ": k.shape[0] (batch) must equal q's ", p.batch,
               "; got ", k.shape[0]);
  SPATTN_CHECK(k.shape[3] == p.dim_qk, where, ": k.shape[3] (head dim) must equal q's ",
               p.dim_qk, "; got ", k.shape[3]);
  check_shape(where, "v", v, {p.batch, p.heads_kv, p.k_len, p.dim_v});
  SPATTN_CHECK(p.heads_kv >= 1 && p.heads_q % p.heads_kv == 0, where,
               ": q heads must be a multiple of k heads (GQA); got q heads ", p.heads_q,
               ", k heads ", p.heads_kv);

  const Support s = backend_supports(q.device, q.dtype, p.dim_qk, p.dim_v);
  SPATTN_CHECK(s.ok, where, ": ", s.reason);

  SPATTN_CHECK(params.scale >= 0.0 && std::isfinite(params.scale), where,
               ": params.scale must be finite and >= 0 (0 = 1/sqrt(D)); got ", params.scale);
  SPATTN_CHECK(params.num_threads >= 0, where, ": params.num_threads must be >= 0; got ",
               params.num_threads);
  SPATTN_CHECK(params.mask.window_left >= -1 && params.mask.window_right >= -1, where,
               ": params.mask window sizes must be >= 0 or -1 (unbounded); got (",
               params.mask.window_left, ", ", params.mask.window_right, ")");
  p.scale = params.scale > 0.0 ? params.scale : 1.0 / std::sqrt(double(std::max<int64_t>(p.dim_qk, 1)));
  p.rule = params.mask;
  p.num_threads = params.num_threads;
  p.stream = params.stream;

  if (plan != nullptr) {
    const PlanGeometry& g = plan->geo;
    SPATTN_CHECK(g.q_len == p.q_len && g.k_len == p.k_len, where,
                 ": plan geometry must match q/k lengths (", p.q_len, ", ", p.k_len,
                 "); got plan q_len=", g.q_len, ", k_len=", g.k_len);
    SPATTN_CHECK(g.batch == 1 || g.batch == p.batch, where, ": plan batch must be 1 or ",
                 p.batch, "; got ", g.batch);
    SPATTN_CHECK(g.heads == 1 || g.heads == p.heads_kv || g.heads == p.heads_q, where,
                 ": plan heads must be 1, the k heads (", p.heads_kv, ") or the q heads (",
                 p.heads_q, "); got ", g.heads);
    SPATTN_CHECK(g.rule == params.mask, where,
                 ": params.mask must equal the rule the plan was built with (",
                 g.rule.to_string(), "); got ", params.mask.to_string());
    SPATTN_CHECK(plan->device == q.device, where, ": plan must be on q's device ",
                 to_string(q.device), "; got ", to_string(plan->device));
    validate_plan(*plan, where);
    p.plan = plan;
  }
  return p;
}

}  // namespace

AttentionProblem check_forward(const char* where, const TensorRef& q, const TensorRef& k,
                               const TensorRef& v, const PlanView* plan,
                               const AttentionParams& params, const TensorRef& out,
                               const TensorRef& lse) {
  AttentionProblem p = check_common(where, q, k, v, plan, params);
  check_tensor(where, "out", out, 4);
  check_same(where, "out", out, q);
  check_rows(where, "out", out);
  check_shape(where, "out", out, {p.batch, p.heads_q, p.q_len, p.dim_v});
  check_tensor(where, "lse", lse, 3);
  SPATTN_CHECK(lse.dtype == lse_dtype(p.dtype), where, ": lse must have dtype ",
               dtype_name(lse_dtype(p.dtype)), "; got ", dtype_name(lse.dtype));
  SPATTN_CHECK(lse.device == q.device, where, ": lse must be on q's device ",
               to_string(q.device), "; got ", to_string(lse.device));
  check_shape(where, "lse", lse, {p.batch, p.heads_q, p.q_len});
  return p;
}

AttentionProblem check_backward(const char* where, const TensorRef& q, const TensorRef& k,
                                const TensorRef& v, const TensorRef& out, const TensorRef& lse,
                                const TensorRef& dout, const PlanView* plan,
                                const AttentionParams& params, const TensorRef& dq,
                                const TensorRef& dk, const TensorRef& dv) {
  AttentionProblem p = check_forward(where, q, k, v, plan, params, out, lse);
  const std::pair<const char*, const TensorRef*> grads[] = {
      {"dout", &dout}, {"dq", &dq}, {"dk", &dk}, {"dv", &dv}};
  for (const auto& [name, t] : grads) {
    check_tensor(where, name, *t, 4);
    check_same(where, name, *t, q);
    check_rows(where, name, *t);
  }
  check_shape(where, "dout", dout, {p.batch, p.heads_q, p.q_len, p.dim_v});
  check_shape(where, "dq", dq, {p.batch, p.heads_q, p.q_len, p.dim_qk});
  check_shape(where, "dk", dk, {p.batch, p.heads_kv, p.k_len, p.dim_qk});
  check_shape(where, "dv", dv, {p.batch, p.heads_kv, p.k_len, p.dim_v});
  return p;
}

}  // namespace detail

Support backend_supports(Device device, DType dtype, int64_t head_dim_qk, int64_t head_dim_v) {
  return device.kind == DeviceKind::cpu ? cpu::supports(dtype, head_dim_qk, head_dim_v)
                                        : cuda::supports(dtype, head_dim_qk, head_dim_v);
}

bool cuda_backend_available() { return cuda::available(); }

void forward(const TensorRef& q, const TensorRef& k, const TensorRef& v, const PlanView* plan,
             const AttentionParams& params, const TensorRef& out, const TensorRef& lse) {
  const auto p = detail::check_forward("forward", q, k, v, plan, params, out, lse);
  if (q.device.kind == DeviceKind::cpu)
    cpu::forward(p, q, k, v, out, lse);
  else
    cuda::forward(p, q, k, v, out, lse);
}

void backward(const TensorRef& q, const TensorRef& k, const TensorRef& v, const TensorRef& out,
              const TensorRef& lse, const TensorRef& dout, const PlanView* plan,
              const AttentionParams& params, const TensorRef& dq, const TensorRef& dk,
              const TensorRef& dv) {
  const auto p =
      detail::check_backward("backward", q, k, v, out, lse, dout, plan, params, dq, dk, dv);
  if (q.device.kind == DeviceKind::cpu)
    cpu::backward(p, q, k, v, out, lse, dout, dq, dk, dv);
  else
    cuda::backward(p, q, k, v, out, lse, dout, dq, dk, dv);
}

ForwardResult forward(const TensorRef& q, const TensorRef& k, const TensorRef& v,
                      const BlockPlan* plan, const AttentionParams& params) {
  SPATTN_CHECK(q.device.kind == DeviceKind::cpu,
               "forward: the allocating overload takes host tensors; got q on ",
               to_string(q.device));
  SPATTN_CHECK(q.rank == 4 && v.rank == 4, "forward: q and v must have rank 4; got ", q.rank,
               " and ", v.rank);
  ForwardResult r;
  r.out = Tensor::empty({q.shape[0], q.shape[1], q.shape[2], v.shape[3]}, q.dtype);
  r.lse = Tensor::empty({q.shape[0], q.shape[1], q.shape[2]}, detail::lse_dtype(q.dtype));
  PlanView view;
  if (plan) view = plan->view();
  forward(q, k, v, plan ? &view : nullptr, params, r.out, r.lse);
  return r;
}

Gradients backward(const TensorRef& q, const TensorRef& k, const TensorRef& v,
                   const TensorRef& out, const TensorRef& lse, const TensorRef& dout,
                   const BlockPlan* plan, const AttentionParams& params) {
  SPATTN_CHECK(q.device.kind == DeviceKind::cpu,
               "backward: the allocating overload takes host tensors; got q on ",
               to_string(q.device));
  SPATTN_CHECK(q.rank == 4 && k.rank == 4 && v.rank == 4,
               "backward: q, k and v must have rank 4; got ", q.rank, ", ", k.rank, ", ", v.rank);
  Gradients g;
  g.dq = Tensor::empty({q.shape[0], q.shape[1], q.shape[2], q.shape[3]}, q.dtype);
  g.dk = Tensor::empty({k.shape[0], k.shape[1], k.shape[2], k.shape[3]}, q.dtype);
  g.dv = Tensor::empty({v.shape[0], v.shape[1], v.shape[2], v.shape[3]}, q.dtype);
  PlanView view;
  if (plan) view = plan->view();
  backward(q, k, v, out, lse, dout, plan ? &view : nullptr, params, g.dq, g.dk, g.dv);
  return g;
}

}  // namespace spattn
