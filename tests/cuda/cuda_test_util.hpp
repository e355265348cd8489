// Helpers shared by the GPU test programs.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "spattn/attention.hpp"

// Fails the current test (with the CUDA error's name) when a runtime call does not succeed.
#define CUDA_OK(expr)                                                              \
  do {                                                                             \
    const cudaError_t e_ = (expr);                                                 \
    ASSERT_EQ(e_, cudaSuccess) << #expr << ": " << cudaGetErrorString(e_);         \
  } while (0)

// Whether the CUDA backend is compiled in and a device is visible (asked once).
inline bool have_gpu() {
  static const bool ok = spattn::cuda_backend_available();
  return ok;
}
