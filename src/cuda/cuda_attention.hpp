// CUDA backend entry points, called by the dispatcher for tensors on a cuda device.
// When spattn is built without CUDA these report that the backend is not compiled in.
#pragma once

#include "core/problem.hpp"

namespace spattn::cuda {

bool available();  // compiled in and at least one device visible

Support supports(DType dtype, int64_t dim_qk, int64_t dim_v);

void forward(const detail::AttentionProblem& p, const TensorRef& q, const TensorRef& k,
             const TensorRef& v, const TensorRef& out, const TensorRef& lse);

void backward(const detail::AttentionProblem& p, const TensorRef& q, const TensorRef& k,
              const TensorRef& v, const TensorRef& out, const TensorRef& lse,
              const TensorRef& dout, const TensorRef& dq, const TensorRef& dk,
              const TensorRef& dv);

}  // namespace spattn::cuda
