// Host-side declarations of the kernel launchers. Each variant lives in its own .cu file so a
// build compiles them in parallel and a change to one kernel recompiles only its files.
#pragma once

#include <cuda_runtime.h>

#include "cuda/params.hpp"

namespace spattn::cuda {

enum class Elt { bf16, fp16 };

// Signature shared by every launcher: params by value semantics, stream-ordered, no host sync.
using Launcher = cudaError_t (*)(const AttnParams&, cudaStream_t);

#define SPATTN_CUDA_VARIANTS(X) \
  X(bf16, 64) X(bf16, 128) X(bf16, 256) X(fp16, 64) X(fp16, 128) X(fp16, 256)

#define SPATTN_CUDA_DECLARE(elt, d)                                              \
  cudaError_t forward_##elt##_d##d(const AttnParams&, cudaStream_t);             \
  cudaError_t backward_dq_##elt##_d##d(const AttnParams&, cudaStream_t);         \
  cudaError_t backward_dkdv_##elt##_d##d(const AttnParams&, cudaStream_t);       \
  cudaError_t backward_prepare_##elt##_d##d(const AttnParams&, cudaStream_t);
SPATTN_CUDA_VARIANTS(SPATTN_CUDA_DECLARE)
#undef SPATTN_CUDA_DECLARE

// Builds the transposed plan of `plan` on the device (no host synchronisation): per (batch,
// head, kv block) its query blocks, full run then partial run, ascending; capacity = the
// plan's number of query blocks. Output arrays hold batch * heads * num_k_blocks rows.
cudaError_t transpose_plan(const PlanArgs& plan, int32_t num_k_blocks, int32_t* q_index,
                           int32_t* num_full, int32_t* num_partial, cudaStream_t stream);

}  // namespace spattn::cuda
