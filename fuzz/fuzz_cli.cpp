// libFuzzer target for the command line: any argument vector must parse, or be
// refused with CLI11's ParseError or ringattn::Error — never crash or hang. The
// main app's parse-complete callback (which CLI11 runs after every option is
// parsed and validated, before the subcommands' callbacks) stops there, so the
// commands themselves never run. Input: arguments separated by NUL or newlines.
#include <CLI/CLI.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "ringattn/error.h"

namespace {
struct Parsed {};  // thrown when parsing succeeded, before any command runs
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<std::string> args = {"ringattn"};
  std::string cur;
  for (size_t i = 0; i < size && args.size() < 64; ++i) {
    const char c = static_cast<char>(data[i]);
    if (c == '\0' || c == '\n') {
      args.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) args.push_back(cur);
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());

  CLI::App app{"ringattn"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "ringattn");
  ringattn::cli::add_all(app);
  app.parse_complete_callback([] { throw Parsed{}; });
  try {
    app.parse(static_cast<int>(argv.size()), argv.data());
  } catch (const Parsed&) {
  } catch (const CLI::Error&) {
  } catch (const ringattn::Error&) {
  }
  return 0;
}
