// Parameters of the GPU selector kernels, shared by the host launcher (select_cuda.cpp) and the
// kernels (select_kernels.cu). Plain data passed by value: nothing is allocated for options, so a
// launch is a single stream operation that CUDA graphs can capture.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace spattn::cuda::select {

enum class InDType : int32_t { f32, bf16, f16, f64 };

// Pooling of one (B, H, N, D) input into block means.
//   transposed = false: dst (B, H, blocks, D)      (pooled queries, row per query block)
//   transposed = true:  dst (B, H, D, blocks)      (pooled keys, so a score row reads
//                                                   consecutive kv blocks for each d)
struct PoolArgs {
  const void* src = nullptr;
  int64_t stride[4] = {0, 0, 0, 0};  // elements
  InDType dtype = InDType::bf16;
  int32_t batch = 0, heads = 0, dim = 0;
  int64_t len = 0;     // tokens
  int64_t blocks = 0;  // ceil(len / block)
  int32_t block = 0;   // tokens per block
  float* dst = nullptr;
  bool transposed = false;
  bool vectorized = false;  // 16-byte loads: unit last stride, aligned pointer and strides
};

// Pooling kernel geometry: a CTA pools one block at a time, staging up to kPoolStageBytes of
// it (tokens x dims) in shared memory; thread t owns dims t and t + kPoolThreads.
inline constexpr int kPoolThreads = 128;
inline constexpr int kPoolStageBytes = 32768;

inline constexpr int kMaxHeadOptions = 128;  // = spattn::kMaxDeviceHeadOptions

struct SelectArgs {
  const float* qbar = nullptr;    // (B, Hq, nqb, D)
  const float* kbar_t = nullptr;  // (B, Hkv, D, nkb)
  int32_t* kv_index = nullptr;    // (B, plan_heads, nqb, capacity)
  int32_t* num_full = nullptr;    // (B, plan_heads, nqb)
  int32_t* num_partial = nullptr;
  int64_t capacity = 0;
  int32_t batch = 0, heads_q = 0, heads_kv = 0, plan_heads = 0, group = 1, dim = 0;
  int32_t nqb = 0, nkb = 0;
  int32_t npad = 0;   // row stride of the per-block rows in shared memory: nkb rounded up to 128
  int32_t npow2 = 2;  // sort buffer width: a power of two >= max(nkb, 2)
  int32_t block_q = 0, block_k = 0;
  int64_t q_len = 0, k_len = 0;
  int64_t d_lo = 0, d_hi = 0;  // allowed offsets (MaskRule::min_offset / max_offset)
  float scale = 1.0f;
  int32_t gqa = 0;  // 0 per query head, 1 group mean, 2 group max (GqaPlan order)
  int64_t sink_blocks = 0, local_blocks = -1;
  int32_t rows_per_cta = 1;  // query blocks per CTA: pooled keys are read once per CTA
  int32_t num_top_k = 1, num_top_p = 1;  // 1 = one value for every plan head
  double top_k[kMaxHeadOptions] = {};
  double top_p[kMaxHeadOptions] = {};
};

// Dense-under-rule plan (and the geometry fields every plan writer needs).
struct DenseArgs {
  int32_t* kv_index = nullptr;
  int32_t* num_full = nullptr;
  int32_t* num_partial = nullptr;
  int64_t capacity = 0;
  int64_t rows = 0;  // batch * heads * nqb
  int32_t nqb = 0, nkb = 0, block_q = 0, block_k = 0;
  int64_t q_len = 0, k_len = 0, d_lo = 0, d_hi = 0;
};

inline constexpr int kSelectThreads = 256;

// Dynamic shared memory of the select kernel for `rows` query blocks per CTA: per row the
// score / key-bit row and the weight row (npad floats each; group modes add the combined row),
// the candidate sort buffer (npow2 uint64) and the pooled query (dim floats).
inline size_t select_smem_bytes(int rows, int dim, int npad, int npow2, bool grouped) {
  return size_t(rows) *
         (size_t(npad) * 4 * (grouped ? 3 : 2) + size_t(npow2) * 8 + size_t(dim) * 4);
}

// Pools q (into block means) and k (into transposed block means) in one launch.
cudaError_t launch_pool(const PoolArgs& q, const PoolArgs& k, cudaStream_t stream);
cudaError_t launch_select(const SelectArgs& a, size_t smem_bytes, cudaStream_t stream);
cudaError_t launch_dense(const DenseArgs& a, cudaStream_t stream);

}  // namespace spattn::cuda::select
