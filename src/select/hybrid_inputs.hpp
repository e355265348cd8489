// Checks and plan geometry shared by every entry point of the hybrid selector (select_hybrid,
// hybrid_block_scores, hybrid_geometry, select_hybrid_into), whatever device runs it.
#pragma once

#include "spattn/plan.hpp"
#include "spattn/select.hpp"
#include "spattn/tensor.hpp"

namespace spattn::detail {

// q (B, Hq, Nq, D) and k (B, Hkv, Nk, D) on one device, Hq a multiple of Hkv, and options in
// range; errors name `where`, the argument, the expected and the actual value.
void check_hybrid_inputs(const char* where, const TensorRef& q, const TensorRef& k,
                         const HybridOptions& opt);

// The geometry of the plan the selector writes for q, k and opt (inputs already checked).
PlanGeometry hybrid_plan_geometry(const char* where, const TensorRef& q, const TensorRef& k,
                                  const HybridOptions& opt);

}  // namespace spattn::detail
