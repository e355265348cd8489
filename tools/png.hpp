// PNG output for spattn::Image (libpng).
#pragma once

#include <string>

#include "spattn/diagnostics.hpp"

namespace spattn::tools {

// Throws spattn::Error when the file cannot be written.
void write_png(const std::string& path, const Image& image);

}  // namespace spattn::tools
