// write_file_atomically: temporary file + fsync + rename (see atomic_file.h).
#include "ringattn/atomic_file.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "ringattn/error.h"

namespace ringattn {

void write_file_atomically(const std::string& path, const std::function<bool(std::FILE*)>& write) {
  const std::string tmp = cat(path, ".tmp.", getpid());
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) throw Error(cat(path, ": cannot open for writing: ", std::strerror(errno)));
  bool ok = write(f);
  int err = ok ? 0 : errno;
  ok = ok && std::fflush(f) == 0 && fsync(fileno(f)) == 0;
  if (!ok && err == 0) err = errno;
  if (std::fclose(f) != 0 && ok) {
    ok = false;
    err = errno;
  }
  if (ok && std::rename(tmp.c_str(), path.c_str()) != 0) {
    ok = false;
    err = errno;
  }
  if (!ok) {
    std::remove(tmp.c_str());
    throw Error(cat(path, ": write failed: ", std::strerror(err ? err : EIO)));
  }
}

}  // namespace ringattn
