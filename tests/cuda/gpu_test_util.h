// What the CUDA tests share: skipping without a GPU, random host inputs, and
// host copies of device tensors.
#pragma once
#include <gtest/gtest.h>

#include "ringattn/cuda.h"
#include "test_util.h"

// Skips the test, saying why, when no GPU is visible (CI builds the CUDA tests
// but has no GPU; CTest's skip regex matches the message).
#define REQUIRE_GPU()                                                                                    \
  do {                                                                                                   \
    if (::ringattn::cuda_device_count() == 0) GTEST_SKIP() << "no GPU visible: the CUDA tests need one"; \
  } while (0)

namespace ringattn::testing {

// A host tensor of uniform values in [lo, hi) in dtype dt.
inline Tensor host_random(DType dt, std::initializer_list<int64_t> shape, uint32_t seed, float lo = -1.f,
                          float hi = 1.f) {
  Tensor t(dt, shape);
  fill_uniform(t.view(), seed, lo, hi);
  return t;
}

inline Tensor download(Device& dev, const TensorView& x) {
  Tensor h(x.dtype, x.rank, x.shape.data());
  dev.download(h.view(), x);
  return h;
}

}  // namespace ringattn::testing
