// AdamW over a Model's flat fp32 parameters and gradients.
#pragma once
#include <cstdint>

#include "ringattn/device.h"
#include "ringattn/model.h"

namespace ringattn {

struct AdamW {
  float lr = 1e-3f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, weight_decay = 0.01f;
  int64_t step = 0;
  DeviceTensor m, v;          // the moments, on the model's device after the first step
  void update(Model& model);  // one step on model.params() with model.grads()
};

}  // namespace ringattn
