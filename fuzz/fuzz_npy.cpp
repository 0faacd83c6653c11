// libFuzzer target for the .npy reader: any bytes as a file must load or throw
// ringattn::Error — never crash, hang, read out of bounds or allocate without
// bound (the reader checks the header's sizes against the file's before it
// allocates). Built and run by fuzz/run.sh (clang, -fsanitize=fuzzer,address,undefined).
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <string>

#include "ringattn/error.h"
#include "ringattn/npy.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = "/tmp/ringattn_fuzz_npy_" + std::to_string(getpid()) + ".npy";
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return 0;
  const bool ok = std::fwrite(data, 1, size, f) == size;
  std::fclose(f);
  if (!ok) return 0;
  try {
    const ringattn::Tensor t = ringattn::load_npy(path);
    (void)t.numel();
  } catch (const ringattn::Error&) {
  }
  return 0;
}
