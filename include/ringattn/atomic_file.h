// Results are never left half-written: write_file_atomically writes to a
// temporary file beside `path`, flushes it to disk and renames it over `path`
// (atomic on POSIX file systems). If writing fails, `path` is untouched (an
// earlier file stays whole) and the temporary file is removed.
#pragma once
#include <cstdio>
#include <functional>
#include <string>

namespace ringattn {

// write(f) writes the contents and returns false on failure (errno set). Throws
// Error naming `path` and the reason.
void write_file_atomically(const std::string& path, const std::function<bool(std::FILE*)>& write);

}  // namespace ringattn
