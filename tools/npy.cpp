#include "npy.hpp"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <vector>

#include "spattn/error.hpp"

namespace spattn::tools {

namespace {

// The value of `key` in the header dict, as the raw text up to the next top-level comma/brace.
std::string dict_value(const std::string& header, const std::string& key, const std::string& path) {
  const std::string quoted = "'" + key + "'";
  size_t at = header.find(quoted);
  SPATTN_CHECK(at != std::string::npos, "read_npy: ", path, " header must hold ", quoted,
               "; got ", header);
  at = header.find(':', at);
  SPATTN_CHECK(at != std::string::npos, "read_npy: ", path, " header is malformed: ", header);
  ++at;
  while (at < header.size() && header[at] == ' ') ++at;
  if (header[at] == '(') return header.substr(at, header.find(')', at) - at + 1);
  size_t end = at;
  while (end < header.size() && header[end] != ',' && header[end] != '}') ++end;
  return header.substr(at, end - at);
}

}  // namespace

Tensor read_npy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  SPATTN_CHECK(in.good(), "read_npy: file must be readable; got ", path);
  char magic[8];
  in.read(magic, 8);
  SPATTN_CHECK(in.gcount() == 8 && std::memcmp(magic, "\x93NUMPY", 6) == 0, "read_npy: ", path,
               " must start with the .npy magic string");
  const int major = static_cast<unsigned char>(magic[6]);
  SPATTN_CHECK(major >= 1 && major <= 3, "read_npy: ", path, " format version must be 1-3; got ",
               major);
  uint32_t header_len = 0;
  unsigned char len_bytes[4] = {0, 0, 0, 0};
  in.read(reinterpret_cast<char*>(len_bytes), major == 1 ? 2 : 4);
  header_len = uint32_t(len_bytes[0]) | uint32_t(len_bytes[1]) << 8 | uint32_t(len_bytes[2]) << 16 |
               uint32_t(len_bytes[3]) << 24;
  SPATTN_CHECK(header_len < (1u << 20), "read_npy: ", path, " header is too long (", header_len,
               " bytes)");
  std::string header(header_len, '\0');
  in.read(header.data(), header_len);
  SPATTN_CHECK(in.good(), "read_npy: ", path, " is truncated inside its header");

  std::string descr = dict_value(header, "descr", path);
  descr.erase(std::remove(descr.begin(), descr.end(), '\''), descr.end());
  DType dtype;
  if (descr == "<f4") dtype = DType::float32;
  else if (descr == "<f2") dtype = DType::float16;
  else if (descr == "<f8") dtype = DType::float64;
  else if (descr == "<u2") dtype = DType::bfloat16;  // bfloat16 bits saved as uint16
  else
    detail::throw_error("read_npy: ", path,
                        " dtype must be <f4, <f2, <f8 or <u2 (bfloat16 bits); got ", descr);
  const std::string fortran = dict_value(header, "fortran_order", path);
  SPATTN_CHECK(fortran.find("False") != std::string::npos, "read_npy: ", path,
               " must be C-order (fortran_order False); got ", fortran);

  std::vector<int64_t> shape;
  const std::string tuple = dict_value(header, "shape", path);
  for (size_t at = 1; at < tuple.size();) {
    while (at < tuple.size() && (tuple[at] == ' ' || tuple[at] == ',')) ++at;
    if (at >= tuple.size() || tuple[at] == ')') break;
    size_t used = 0;
    shape.push_back(std::stoll(tuple.substr(at), &used));
    at += used;
  }
  SPATTN_CHECK(!shape.empty() && shape.size() <= 4, "read_npy: ", path,
               " must have rank 1 to 4; got shape ", tuple);
  Tensor t = Tensor::empty(shape, dtype);
  const std::streamsize bytes = std::streamsize(t.numel() * dtype_size(dtype));
  in.read(static_cast<char*>(t.ref().data), bytes);
  SPATTN_CHECK(in.gcount() == bytes, "read_npy: ", path, " must hold ", bytes,
               " data bytes for shape ", tuple, "; got ", in.gcount());
  return t;
}

void write_npy_float32(const std::string& path, const Tensor& t) {
  SPATTN_CHECK(t.dtype() == DType::float32 && t.ref().is_contiguous(),
               "write_npy_float32: tensor must be contiguous float32");
  std::string shape = "(";
  for (int d = 0; d < t.ref().rank; ++d) shape += std::to_string(t.size(d)) + ", ";
  shape += ")";
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }";
  while ((10 + header.size() + 1) % 64 != 0) header += ' ';
  header += '\n';
  std::ofstream out(path, std::ios::binary);
  SPATTN_CHECK(out.good(), "write_npy_float32: file must be writable; got ", path);
  out.write("\x93NUMPY\x01\x00", 8);
  const uint16_t len = uint16_t(header.size());
  const char len_bytes[2] = {char(len & 0xff), char(len >> 8)};
  out.write(len_bytes, 2);
  out.write(header.data(), std::streamsize(header.size()));
  out.write(static_cast<const char*>(t.ref().data), std::streamsize(t.numel() * 4));
}

}  // namespace spattn::tools
