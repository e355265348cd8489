// Host-side helpers shared by the CUDA entry points: turning CUDA runtime errors into
// spattn::Error, and making the tensors' device current for the duration of a call.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "spattn/error.hpp"

namespace spattn::cuda {

inline void check(cudaError_t e, const char* where, const char* what) {
  if (e == cudaSuccess) return;
  std::string hint;
  if (e == cudaErrorNoKernelImageForDevice || e == cudaErrorInvalidDeviceFunction)
    hint = " (spattn's CUDA kernels are built for compute capability 9.0; set "
           "CMAKE_CUDA_ARCHITECTURES for other GPUs)";
  detail::throw_error(where, ": CUDA ", what, " failed: ", cudaGetErrorName(e), ": ",
                      cudaGetErrorString(e), hint);
}

// Makes `device` current and restores the caller's device on scope exit.
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* where) {
    check(cudaGetDevice(&previous_), where, "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), where, "cudaSetDevice");
    restore_ = previous_ != device;
  }
  ~DeviceGuard() {
    if (restore_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool restore_ = false;
};

}  // namespace spattn::cuda
