// The one parameters struct that crosses from the dispatcher into every backend: validated
// sizes, strides, pointers and the plan. Backends trust it; all checking happens before.
#pragma once

#include <cstdint>

#include "spattn/attention.hpp"

namespace spattn::detail {

struct AttentionProblem {
  int64_t batch = 0, heads_q = 0, heads_kv = 0;
  int64_t q_len = 0, k_len = 0;
  int64_t dim_qk = 0, dim_v = 0;
  double scale = 0.0;
  MaskRule rule{};
  DType dtype = DType::float32;
  const PlanView* plan = nullptr;  // null: dense under `rule`
  int num_threads = 0;
  void* stream = nullptr;

  int64_t group_size() const { return heads_q / heads_kv; }  // query heads per kv head
};

// Validates the forward arguments and returns the problem they describe.
AttentionProblem check_forward(const char* where, const TensorRef& q, const TensorRef& k,
                               const TensorRef& v, const PlanView* plan,
                               const AttentionParams& params, const TensorRef& out,
                               const TensorRef& lse);

// Validates the backward arguments (everything forward checks, plus dout, dq, dk, dv).
AttentionProblem check_backward(const char* where, const TensorRef& q, const TensorRef& k,
                                const TensorRef& v, const TensorRef& out, const TensorRef& lse,
                                const TensorRef& dout, const PlanView* plan,
                                const AttentionParams& params, const TensorRef& dq,
                                const TensorRef& dk, const TensorRef& dv);

// The dtype of lse for inputs of `dtype`.
inline DType lse_dtype(DType dtype) {
  return dtype == DType::float64 ? DType::float64 : DType::float32;
}

}  // namespace spattn::detail
