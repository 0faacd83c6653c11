// See launch.h.
#include "cli/launch.h"

#include <unistd.h>

#include <sys/wait.h>
#include <cstdio>
#include <thread>

#include "ringattn/error.h"

namespace ringattn::cli {

std::string default_launcher(int ranks) {
  std::string l = "mpirun --bind-to none --mca pml ob1 --mca btl self,vader";
  if (geteuid() == 0) l += " --allow-run-as-root";
  if (ranks > static_cast<int>(std::thread::hardware_concurrency())) l += " --oversubscribe";
  return l;
}

std::string self_executable() {
  char self[4096] = {};
  check(readlink("/proc/self/exe", self, sizeof(self) - 1) > 0, "cannot find the ringattn executable");
  return self;
}

std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

std::string capture(const std::string& cmd) {
  FILE* p = popen(cmd.c_str(), "r");
  check(p != nullptr, "could not start: ", cmd);
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  const int status = pclose(p);
  check(status == 0, "exit status ", WEXITSTATUS(status), " from: ", cmd);
  return out;
}

}  // namespace ringattn::cli
