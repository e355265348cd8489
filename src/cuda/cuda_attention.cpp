// CUDA backend entry points: turn a validated AttentionProblem into AttnParams, pick the tile
// source (dense / native plan / generic plan) and the kernel variant, launch on the caller's
// stream. Nothing here synchronises with the host: workspace comes from the stream-ordered
// allocator and the transposed plan is built on the device.
#include "cuda/cuda_attention.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cuda/launch.hpp"
#include "cuda/runtime_check.hpp"
#include "cuda/scratch.hpp"
#include "cuda/sm90/backward_sm90.hpp"
#include "cuda/sm90/launch_sm90.hpp"
#include "spattn/error.hpp"

namespace spattn::cuda {
namespace {

// Kernels move rows as 16-byte vectors: pointers 16-byte aligned, strides multiples of 8.
void set_tensor(const char* where, const char* name, const TensorRef& t, const void*& ptr,
                int64_t* stride) {
  const bool aligned = reinterpret_cast<uintptr_t>(t.data) % 16 == 0 && t.stride[0] % 8 == 0 &&
                       t.stride[1] % 8 == 0 && t.stride[2] % 8 == 0;
  SPATTN_CHECK(aligned || t.numel() == 0, where, ": ", name,
               " must be 16-byte aligned with batch, head and row strides that are multiples "
               "of 8 elements for the CUDA backend; got strides (",
               t.stride[0], ", ", t.stride[1], ", ", t.stride[2], ", ", t.stride[3],
               ") at address ", t.data);
  ptr = t.data;
  for (int d = 0; d < 3; ++d) stride[d] = t.stride[d];
}

int32_t clamp_offset(int64_t d) {
  return int32_t(std::clamp<int64_t>(d, -kOffsetUnbounded, kOffsetUnbounded));
}

PlanArgs plan_args(const PlanView& v) {
  PlanArgs a;
  a.index = v.kv_index;
  a.num_full = v.num_full;
  a.num_partial = v.num_partial;
  a.capacity = v.capacity;
  a.batch = int32_t(v.geo.batch);
  a.heads = int32_t(v.geo.heads);
  a.rows = int32_t(v.geo.num_q_blocks());
  a.block_q = v.geo.block_q;
  a.block_k = v.geo.block_k;
  return a;
}

AttnParams common_params(const char* where, const detail::AttentionProblem& p,
                         const TensorRef& q, const TensorRef& k, const TensorRef& v,
                         const TensorRef& out, const TensorRef& lse) {
  SPATTN_CHECK(p.q_len < INT_MAX / 2 && p.k_len < INT_MAX / 2 && p.batch <= 65535 &&
                   p.heads_q <= 65535,
               where, ": the CUDA backend takes sequences shorter than 2^30 and at most 65535 "
               "batches and heads; got q_len ", p.q_len, ", k_len ", p.k_len, ", batch ",
               p.batch, ", heads ", p.heads_q);
  AttnParams a;
  const void* ptr = nullptr;
  set_tensor(where, "q", q, a.q, a.q_stride);
  set_tensor(where, "k", k, a.k, a.k_stride);
  set_tensor(where, "v", v, a.v, a.v_stride);
  set_tensor(where, "out", out, ptr, a.o_stride);
  a.out = const_cast<void*>(ptr);
  a.lse = static_cast<float*>(lse.data);
  for (int d = 0; d < 3; ++d) a.lse_stride[d] = lse.stride[d];
  a.batch = int32_t(p.batch);
  a.heads_q = int32_t(p.heads_q);
  a.heads_kv = int32_t(p.heads_kv);
  a.group = int32_t(p.group_size());
  a.q_len = int32_t(p.q_len);
  a.k_len = int32_t(p.k_len);
  a.scale = float(p.scale);
  a.scale_log2 = float(p.scale * 1.4426950408889634);
  a.d_lo = clamp_offset(p.rule.min_offset());
  a.d_hi = clamp_offset(p.rule.max_offset());
  if (p.plan == nullptr) {
    a.source = TileSource::dense;
  } else {
    a.plan = plan_args(*p.plan);
    // Kernel tiles are 128 query rows (forward, dq) and 64 keys: a plan whose blocks are at
    // least that large is walked row by row; smaller blocks take the generic path.
    a.source = p.plan->geo.block_q >= 128 && p.plan->geo.block_k >= 64 ? TileSource::native
                                                                       : TileSource::generic;
  }
  return a;
}

struct Variant {
  Launcher forward, dq, dkdv, prepare;
};

Variant variant(DType dtype, int64_t dim) {
#define SPATTN_CUDA_PICK(elt, d)                                                      \
  if (dtype == (Elt::elt == Elt::bf16 ? DType::bfloat16 : DType::float16) && dim == d) \
    return {forward_##elt##_d##d, backward_dq_##elt##_d##d, backward_dkdv_##elt##_d##d,  \
            backward_prepare_##elt##_d##d};
  SPATTN_CUDA_VARIANTS(SPATTN_CUDA_PICK)
#undef SPATTN_CUDA_PICK
  detail::throw_error("spattn::cuda: no kernel for dtype ", dtype_name(dtype), ", head dim ", dim);
}

// The Hopper forward (wgmma + TMA, src/cuda/sm90/) for a dtype and head dim.
Launcher sm90_forward(DType dtype, int64_t dim) {
  const bool bf16 = dtype == DType::bfloat16;
  if (dim == 128) return bf16 ? sm90::forward_bf16_d128 : sm90::forward_fp16_d128;
  if (dim == 64) return bf16 ? sm90::forward_bf16_d64 : sm90::forward_fp16_d64;
  if (dim == 256) return bf16 ? sm90::forward_bf16_d256 : sm90::forward_fp16_d256;
  return nullptr;
}

// SPATTN_CUDA_FORWARD picks the forward kernels: unset or "auto" takes the sm_90a kernel where it
// applies and falls back quietly; "sm80" always runs the mma.sync kernel; "sm90" takes the sm_90a
// kernel wherever it applies and makes a refused tensor map an error instead of a fallback (the
// tests use it so that a silent fallback cannot pass for the new path).
enum class KernelPath { automatic, sm80, sm90 };
KernelPath kernel_path(const char* env) {
  const char* e = std::getenv(env);
  if (e == nullptr || *e == 0 || std::strcmp(e, "auto") == 0) return KernelPath::automatic;
  if (std::strcmp(e, "sm80") == 0) return KernelPath::sm80;
  if (std::strcmp(e, "sm90") == 0) return KernelPath::sm90;
  detail::throw_error(env, " must be auto, sm80 or sm90; got \"", e, "\"");
}
using ForwardPath = KernelPath;
ForwardPath forward_path() { return kernel_path("SPATTN_CUDA_FORWARD"); }

// The Hopper backward passes (src/cuda/sm90/backward_sm90.cuh) for a dtype and head dim.
struct Sm90Backward {
  Launcher dq = nullptr, dkdv = nullptr;
};
Sm90Backward sm90_backward(DType dtype, int64_t dim) {
  const bool bf16 = dtype == DType::bfloat16;
  if (dim == 128)
    return bf16 ? Sm90Backward{sm90::backward_dq_bf16_d128, sm90::backward_dkdv_bf16_d128}
                : Sm90Backward{sm90::backward_dq_fp16_d128, sm90::backward_dkdv_fp16_d128};
  if (dim == 64)
    return bf16 ? Sm90Backward{sm90::backward_dq_bf16_d64, sm90::backward_dkdv_bf16_d64}
                : Sm90Backward{sm90::backward_dq_fp16_d64, sm90::backward_dkdv_fp16_d64};
  return {};
}

// SPATTN_CUDA_BACKWARD picks the backward kernels, like SPATTN_CUDA_FORWARD: unset or "auto"
// takes the sm_90a passes where they apply and falls back quietly; "sm80" always runs the
// mma.sync passes; "sm90" takes the sm_90a passes wherever they apply and makes a refused
// tensor map an error instead of a fallback.
using BackwardPath = KernelPath;
BackwardPath backward_path() { return kernel_path("SPATTN_CUDA_BACKWARD"); }

// Runs `hopper` when given and the path allows, else (or when it declines) `fallback`, a
// Launcher or a callable of the same signature.
template <class Fallback>
void launch_pass(const char* where, const char* what, BackwardPath path, Launcher hopper,
                 const Fallback& fallback, const AttnParams& a, cudaStream_t stream) {
  if (hopper != nullptr && path != ForwardPath::sm80) {
    const cudaError_t e = hopper(a, stream);
    if (e != cudaErrorNotSupported || path == ForwardPath::sm90) {
      check(e, where, what);
      return;
    }
  }
  check(fallback(a, stream), where, what);
}

// sm_90a code runs on compute capability 9.0 exactly (H100, H200), not on later GPUs.
bool is_sm90(int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return major == 9 && minor == 0;
}

}  // namespace

bool available() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return false;
  }
  return n > 0;
}

