// Output files (see atomic_file.h): symlinks followed to the real file, regular
// files replaced atomically from a temporary file beside them with their mode and
// owner kept, other writable nodes (devices, FIFOs, /dev/stdout) written in place.
#include "ringattn/atomic_file.h"

#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <optional>

#include "ringattn/error.h"

namespace ringattn {
namespace {

std::string dir_of(const std::string& p) {
  const size_t slash = p.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : p.substr(0, slash);
}

std::string base_of(const std::string& p) {
  const size_t slash = p.find_last_of('/');
  return slash == std::string::npos ? p : p.substr(slash + 1);
}

// Where a write to `path` lands. `node` is set when `path` (links followed)
// names an existing entry.
struct Target {
  std::string real;  // the path to write: links resolved (the path as given for non-regular nodes)
  std::optional<struct stat> node;
};

Target resolve(const std::string& path) {
  check(!path.empty(), "an output path is empty");
  Target t;
  struct stat st;
  if (::stat(path.c_str(), &st) == 0) {
    t.node = st;
    check(!S_ISDIR(st.st_mode), path, ": is a directory, not a file");
    if (!S_ISREG(st.st_mode)) {  // device, FIFO, socket, /proc/self/fd/N of a pipe: written as it is
      t.real = path;
      return t;
    }
    char buf[PATH_MAX];
    check(::realpath(path.c_str(), buf) != nullptr, path, ": cannot resolve: ", std::strerror(errno));
    t.real = buf;
    return t;
  }
  check(errno == ENOENT, path, ": ", std::strerror(errno));
  // Nothing there yet: follow a dangling symlink chain to the file it names.
  std::string p = path;
  for (int hops = 0;; ++hops) {
    check(hops < 40, path, ": too many levels of symbolic links");
    struct stat lst;
    if (::lstat(p.c_str(), &lst) != 0 || !S_ISLNK(lst.st_mode)) break;
    char buf[PATH_MAX];
    const ssize_t n = ::readlink(p.c_str(), buf, sizeof(buf) - 1);
    check(n >= 0, p, ": cannot read the symbolic link: ", std::strerror(errno));
    const std::string to(buf, static_cast<size_t>(n));
    p = to[0] == '/' ? to : cat(dir_of(p), "/", to);
  }
  const std::string dir = dir_of(p);
  struct stat dst;
  check(::stat(dir.c_str(), &dst) == 0, path, ": cannot create: directory ", dir, " does not exist");
  check(S_ISDIR(dst.st_mode), path, ": cannot create: ", dir, " is not a directory");
  t.real = p;
  return t;
}

mode_t creation_mode() {
  static const mode_t mode = [] {
    const mode_t mask = ::umask(022);
    ::umask(mask);
    return static_cast<mode_t>(0666 & ~mask);
  }();
  return mode;
}

void write_in_place(const std::string& path, const std::function<bool(std::FILE*)>& write) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) throw Error(cat(path, ": cannot open for writing: ", std::strerror(errno)));
  bool ok = write(f);
  int err = ok ? 0 : errno;
  ok = ok && std::fflush(f) == 0;
  if (!ok && err == 0) err = errno;
  if (std::fclose(f) != 0 && ok) {
    ok = false;
    err = errno;
  }
  if (!ok) throw Error(cat(path, ": write failed: ", std::strerror(err ? err : EIO)));
}

// The same file, for outputs and inputs: device and inode when it exists, else
// the resolved path it would be created at.
struct Identity {
  bool exists = false;
  dev_t dev = 0;
  ino_t ino = 0;
  std::string real;
  bool operator==(const Identity& o) const {
    return exists == o.exists && (exists ? dev == o.dev && ino == o.ino : real == o.real);
  }
};

Identity identity(const Target& t) {
  Identity id;
  if (t.node) {
    id.exists = true;
    id.dev = t.node->st_dev;
    id.ino = t.node->st_ino;
  } else {
    char buf[PATH_MAX];
    const std::string dir = dir_of(t.real);
    id.real = cat(::realpath(dir.c_str(), buf) ? std::string(buf) : dir, "/", base_of(t.real));
  }
  return id;
}

}  // namespace

