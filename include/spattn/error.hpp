// spattn::Error and the checking macro every public entry point uses.
//
// Messages follow one shape so callers can act on them:
//   "<function>: <argument> <what was expected>; got <actual>"
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace spattn {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
template <class... Parts>
[[noreturn]] void throw_error(const Parts&... parts) {
  std::ostringstream message;
  (message << ... << parts);
  throw Error(message.str());
}
}  // namespace detail

}  // namespace spattn

// SPATTN_CHECK(cond, "forward: q.shape[3] must be ", 64, "; got ", d)
#define SPATTN_CHECK(cond, ...)                      \
  do {                                               \
    if (!(cond)) ::spattn::detail::throw_error(__VA_ARGS__); \
  } while (0)
