// ringattn::Error — the one exception type of the library. Messages say what was
// wrong and what to do about it; the CLI prints them and exits non-zero.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace ringattn {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Concatenates any streamable arguments into one string.
template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

// Throws Error(cat(args...)) when cond is false.
template <typename... Args>
void check(bool cond, const Args&... args) {
  if (!cond) throw Error(cat(args...));
}

}  // namespace ringattn
