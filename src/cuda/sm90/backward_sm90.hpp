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

// Which CTA shape of the dk/dv pass takes a problem (backward_sm90.cuh, "dk, dv"): wide for
// dense and rule-only problems and transposed plans with block_k % 128 == 0 and
// block_q % 64 == 0; narrow for other plans with block_q % 128 == 0; none otherwise (the
// mma.sync pass runs). The one rule for both the dispatcher and the launcher.
enum class DkdvShape { none, narrow, wide };
inline DkdvShape dkdv_shape(const AttnParams& p) {
  if (p.source == TileSource::generic || p.k_len <= 0 || p.q_len <= 0) return DkdvShape::none;
  if (p.source != TileSource::native) return DkdvShape::wide;
  if (p.tplan.block_k % 128 == 0 && p.tplan.block_q % 64 == 0) return DkdvShape::wide;
  if (p.tplan.block_q % 128 == 0) return DkdvShape::narrow;
  return DkdvShape::none;
}

}  // namespace spattn::cuda::sm90
