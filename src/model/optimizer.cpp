// AdamW (decoupled weight decay) over a model's flat parameters, on its device.
#include "ringattn/optimizer.h"

#include <cmath>

namespace ringattn {

void AdamW::update(Model& model) {
  Device& dev = model.device();
  const int64_t n = model.num_params();
  if (m.numel() != n) {
    m = dev.alloc(DType::f32, {n}), v = dev.alloc(DType::f32, {n});
    dev.fill(m, 0.f), dev.fill(v, 0.f);
  }
  ++step;
  const float c1 = 1.f - std::pow(beta1, static_cast<float>(step)),
              c2 = 1.f - std::pow(beta2, static_cast<float>(step));
  dev.adamw(n, model.params(), model.grads(), m.ptr<float>(), v.ptr<float>(),
            {lr, beta1, beta2, eps, weight_decay, c1, c2});
}

}  // namespace ringattn
