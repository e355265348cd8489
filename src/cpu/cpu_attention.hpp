// CPU backend: flash-style tiles with online softmax, threads over (batch, head, query block).
#pragma once

#include "core/problem.hpp"

namespace spattn::cpu {

Support supports(DType dtype, int64_t dim_qk, int64_t dim_v);

void forward(const detail::AttentionProblem& p, const TensorRef& q, const TensorRef& k,
             const TensorRef& v, const TensorRef& out, const TensorRef& lse);

void backward(const detail::AttentionProblem& p, const TensorRef& q, const TensorRef& k,
              const TensorRef& v, const TensorRef& out, const TensorRef& lse,
              const TensorRef& dout, const TensorRef& dq, const TensorRef& dk,
              const TensorRef& dv);

}  // namespace spattn::cpu
