// Starting ringattn itself under mpirun from a command (`compare`, `plan
// --calibrate`): the default launcher line, this executable, running a command
// and capturing its stdout.
#pragma once
#include <string>

namespace ringattn::cli {

// "mpirun --bind-to none --mca pml ob1 --mca btl self,vader", plus --allow-run-as-root as root
// and --oversubscribe when ranks exceed the CPUs.
std::string default_launcher(int ranks);
std::string self_executable();  // the running ringattn binary, for the launched ranks
std::string shell_quote(const std::string& s);
// Runs cmd, returns its stdout; throws Error with the exit status on failure.
std::string capture(const std::string& cmd);

}  // namespace ringattn::cli
