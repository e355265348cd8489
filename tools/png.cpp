#include "png.hpp"

#include <png.h>

#include <cstdio>
#include <memory>

#include "spattn/error.hpp"

namespace spattn::tools {

void write_png(const std::string& path, const Image& image) {
  SPATTN_CHECK(image.width > 0 && image.height > 0 &&
                   image.rgb.size() == size_t(image.width) * size_t(image.height) * 3,
               "write_png: image must be non-empty RGB; got ", image.width, "x", image.height);
  std::unique_ptr<FILE, int (*)(FILE*)> file(std::fopen(path.c_str(), "wb"), &std::fclose);
  SPATTN_CHECK(file != nullptr, "write_png: file must be writable; got ", path);
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (!png || !info) {
    png_destroy_write_struct(&png, &info);
    detail::throw_error("write_png: libpng could not start for ", path);
  }
  // libpng reports errors by longjmp; nothing with a destructor lives between here and the end.
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, &info);
    detail::throw_error("write_png: libpng failed while writing ", path);
  }
  png_init_io(png, file.get());
  png_set_IHDR(png, info, png_uint_32(image.width), png_uint_32(image.height), 8,
               PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT,
               PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  for (int y = 0; y < image.height; ++y)
    png_write_row(png, const_cast<png_bytep>(image.rgb.data() + size_t(y) * size_t(image.width) * 3));
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
}

}  // namespace spattn::tools