Support supports(DType dtype, int64_t dim_qk, int64_t dim_v) {
  if (dtype != DType::bfloat16 && dtype != DType::float16)
    return {false, std::string("the CUDA backend takes bfloat16 and float16 inputs; got ") +
                       dtype_name(dtype)};
  if (dim_qk != dim_v || (dim_qk != 64 && dim_qk != 128 && dim_qk != 256))
    return {false, "the CUDA backend supports head dims 64, 128 and 256 with equal q/k and v "
                   "head dims; got (" + std::to_string(dim_qk) + ", " + std::to_string(dim_v) + ")"};
  return {};
}

void forward(const detail::AttentionProblem& p, const TensorRef& q, const TensorRef& k,
             const TensorRef& v, const TensorRef& out, const TensorRef& lse) {
  constexpr const char* where = "forward";
  const Support s = supports(p.dtype, p.dim_qk, p.dim_v);
  SPATTN_CHECK(s.ok, where, ": ", s.reason);
  if (p.batch == 0 || p.heads_q == 0 || p.q_len == 0) return;
  DeviceGuard guard(q.device.index, where);
  const AttnParams a = common_params(where, p, q, k, v, out, lse);
  const auto stream = static_cast<cudaStream_t>(p.stream);
  // The sm_90a kernel takes dense and native-plan problems (generic small-block plans stay on
  // the mma.sync kernel, which masks per element); it declines (cudaErrorNotSupported, nothing
  // launched) when the driver refuses a tensor map.
  const ForwardPath path = forward_path();
  const Launcher hopper = sm90_forward(p.dtype, p.dim_qk);
  if (path != ForwardPath::sm80 && hopper != nullptr && a.source != TileSource::generic &&
      a.k_len > 0 && is_sm90(q.device.index)) {
    const cudaError_t e = hopper(a, stream);
    if (e != cudaErrorNotSupported || path == ForwardPath::sm90) {
      check(e, where, "sm90 forward kernel launch");
      return;
    }
  }
  check(variant(p.dtype, p.dim_qk).forward(a, stream), where, "forward kernel launch");
}

