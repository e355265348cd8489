// Conversions shared by the binding files: DLPack arrays -> TensorRef / plan views, owning host
// vectors -> NumPy arrays, host plan arrays <-> spattn::BlockPlan.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <tuple>
#include <vector>

#include "spattn/error.hpp"
#include "spattn/plan.hpp"
#include "spattn/tensor.hpp"

namespace spattn_py {

namespace nb = nanobind;

// Inputs are read-only views so read-only NumPy arrays are accepted; outputs must be writable.
using InArray = nb::ndarray<nb::ro>;
using OutArray = nb::ndarray<>;

inline std::string dlpack_dtype_name(nb::dlpack::dtype t) {
  using nb::dlpack::dtype_code;
  const char* base = "unknown";
  switch (dtype_code(t.code)) {
    case dtype_code::Int: base = "int"; break;
    case dtype_code::UInt: base = "uint"; break;
    case dtype_code::Float: base = "float"; break;
    case dtype_code::Bfloat: base = "bfloat"; break;
    case dtype_code::Complex: base = "complex"; break;
    case dtype_code::Bool: return "bool";
    default: break;
  }
  std::string name = base + std::to_string(int(t.bits));
  if (t.lanes != 1) name += "x" + std::to_string(int(t.lanes));
  return name;
}

inline spattn::Device to_device(const char* where, const char* name, int type, int id) {
  // Pinned host memory is ordinary host memory for the CPU backend.
  if (type == nb::device::cpu::value || type == nb::device::cuda_host::value)
    return {spattn::DeviceKind::cpu, 0};
  if (type == nb::device::cuda::value) return {spattn::DeviceKind::cuda, id};
  spattn::detail::throw_error(where, ": ", name,
                              " must be in host or CUDA device memory; got DLPack device type ",
                              type);
}

// DLPack view -> TensorRef. dtype codes follow DLPack: bfloat16 is (kDLBfloat, 16).
template <class Array>
spattn::TensorRef to_ref(const char* where, const char* name, const Array& a) {
  using nb::dlpack::dtype_code;
  const nb::dlpack::dtype t = a.dtype();
  const bool scalar = t.lanes == 1;
  spattn::DType dtype;
  if (scalar && t.code == uint8_t(dtype_code::Float) && t.bits == 32)
    dtype = spattn::DType::float32;
  else if (scalar && t.code == uint8_t(dtype_code::Float) && t.bits == 64)
    dtype = spattn::DType::float64;
  else if (scalar && t.code == uint8_t(dtype_code::Float) && t.bits == 16)
    dtype = spattn::DType::float16;
  else if (scalar && t.code == uint8_t(dtype_code::Bfloat) && t.bits == 16)
    dtype = spattn::DType::bfloat16;
  else
    spattn::detail::throw_error(where, ": ", name,
                                " must have dtype float32, bfloat16, float16 or float64; got ",
                                dlpack_dtype_name(t));
  SPATTN_CHECK(a.ndim() <= size_t(spattn::kMaxRank), where, ": ", name, " must have rank <= ",
               spattn::kMaxRank, "; got rank ", a.ndim());
  spattn::TensorRef r;
  r.data = const_cast<void*>(static_cast<const void*>(a.data()));
  r.dtype = dtype;
  r.device = to_device(where, name, a.device_type(), a.device_id());
  r.rank = int(a.ndim());
  for (int d = 0; d < r.rank; ++d) {
    r.shape[d] = int64_t(a.shape(d));
    r.stride[d] = a.stride(d);
    SPATTN_CHECK(r.stride[d] >= 0 || r.shape[d] <= 1, where, ": ", name,
                 " must have non-negative strides; got stride ", r.stride[d], " in dimension ",
                 d);
  }
  return r;
}

// Plan arrays must be dense int32 in C order: kernels index them as flat arrays. A negative
// entry in `shape` accepts any extent.
template <class Array>
const int32_t* plan_array(const char* where, const char* name, const Array& a,
                          std::initializer_list<int64_t> shape, spattn::Device device) {
  using nb::dlpack::dtype_code;
  const nb::dlpack::dtype t = a.dtype();
  SPATTN_CHECK(t.code == uint8_t(dtype_code::Int) && t.bits == 32 && t.lanes == 1, where, ": ",
               name, " must have dtype int32; got ", dlpack_dtype_name(t));
  SPATTN_CHECK(a.ndim() == shape.size(), where, ": ", name, " must have rank ", shape.size(),
               "; got rank ", a.ndim());
  int64_t expect_stride = 1;
  for (int d = int(shape.size()) - 1; d >= 0; --d) {
    const int64_t want = shape.begin()[d];
    SPATTN_CHECK(want < 0 || int64_t(a.shape(d)) == want, where, ": ", name, ".shape[", d,
                 "] must be ", want, "; got ", a.shape(d));
    SPATTN_CHECK(a.shape(d) <= 1 || a.stride(d) == expect_stride, where, ": ", name,
                 " must be contiguous (C order); got stride ", a.stride(d), " in dimension ", d,
                 " where ", expect_stride, " was expected");
    expect_stride *= int64_t(a.shape(d));
  }
  const spattn::Device dev = to_device(where, name, a.device_type(), a.device_id());
  SPATTN_CHECK(dev == device, where, ": ", name, " must be on ", spattn::to_string(device),
               "; got ", spattn::to_string(dev));
  return static_cast<const int32_t*>(a.data());
}

inline spattn::MaskRule make_rule(bool causal, int64_t window_left, int64_t window_right) {
  spattn::MaskRule rule;
  rule.causal = causal;
  rule.window_left = window_left;
  rule.window_right = window_right;
  return rule;
}

inline spattn::PlanGeometry make_geometry(int64_t batch, int64_t heads, int64_t q_len,
                                          int64_t k_len, int block_q, int block_k,
                                          const spattn::MaskRule& rule) {
  spattn::PlanGeometry g;
  g.batch = batch;
  g.heads = heads;
  g.q_len = q_len;
  g.k_len = k_len;
  g.block_q = block_q;
  g.block_k = block_k;
  g.rule = rule;
  return g;
}

// A view over three plan arrays; (batch, heads) come from kv_index's shape. Contents are read
// only where the arrays are in host memory (the view itself never reads them).
inline spattn::PlanView make_plan_view(const char* where, const InArray& kv_index,
                                       const InArray& num_full, const InArray& num_partial,
                                       int64_t q_len, int64_t k_len, int block_q, int block_k,
                                       const spattn::MaskRule& rule, spattn::Device device) {
  SPATTN_CHECK(kv_index.ndim() == 4, where,
               ": kv_index must have rank 4 (batch, heads, num_q_blocks, capacity); got rank ",
               kv_index.ndim());
  spattn::PlanView v;
  v.geo = make_geometry(int64_t(kv_index.shape(0)), int64_t(kv_index.shape(1)), q_len, k_len,
                        block_q, block_k, rule);
  v.geo.validate(where);
  const int64_t nqb = v.geo.num_q_blocks();
  v.capacity = int64_t(kv_index.shape(3));
  v.device = device;
  v.kv_index =
      plan_array(where, "kv_index", kv_index, {v.geo.batch, v.geo.heads, nqb, -1}, device);
  v.num_full = plan_array(where, "num_full", num_full, {v.geo.batch, v.geo.heads, nqb}, device);
  v.num_partial =
      plan_array(where, "num_partial", num_partial, {v.geo.batch, v.geo.heads, nqb}, device);
  return v;
}

// The Python side passes a host plan as these ten values (BlockPlan._host_args()).
struct HostPlanArgs {
  InArray kv_index, num_full, num_partial;
  int64_t q_len, k_len;
  int block_q, block_k;
  bool causal;
  int64_t window_left, window_right;
};

inline HostPlanArgs unpack_plan(const char* where, const nb::handle& t) {
  SPATTN_CHECK(nb::isinstance<nb::tuple>(t) && nb::len(t) == 10, where,
               ": plan must be the 10-tuple of BlockPlan._host_args()");
  nb::tuple a = nb::borrow<nb::tuple>(t);
  return {nb::cast<InArray>(a[0]),  nb::cast<InArray>(a[1]), nb::cast<InArray>(a[2]),
          nb::cast<int64_t>(a[3]),  nb::cast<int64_t>(a[4]), nb::cast<int>(a[5]),
          nb::cast<int>(a[6]),      nb::cast<bool>(a[7]),    nb::cast<int64_t>(a[8]),
          nb::cast<int64_t>(a[9])};
}

// Copies host plan arrays into an owning, validated C++ plan (for statistics, algebra, pictures).
inline spattn::BlockPlan host_plan(const char* where, const HostPlanArgs& a) {
  const spattn::PlanView v =
      make_plan_view(where, a.kv_index, a.num_full, a.num_partial, a.q_len, a.k_len, a.block_q,
                     a.block_k, make_rule(a.causal, a.window_left, a.window_right), {});
  spattn::validate_plan(v, where);
  return spattn::BlockPlan::from_view(v);
}

template <class T>
nb::ndarray<nb::numpy, T> to_numpy(std::vector<T> values, std::vector<size_t> shape) {
  auto* heap = new std::vector<T>(std::move(values));
  nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::ndarray<nb::numpy, T>(heap->data(), shape.size(), shape.data(), owner);
}

using Int32Array = nb::ndarray<nb::numpy, int32_t>;
// (kv_index, num_full, num_partial, (causal, window_left, window_right)): builders may change
// the rule (patterns write theirs into the geometry), so it travels back with the arrays.
using PlanArrays =
    std::tuple<Int32Array, Int32Array, Int32Array, std::tuple<bool, int64_t, int64_t>>;

inline PlanArrays plan_arrays(const spattn::BlockPlan& plan) {
  const spattn::PlanGeometry& g = plan.geometry();
  const size_t b = size_t(g.batch), h = size_t(g.heads), nqb = size_t(g.num_q_blocks());
  const size_t capacity = size_t(plan.view().capacity);
  return {to_numpy(plan.kv_index(), {b, h, nqb, capacity}),
          to_numpy(plan.num_full(), {b, h, nqb}), to_numpy(plan.num_partial(), {b, h, nqb}),
          {g.rule.causal, g.rule.window_left, g.rule.window_right}};
}

}  // namespace spattn_py
