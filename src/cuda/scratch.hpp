// Stream-ordered scratch memory for the CUDA entry points (selector scratch, backward
// workspace). Allocations come from a per-device pool that keeps its memory between calls: the
// device's default pool hands memory back to the driver at every synchronisation (release
// threshold 0), so a call made between synchronisations would map fresh memory each time, which
// costs tens of microseconds. While the stream is being captured into a CUDA graph, scratch
// comes from cudaMallocAsync instead and the graph owns it.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace spattn::cuda {

// `bytes` of device memory on `device`, usable in stream order on `stream`; release with
// scratch_free on the same stream. Errors become spattn::Error naming `where`.
void* scratch_alloc(size_t bytes, int device, cudaStream_t stream, const char* where);
void scratch_free(void* ptr, cudaStream_t stream);

// RAII holder of one scratch allocation (none when bytes == 0).
class Scratch {
 public:
  Scratch(size_t bytes, int device, cudaStream_t stream, const char* where) : stream_(stream) {
    if (bytes > 0) ptr_ = scratch_alloc(bytes, device, stream, where);
  }
  ~Scratch() { scratch_free(ptr_, stream_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  unsigned char* get() const { return static_cast<unsigned char*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

}  // namespace spattn::cuda