void backward(const detail::AttentionProblem& p, const TensorRef& q, const TensorRef& k,
              const TensorRef& v, const TensorRef& out, const TensorRef& lse,
              const TensorRef& dout, const TensorRef& dq, const TensorRef& dk,
              const TensorRef& dv) {
  constexpr const char* where = "backward";
  const Support s = supports(p.dtype, p.dim_qk, p.dim_v);
  SPATTN_CHECK(s.ok, where, ": ", s.reason);
  if (p.batch == 0 || p.heads_kv == 0) return;
  DeviceGuard guard(q.device.index, where);
  AttnParams a = common_params(where, p, q, k, v, out, lse);
  const void* ptr = nullptr;
  set_tensor(where, "dout", dout, a.dout, a.do_stride);
  set_tensor(where, "dq", dq, ptr, a.dq_stride);
  a.dq = const_cast<void*>(ptr);
  set_tensor(where, "dk", dk, ptr, a.dk_stride);
  a.dk = const_cast<void*>(ptr);
  set_tensor(where, "dv", dv, ptr, a.dv_stride);
  a.dv = const_cast<void*>(ptr);
  const auto stream = static_cast<cudaStream_t>(p.stream);
  const Variant kern = variant(p.dtype, p.dim_qk);

  // Workspace: lse2 and delta (B, Hq, Nq) float32, then the transposed plan (native only).
  const size_t rows = size_t(p.batch) * p.heads_q * p.q_len;
  const size_t stat_bytes = (rows * sizeof(float) + 255) / 256 * 256;
  size_t tplan_rows = 0, tplan_cap = 0;
  if (a.source == TileSource::native) {
    tplan_rows = size_t(a.plan.batch) * a.plan.heads * p.plan->geo.num_k_blocks();
    tplan_cap = size_t(std::max<int64_t>(p.plan->geo.num_q_blocks(), 1));
  }
  const size_t tplan_bytes = tplan_rows * (tplan_cap + 2) * sizeof(int32_t);
  Scratch ws(2 * stat_bytes + tplan_bytes, q.device.index, stream, where);
  a.lse2 = reinterpret_cast<float*>(ws.get());
  a.delta = reinterpret_cast<float*>(ws.get() + stat_bytes);
  if (a.source == TileSource::native) {
    auto* base = reinterpret_cast<int32_t*>(ws.get() + 2 * stat_bytes);
    a.tplan = a.plan;
    a.tplan.index = base;
    a.tplan.num_full = base + tplan_rows * tplan_cap;
    a.tplan.num_partial = base + tplan_rows * (tplan_cap + 1);
    a.tplan.capacity = int64_t(tplan_cap);
    a.tplan.rows = int32_t(p.plan->geo.num_k_blocks());
    check(transpose_plan(a.plan, a.tplan.rows, const_cast<int32_t*>(a.tplan.index),
                         const_cast<int32_t*>(a.tplan.num_full),
                         const_cast<int32_t*>(a.tplan.num_partial), stream),
          where, "plan transpose kernel launch");
  }
  // The sm_90a passes take dense and native-plan problems with both lengths > 0 (dk/dv: the
  // plans sm90::dkdv_shape accepts); generic plans, empty sequences and other GPUs take the
  // mma.sync passes. Both paths are deterministic.
  const BackwardPath path = backward_path();
  const bool hopper_ok = a.source != TileSource::generic && a.q_len > 0 && a.k_len > 0 &&
                         is_sm90(q.device.index);
  const Sm90Backward hopper = hopper_ok ? sm90_backward(p.dtype, p.dim_qk) : Sm90Backward{};
  const bool dkdv_ok = sm90::dkdv_shape(a) != sm90::DkdvShape::none;
  if (p.q_len > 0 && p.heads_q > 0) {
    // The sm_90a dq pass computes delta and lse2 itself; the mma.sync one reads them from the
    // preparation kernel.
    const auto prepare_then_dq = [&](const AttnParams& pa, cudaStream_t st) {
      const cudaError_t e = kern.prepare(pa, st);
      return e != cudaSuccess ? e : kern.dq(pa, st);
    };
    launch_pass(where, "dq kernel launch", path, hopper.dq, prepare_then_dq, a, stream);
  }
  if (p.k_len > 0)
    launch_pass(where, "dk/dv kernel launch", path, dkdv_ok ? hopper.dkdv : nullptr, kern.dkdv,
                a, stream);
}

}  // namespace spattn::cuda
