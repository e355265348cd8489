// spattn._C: the nanobind bridge between Python arrays and the C++ entry points.
//
// Arrays arrive through DLPack (torch CPU/CUDA tensors, NumPy arrays, anything exporting
// __dlpack__) and become spattn::TensorRef views of the same memory: no copies, no libtorch.
// Outputs are allocated by the caller (the torch custom ops) and passed in as views, so this
// module never owns tensor memory except for host plan arrays it builds, which it returns as
// NumPy arrays that torch.from_numpy wraps without copying.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "convert.hpp"
#include "spattn/attention.hpp"
#include "spattn/error.hpp"
#include "spattn/plan.hpp"
#include "spattn/tensor.hpp"

namespace nb = nanobind;
using namespace nb::literals;
using namespace spattn_py;

#if __has_include("spattn/select.hpp")
void bind_select(nb::module_& m);  // select_bindings.cpp
#define SPATTN_PY_SELECT 1
#endif

namespace {

std::optional<spattn::PlanView> plan_view(const char* where,
                                          const std::optional<InArray>& kv_index,
                                          const std::optional<InArray>& num_full,
                                          const std::optional<InArray>& num_partial,
                                          int block_q, int block_k, const spattn::TensorRef& q,
                                          const spattn::TensorRef& k,
                                          const spattn::MaskRule& rule) {
  const int given =
      int(kv_index.has_value()) + int(num_full.has_value()) + int(num_partial.has_value());
  if (given == 0) return std::nullopt;
  SPATTN_CHECK(given == 3, where,
               ": kv_index, num_full and num_partial must be given together or not at all; got ",
               given, " of 3");
  SPATTN_CHECK(q.rank == 4 && k.rank == 4, where, ": q and k must have rank 4; got ", q.rank,
               " and ", k.rank);
  // Lengths come from q and k; the C++ entry point then checks the plan against them.
  return make_plan_view(where, *kv_index, *num_full, *num_partial, q.shape[2], k.shape[2],
                        block_q, block_k, rule, q.device);
}

spattn::AttentionParams make_params(double scale, const spattn::MaskRule& rule, uintptr_t stream,
                                    int num_threads) {
  spattn::AttentionParams p;
  p.scale = scale;
  p.mask = rule;
  p.num_threads = num_threads;
  p.stream = reinterpret_cast<void*>(stream);
  return p;
}

void forward(const InArray& q, const InArray& k, const InArray& v, const OutArray& out,
             const OutArray& lse, const std::optional<InArray>& kv_index,
             const std::optional<InArray>& num_full, const std::optional<InArray>& num_partial,
             int block_q, int block_k, double scale, bool causal, int64_t window_left,
             int64_t window_right, uintptr_t stream, int num_threads) {
  const char* where = "forward";
  const auto rq = to_ref(where, "q", q), rk = to_ref(where, "k", k), rv = to_ref(where, "v", v);
  const auto rout = to_ref(where, "out", out), rlse = to_ref(where, "lse", lse);
  const spattn::MaskRule rule = make_rule(causal, window_left, window_right);
  const auto plan =
      plan_view(where, kv_index, num_full, num_partial, block_q, block_k, rq, rk, rule);
  const auto params = make_params(scale, rule, stream, num_threads);
  nb::gil_scoped_release release;
  spattn::forward(rq, rk, rv, plan ? &*plan : nullptr, params, rout, rlse);
}

void backward(const InArray& q, const InArray& k, const InArray& v, const InArray& out,
              const InArray& lse, const InArray& dout, const OutArray& dq, const OutArray& dk,
              const OutArray& dv, const std::optional<InArray>& kv_index,
              const std::optional<InArray>& num_full, const std::optional<InArray>& num_partial,
              int block_q, int block_k, double scale, bool causal, int64_t window_left,
              int64_t window_right, uintptr_t stream, int num_threads) {
  const char* where = "backward";
  const auto rq = to_ref(where, "q", q), rk = to_ref(where, "k", k), rv = to_ref(where, "v", v);
  const auto rout = to_ref(where, "out", out), rlse = to_ref(where, "lse", lse);
  const auto rdout = to_ref(where, "dout", dout);
  const auto rdq = to_ref(where, "dq", dq), rdk = to_ref(where, "dk", dk),
             rdv = to_ref(where, "dv", dv);
  const spattn::MaskRule rule = make_rule(causal, window_left, window_right);
  const auto plan =
      plan_view(where, kv_index, num_full, num_partial, block_q, block_k, rq, rk, rule);
  const auto params = make_params(scale, rule, stream, num_threads);
  nb::gil_scoped_release release;
  spattn::backward(rq, rk, rv, rout, rlse, rdout, plan ? &*plan : nullptr, params, rdq, rdk,
                   rdv);
}

// ---- host plans -------------------------------------------------------------------------------

PlanArrays plan_dense(int64_t batch, int64_t heads, int64_t q_len, int64_t k_len, int block_q,
                      int block_k, bool causal, int64_t window_left, int64_t window_right) {
  const char* where = "BlockPlan.dense";
  SPATTN_CHECK(batch >= 1 && heads >= 1, where, ": batch and heads must be >= 1; got ", batch,
               " and ", heads);
  const auto geo = make_geometry(batch, heads, q_len, k_len, block_q, block_k,
                                 make_rule(causal, window_left, window_right));
  geo.validate(where);
  return plan_arrays(spattn::BlockPlan::dense(geo));
}

// mask: (batch, heads, num_q_blocks, num_k_blocks) host array of bool/uint8, nonzero = keep.
PlanArrays plan_from_block_mask(const InArray& mask, int64_t q_len, int64_t k_len, int block_q,
                                int block_k, bool causal, int64_t window_left,
                                int64_t window_right) {
  const char* where = "BlockPlan.from_dense";
  using nb::dlpack::dtype_code;
  const nb::dlpack::dtype t = mask.dtype();
  SPATTN_CHECK((t.code == uint8_t(dtype_code::Bool) || t.code == uint8_t(dtype_code::UInt) ||
                t.code == uint8_t(dtype_code::Int)) &&
                   t.bits == 8 && t.lanes == 1,
               where, ": mask must have dtype bool or uint8; got ", dlpack_dtype_name(t));
  SPATTN_CHECK(mask.ndim() == 4, where,
               ": mask must have rank 4 (batch, heads, num_q_blocks, num_k_blocks); got rank ",
               mask.ndim());
  const spattn::Device dev = to_device(where, "mask", mask.device_type(), mask.device_id());
  SPATTN_CHECK(dev.kind == spattn::DeviceKind::cpu, where,
               ": mask must be in host memory; got ", spattn::to_string(dev));
  const auto geo = make_geometry(int64_t(mask.shape(0)), int64_t(mask.shape(1)), q_len, k_len,
                                 block_q, block_k, make_rule(causal, window_left, window_right));
  geo.validate(where);
  SPATTN_CHECK(int64_t(mask.shape(2)) == geo.num_q_blocks() &&
                   int64_t(mask.shape(3)) == geo.num_k_blocks(),
               where, ": mask must have shape (batch, heads, ", geo.num_q_blocks(), ", ",
               geo.num_k_blocks(), ") for q_len=", q_len, ", k_len=", k_len, ", block_q=",
               block_q, ", block_k=", block_k, "; got (", mask.shape(0), ", ", mask.shape(1),
               ", ", mask.shape(2), ", ", mask.shape(3), ")");
  // Gather through strides so any layout works; the C++ builder takes a dense row-major map.
  std::vector<uint8_t> dense(mask.size());
  const auto* base = static_cast<const uint8_t*>(mask.data());
  size_t n = 0;
  for (size_t i0 = 0; i0 < mask.shape(0); ++i0)
    for (size_t i1 = 0; i1 < mask.shape(1); ++i1)
      for (size_t i2 = 0; i2 < mask.shape(2); ++i2)
        for (size_t i3 = 0; i3 < mask.shape(3); ++i3)
          dense[n++] = base[int64_t(i0) * mask.stride(0) + int64_t(i1) * mask.stride(1) +
                            int64_t(i2) * mask.stride(2) + int64_t(i3) * mask.stride(3)] != 0;
  return plan_arrays(spattn::BlockPlan::from_block_mask(geo, dense));
}

// Full content validation of a host plan; device plans are checked by geometry only, like the
// C++ entry points do, so validating never reads device memory.
void validate_plan(const InArray& kv_index, const InArray& num_full, const InArray& num_partial,
                   int64_t q_len, int64_t k_len, int block_q, int block_k, bool causal,
                   int64_t window_left, int64_t window_right) {
  const char* where = "BlockPlan";
  const spattn::Device device =
      to_device(where, "kv_index", kv_index.device_type(), kv_index.device_id());
  const spattn::PlanView v =
      make_plan_view(where, kv_index, num_full, num_partial, q_len, k_len, block_q, block_k,
                     make_rule(causal, window_left, window_right), device);
  spattn::validate_plan(v, where);
}

std::pair<bool, std::string> backend_supports(const std::string& device, const std::string& dtype,
                                              int64_t head_dim_qk, int64_t head_dim_v) {
  spattn::Device d;
  if (device == "cuda")
    d.kind = spattn::DeviceKind::cuda;
  else
    SPATTN_CHECK(device == "cpu", "backend_supports: device must be 'cpu' or 'cuda'; got '",
                 device, "'");
  spattn::DType t;
  if (dtype == "float32") t = spattn::DType::float32;
  else if (dtype == "bfloat16") t = spattn::DType::bfloat16;
  else if (dtype == "float16") t = spattn::DType::float16;
  else if (dtype == "float64") t = spattn::DType::float64;
  else
    spattn::detail::throw_error(
        "backend_supports: dtype must be float32, bfloat16, float16 or float64; got '", dtype,
        "'");
  const spattn::Support s = spattn::backend_supports(d, t, head_dim_qk, head_dim_v);
  return {s.ok, s.reason};
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "spattn C++ bindings (DLPack views, no libtorch). Use the spattn package instead.";
  m.attr("__version__") = SPATTN_VERSION;

  // spattn::Error -> spattn.SpattnError (a ValueError): the message names the argument.
  nb::exception<spattn::Error>(m, "SpattnError", PyExc_ValueError);

  m.def("forward", &forward, "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a, "kv_index"_a.none(),
        "num_full"_a.none(), "num_partial"_a.none(), "block_q"_a, "block_k"_a, "scale"_a,
        "causal"_a, "window_left"_a, "window_right"_a, "stream"_a = 0, "num_threads"_a = 0,
        "Writes out (B, Hq, Nq, Dv) and lse (B, Hq, Nq). Without plan arrays: dense under the "
        "rule.");
  m.def("backward", &backward, "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a, "dout"_a, "dq"_a, "dk"_a,
        "dv"_a, "kv_index"_a.none(), "num_full"_a.none(), "num_partial"_a.none(), "block_q"_a,
        "block_k"_a, "scale"_a, "causal"_a, "window_left"_a, "window_right"_a, "stream"_a = 0,
        "num_threads"_a = 0, "Writes dq, dk, dv from the forward's out and lse.");

  m.def("plan_dense", &plan_dense, "batch"_a, "heads"_a, "q_len"_a, "k_len"_a, "block_q"_a,
        "block_k"_a, "causal"_a, "window_left"_a, "window_right"_a,
        "Plan arrays listing every tile the rule keeps.");
  m.def("plan_from_block_mask", &plan_from_block_mask, "mask"_a, "q_len"_a, "k_len"_a,
        "block_q"_a, "block_k"_a, "causal"_a, "window_left"_a, "window_right"_a,
        "Plan arrays from a (batch, heads, nqb, nkb) block map; tiles the rule empties drop.");
  m.def("validate_plan", &validate_plan, "kv_index"_a, "num_full"_a, "num_partial"_a, "q_len"_a,
        "k_len"_a, "block_q"_a, "block_k"_a, "causal"_a, "window_left"_a, "window_right"_a,
        "Checks a plan; contents are read only for host arrays.");

  m.def("backend_supports", &backend_supports, "device"_a, "dtype"_a, "head_dim_qk"_a,
        "head_dim_v"_a, "(ok, reason): whether the backend for device runs this case.");
  m.def("cuda_backend_available", &spattn::cuda_backend_available,
        "Whether the CUDA backend is compiled in and a device is visible.");

#ifdef SPATTN_PY_SELECT
  m.attr("has_select") = true;
  bind_select(m);
#else
  m.attr("has_select") = false;
#endif
}
