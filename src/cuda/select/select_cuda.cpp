// Host side of the GPU plan writers: checks what only the device path needs, fills the kernel
// parameter structs and launches on the caller's stream. Nothing here waits for the device:
// scratch memory comes from the stream-ordered allocator (capturable in CUDA graphs) and
// per-head options travel by value in the kernel parameters.
#include "cuda/select/select_cuda.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "cuda/select/select_params.hpp"
#include "cuda/runtime_check.hpp"
#include "cuda/scratch.hpp"
#include "spattn/error.hpp"

namespace spattn::cuda {
namespace {

static_assert(select::kMaxHeadOptions == kMaxDeviceHeadOptions);

select::InDType in_dtype(DType d) {
  switch (d) {
    case DType::float32: return select::InDType::f32;
    case DType::bfloat16: return select::InDType::bf16;
    case DType::float16: return select::InDType::f16;
    case DType::float64: return select::InDType::f64;
  }
  return select::InDType::f32;
}

select::PoolArgs pool_args(const TensorRef& t, int block, float* dst, bool transposed) {
  select::PoolArgs a;
  a.src = t.data;
  for (int d = 0; d < 4; ++d) a.stride[d] = t.stride[d];
  a.dtype = in_dtype(t.dtype);
  a.batch = int32_t(t.shape[0]);
  a.heads = int32_t(t.shape[1]);
  a.len = t.shape[2];
  a.dim = int32_t(t.shape[3]);
  a.block = block;
  a.blocks = (a.len + block - 1) / block;
  a.dst = dst;
  a.transposed = transposed;
  // 16-byte loads need a unit last stride, a 16-byte aligned start and strides (and the head
  // dim) that keep every row start 16-byte aligned.
  const int64_t vec = 16 / int64_t(dtype_size(t.dtype));
  a.vectorized = t.stride[3] == 1 && reinterpret_cast<uintptr_t>(t.data) % 16 == 0 &&
                 t.stride[0] % vec == 0 && t.stride[1] % vec == 0 && t.stride[2] % vec == 0 &&
                 t.shape[3] % vec == 0;
  return a;
}

select::DenseArgs dense_args(const PlanBuffers& out) {
  const PlanGeometry& g = out.geo;
  select::DenseArgs a;
  a.kv_index = out.kv_index;
  a.num_full = out.num_full;
  a.num_partial = out.num_partial;
  a.capacity = out.capacity;
  a.rows = g.num_rows();
  a.nqb = int32_t(g.num_q_blocks());
  a.nkb = int32_t(g.num_k_blocks());
  a.block_q = g.block_q;
  a.block_k = g.block_k;
  a.q_len = g.q_len;
  a.k_len = g.k_len;
  a.d_lo = g.rule.min_offset();
  a.d_hi = g.rule.max_offset();
  return a;
}

}  // namespace

void select_hybrid(const TensorRef& q, const TensorRef& k, const HybridOptions& opt,
                   const PlanBuffers& out, void* stream_ptr, int stages) {
  constexpr const char* where = "select_hybrid_into";
  SPATTN_CHECK(k.device == q.device, where, ": k must be on q's device ", to_string(q.device),
               "; got ", to_string(k.device));
  SPATTN_CHECK(out.device == q.device, where, ": out (plan buffers) must be on q's device ",
               to_string(q.device), "; got ", to_string(out.device));
  for (auto [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}})
    for (int d = 0; d < 4; ++d)
      SPATTN_CHECK(t->stride[d] >= 0, where, ": ", name,
                   " strides must be >= 0 on the GPU; got stride[", d, "] = ", t->stride[d]);
  const int64_t D = q.shape[3];
  SPATTN_CHECK(D >= 1 && D <= 256, where,
               ": the GPU selector takes head dims in [1, 256]; got ", D);
  const PlanGeometry& geo = out.geo;
  const int64_t nqb = geo.num_q_blocks(), nkb = geo.num_k_blocks();
  SPATTN_CHECK(nkb <= 8192, where,
               ": the GPU selector takes at most 8192 kv blocks per row (k_len <= 8192 x "
               "block_k); got ", nkb, " (k_len ", geo.k_len, ", block_k ", geo.block_k, ")");
  SPATTN_CHECK(q.shape[0] <= 65535 && geo.heads <= 65535, where,
               ": the GPU selector takes at most 65535 batches and plan heads; got batch ",
               q.shape[0], ", plan heads ", geo.heads);
  for (auto [v, name] : {std::pair{&opt.top_k, "top_k"}, std::pair{&opt.top_p, "top_p"}})
    SPATTN_CHECK(v->size() <= size_t(kMaxDeviceHeadOptions), where, ": ", name,
                 " must have at most ", kMaxDeviceHeadOptions,
                 " per-head entries on the GPU (or one value for every head); got ", v->size());
  if (geo.num_rows() == 0) return;

  DeviceGuard guard(q.device.index, where);
  const auto stream = static_cast<cudaStream_t>(stream_ptr);

