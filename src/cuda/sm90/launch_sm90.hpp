// Host-side declarations of the sm_90a forward launchers (one .cu per dtype and head dim).
// Each returns cudaErrorNotSupported, before launching anything, when it cannot take the
// problem (the driver refuses a tensor map); the dispatcher then runs the mma.sync kernel.
#pragma once

#include <cuda_runtime.h>

#include "cuda/params.hpp"

namespace spattn::cuda::sm90 {

cudaError_t forward_bf16_d64(const AttnParams&, cudaStream_t);
cudaError_t forward_bf16_d128(const AttnParams&, cudaStream_t);
cudaError_t forward_fp16_d64(const AttnParams&, cudaStream_t);
cudaError_t forward_fp16_d128(const AttnParams&, cudaStream_t);
cudaError_t forward_bf16_d256(const AttnParams&, cudaStream_t);
cudaError_t forward_fp16_d256(const AttnParams&, cudaStream_t);

}  // namespace spattn::cuda::sm90