void write_file_atomically(const std::string& path, const std::function<bool(std::FILE*)>& write) {
  const Target t = resolve(path);
  if (t.node && !S_ISREG(t.node->st_mode)) return write_in_place(t.real, write);

  std::string tmpl = cat(dir_of(t.real), "/.", base_of(t.real), ".tmp.XXXXXX");
  const int fd = ::mkstemp(tmpl.data());
  if (fd < 0)
    throw Error(cat(path, ": cannot create a temporary file in ", dir_of(t.real), ": ", std::strerror(errno)));
  const std::string tmp = tmpl;
  // mkstemp creates 0600: give the file the mode (and owner) it will replace, or a new file's.
  const mode_t mode = t.node ? (t.node->st_mode & 07777) : creation_mode();
  bool ok = ::fchmod(fd, mode) == 0;
  int err = ok ? 0 : errno;
  if (ok && t.node && (t.node->st_uid != ::geteuid() || t.node->st_gid != ::getegid()))
    (void)!::fchown(fd, t.node->st_uid, t.node->st_gid);  // kept where allowed; else the writer owns it, as editors do
  std::FILE* f = ok ? ::fdopen(fd, "wb") : nullptr;
  if (!f) {
    if (ok) err = errno;
    ::close(fd);
    std::remove(tmp.c_str());
    throw Error(cat(path, ": cannot write: ", std::strerror(err ? err : EIO)));
  }
  ok = write(f);
  err = ok ? 0 : errno;
  ok = ok && std::fflush(f) == 0 && ::fsync(::fileno(f)) == 0;
  if (!ok && err == 0) err = errno;
  if (std::fclose(f) != 0 && ok) {
    ok = false;
    err = errno;
  }
  if (ok && std::rename(tmp.c_str(), t.real.c_str()) != 0) {
    ok = false;
    err = errno;
  }
  if (!ok) {
    std::remove(tmp.c_str());
    throw Error(cat(path, ": write failed: ", std::strerror(err ? err : EIO)));
  }
}

void check_output_paths(const NamedPaths& outputs, const NamedPaths& inputs) {
  std::vector<std::pair<const std::pair<std::string, std::string>*, Identity>> seen;
  for (const auto& in : inputs) {
    if (in.second.empty()) continue;
    struct stat st;
    if (::stat(in.second.c_str(), &st) != 0) continue;  // the reader reports a missing input
    Identity id;
    id.exists = true;
    id.dev = st.st_dev;
    id.ino = st.st_ino;
    seen.emplace_back(&in, id);
  }
  const size_t n_inputs = seen.size();
  for (const auto& out : outputs) {
    if (out.second.empty()) continue;
    const std::string& p = out.second;
    Target t;
    try {
      t = resolve(p);
    } catch (const Error& e) {
      throw Error(cat(out.first, " ", e.what()));
    }
    if (t.node) {
      check(::access(t.real.c_str(), W_OK) == 0, out.first, " ", p, ": not writable: ", std::strerror(errno));
    }
    if (!t.node || S_ISREG(t.node->st_mode)) {  // a new file or a replaced one: its directory must take it
      const std::string dir = dir_of(t.real);
      check(::access(dir.c_str(), W_OK) == 0, out.first, " ", p, ": cannot write in ", dir, ": ", std::strerror(errno));
    }
    const Identity id = identity(t);
    const bool special = t.node && !S_ISREG(t.node->st_mode);  // /dev/null may take several outputs
    for (size_t i = 0; i < seen.size() && !special; ++i) {
      if (!(seen[i].second == id)) continue;
      if (i < n_inputs)
        throw Error(cat(out.first, " ", p, " is the input ", seen[i].first->first, " ", seen[i].first->second,
                        ": it would be overwritten"));
      throw Error(cat(out.first, " ", p, " and ", seen[i].first->first, " ", seen[i].first->second,
                      " are the same file: one result would be lost"));
    }
    seen.emplace_back(&out, id);
  }
}

}  // namespace ringattn