  select::SelectArgs a;
  a.kv_index = out.kv_index;
  a.num_full = out.num_full;
  a.num_partial = out.num_partial;
  a.capacity = out.capacity;
  a.batch = int32_t(q.shape[0]);
  a.heads_q = int32_t(q.shape[1]);
  a.heads_kv = int32_t(k.shape[1]);
  a.plan_heads = int32_t(geo.heads);
  a.group = int32_t(q.shape[1] / k.shape[1]);
  a.dim = int32_t(D);
  a.nqb = int32_t(nqb);
  a.nkb = int32_t(nkb);
  a.npad = int32_t((nkb + 127) / 128 * 128);
  a.npow2 = 2;
  while (a.npow2 < a.nkb) a.npow2 <<= 1;
  a.block_q = geo.block_q;
  a.block_k = geo.block_k;
  a.q_len = geo.q_len;
  a.k_len = geo.k_len;
  a.d_lo = geo.rule.min_offset();
  a.d_hi = geo.rule.max_offset();
  // The CPU selector's scale: float(opt.scale) or float(1 / sqrt(double(D))).
  a.scale = float(opt.scale > 0 ? opt.scale : 1.0 / std::sqrt(double(std::max<int64_t>(D, 1))));
  a.gqa = opt.gqa == GqaPlan::per_query_head ? 0 : opt.gqa == GqaPlan::group_mean ? 1 : 2;
  a.sink_blocks = opt.sink_blocks;
  a.local_blocks = opt.local_blocks;
  a.num_top_k = int32_t(opt.top_k.size());
  a.num_top_p = int32_t(opt.top_p.size());
  std::copy(opt.top_k.begin(), opt.top_k.end(), a.top_k);
  std::copy(opt.top_p.begin(), opt.top_p.end(), a.top_p);

  // Query blocks per CTA: 8 reads each pooled key row once per 8 query blocks; fewer when a
  // row's buffers would not fit in shared memory.
  int max_smem = 0;
  check(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                               q.device.index),
        where, "cudaDeviceGetAttribute");
  const bool grouped = a.gqa != 0;
  int rows = 8;
  while (rows > 1 &&
         select::select_smem_bytes(rows, a.dim, a.npad, a.npow2, grouped) > size_t(max_smem))
    rows /= 2;
  const size_t smem = select::select_smem_bytes(rows, a.dim, a.npad, a.npow2, grouped);
  SPATTN_CHECK(smem <= size_t(max_smem), where, ": a selector row needs ", smem,
               " bytes of shared memory, more than the device's ", max_smem,
               "; use fewer kv blocks (larger block_k)");
  a.rows_per_cta = rows;

  // Scratch: pooled q (B, Hq, nqb, D) and pooled k transposed (B, Hkv, D, nkb), float32.
  const size_t q_floats = size_t(q.shape[0] * q.shape[1] * nqb * D);
  const size_t k_floats = size_t(k.shape[0] * k.shape[1] * nkb * D);
  void* ws = scratch_alloc(std::max<size_t>((q_floats + k_floats) * 4, 16), q.device.index,
                           stream, where);
  float* qbar = static_cast<float*>(ws);
  float* kbar_t = qbar + q_floats;
  a.qbar = qbar;
  a.kbar_t = kbar_t;

  cudaError_t e = cudaSuccess;
  if (stages & kStagePool) {
    e = select::launch_pool(pool_args(q, geo.block_q, qbar, false),
                            pool_args(k, geo.block_k, kbar_t, true), stream);
  }
  if (e == cudaSuccess && (stages & kStageSelect)) e = select::launch_select(a, smem, stream);
  const cudaError_t freed = cudaFreeAsync(ws, stream);
  check(e, where, "selector kernel launch");
  check(freed, where, "cudaFreeAsync (selector scratch)");
}

void copy_plan(const BlockPlan& plan, const PlanBuffers& out, void* stream_ptr) {
  constexpr const char* where = "copy_plan_to";
  const int64_t rows = plan.geometry().num_rows();
  if (rows == 0) return;
  DeviceGuard guard(out.device.index, where);
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t cap = int64_t(plan.kv_index().size()) / rows;
  // Rows of `cap` slots into rows of out.capacity slots (>= cap, checked by the caller).
  check(cudaMemcpy2DAsync(out.kv_index, size_t(out.capacity) * 4, plan.kv_index().data(),
                          size_t(cap) * 4, size_t(cap) * 4, size_t(rows), cudaMemcpyHostToDevice,
                          stream),
        where, "cudaMemcpy2DAsync (kv_index)");
  check(cudaMemcpyAsync(out.num_full, plan.num_full().data(), size_t(rows) * 4,
                        cudaMemcpyHostToDevice, stream),
        where, "cudaMemcpyAsync (num_full)");
  check(cudaMemcpyAsync(out.num_partial, plan.num_partial().data(), size_t(rows) * 4,
                        cudaMemcpyHostToDevice, stream),
        where, "cudaMemcpyAsync (num_partial)");
}

void dense_plan(const PlanBuffers& out, void* stream_ptr) {
  constexpr const char* where = "dense_plan_into";
  if (out.geo.num_rows() == 0) return;
  DeviceGuard guard(out.device.index, where);
  check(select::launch_dense(dense_args(out), static_cast<cudaStream_t>(stream_ptr)), where,
        "kernel launch");
}

}  // namespace spattn::cuda
