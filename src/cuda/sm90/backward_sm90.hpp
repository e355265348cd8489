// Host-side declarations of the sm_90a backward launchers (one .cu per pass, dtype and head
// dim). Each returns cudaErrorNotSupported, before launching anything, when it cannot take the
// problem; the dispatcher then runs the mma.sync kernel of that pass.
#pragma once

#include <cuda_runtime.h>

#include "cuda/params.hpp"

namespace spattn::cuda::sm90 {

#define SPATTN_SM90_BACKWARD_DECLARE(elt, d)                                \
  cudaError_t backward_dq_##elt##_d##d(const AttnParams&, cudaStream_t);    \
  cudaError_t backward_dkdv_##elt##_d##d(const AttnParams&, cudaStream_t);
SPATTN_SM90_BACKWARD_DECLARE(bf16, 64)
SPATTN_SM90_BACKWARD_DECLARE(bf16, 128)
SPATTN_SM90_BACKWARD_DECLARE(fp16, 64)
SPATTN_SM90_BACKWARD_DECLARE(fp16, 128)
#undef SPATTN_SM90_BACKWARD_DECLARE

}  // namespace spattn::cuda::sm90
