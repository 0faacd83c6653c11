#include "kernels/cuda/cublas_loader.h"

#include <dlfcn.h>

#include <string>
#include <type_traits>

#include "ringattn/error.h"

#define RINGATTN_STR2(x) #x
#define RINGATTN_STR(x) RINGATTN_STR2(x)

namespace ringattn::cuda {
namespace {

// The soname of the cuBLAS the headers describe (libcublas.so.<major>).
constexpr const char* kSoname = "libcublas.so." RINGATTN_STR(CUBLAS_VER_MAJOR);

// The header's declaration, not a guess: the cast fails to compile if none matches.
static_assert(std::is_same_v<decltype(static_cast<CublasGemmEx>(&cublasGemmEx)), CublasGemmEx>);

Cublas load() {
  std::string tried = kSoname;
  void* lib = dlopen(kSoname, RTLD_NOW | RTLD_LOCAL);
#ifdef RINGATTN_CUBLAS_DIR
  if (!lib) {
    const std::string path = std::string(RINGATTN_CUBLAS_DIR) + "/" + kSoname;
    tried += " and " + path;
    lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  }
#endif
  if (!lib) throw Error(cat("cuBLAS could not be loaded (tried ", tried, "): ", dlerror()));
  auto sym = [&]<typename Fn>(Fn& fn, const char* name) {
    dlerror();
    void* p = dlsym(lib, name);
    if (!p) throw Error(cat("cuBLAS (", kSoname, ") has no entry point ", name, ": ", dlerror()));
    fn = reinterpret_cast<Fn>(p);
  };
  Cublas c{};
  sym(c.create, "cublasCreate_v2");
  sym(c.destroy, "cublasDestroy_v2");
  sym(c.set_stream, "cublasSetStream_v2");
  sym(c.gemm_ex, "cublasGemmEx");
  sym(c.status_string, "cublasGetStatusString");
  return c;  // the library stays open for the life of the process
}

}  // namespace

const Cublas& cublas() {
  static const Cublas c = load();
  return c;
}

}  // namespace ringattn::cuda
