// A small reader for NumPy .npy files: little-endian, C-order float32, float16, float64, and
// bfloat16 stored as uint16 bit patterns ('<u2'), any rank up to 4.
#pragma once

#include <string>

#include "spattn/tensor.hpp"

namespace spattn::tools {

// Throws spattn::Error naming the file and what is wrong with it.
Tensor read_npy(const std::string& path);

// Writes a contiguous float32 tensor (used by the tests to make inputs).
void write_npy_float32(const std::string& path, const Tensor& t);

}  // namespace spattn::tools
