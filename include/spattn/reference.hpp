// The plain reference: materialises the element mask and the full score matrix per (b, h).
// O(N^2) memory, no tiling, no online softmax: obviously correct, used to test every backend.
//
// `Compute` picks the arithmetic: float64 is the ground truth; float32 is the "same-precision
// naive run" that tolerances are measured against (FlashAttention-3's rule: a kernel's error
// against float64 should be within a small factor of a naive float32 run's error). For 16-bit
// inputs the naive run also rounds P to the input dtype before P·V, as tensor-core kernels do.
#pragma once

#include <cstdint>
#include <vector>

#include "spattn/attention.hpp"

namespace spattn::reference {

enum class Compute { float64, float32 };

// (B, Hq, Nq, Nk) element mask, 1 = (i, j) attended: plan tile listed (all tiles when plan is
// null), rule allows, in bounds.
std::vector<uint8_t> element_mask(const TensorRef& q, const TensorRef& k, const BlockPlan* plan,
                                  const MaskRule& rule);

// out and lse are float64 tensors when compute == float64; with float32 compute, out has q's
// dtype (rounded like a kernel's output) and lse is float32.
ForwardResult forward(const TensorRef& q, const TensorRef& k, const TensorRef& v,
                      const BlockPlan* plan, const AttentionParams& params,
                      Compute compute = Compute::float64);

// Gradients from the materialised softmax (no use of a kernel's lse): float64 tensors when
// compute == float64, else tensors of q's dtype.
Gradients backward(const TensorRef& q, const TensorRef& k, const TensorRef& v,
                   const TensorRef& dout, const BlockPlan* plan, const AttentionParams& params,
                   Compute compute = Compute::float64);

// max |a - b| / max(|b|) over all elements with both finite; positions of non-finite values
// must agree exactly or the result is +inf. Works for any dtypes (host memory).
double relative_error(const TensorRef& a, const TensorRef& b);

}  // namespace spattn::reference
