// The transformer on the GPU device: the token-local layers against the CPU's
// (layers.h), a training step against the CPU model (both bf16, each against the
// fp32 model), RA+SP training with P ranks sharing the GPU against one rank, and
// prefill + decode against the forward over the whole sequence. Every test skips
// when no GPU is visible.
#include <gtest/gtest.h>

#include <cmath>
#include <mutex>
#include <vector>

#include "cuda/gpu_test_util.h"
#include "ringattn/cpu/layers.h"
#include "ringattn/cuda.h"
#include "ringattn/inference.h"
#include "ringattn/layout.h"
#include "ringattn/model.h"
#include "ringattn/pipeline.h"
#include "test_util.h"

namespace ringattn::testing {
namespace {

float* f(const DeviceTensor& t) { return t.ptr<float>(); }

// Every token-local layer on device d, on fixed inputs; the outputs on the host.
std::vector<Tensor> layer_outputs(Device& d, DType compute) {
  const int64_t N = 77, C = 200, F = 136;
  const Tensor hx = host_random(DType::f32, {N, C}, 1), hg = host_random(DType::f32, {C}, 2),
               hb = host_random(DType::f32, {C}, 3), hdy = host_random(DType::f32, {N, C}, 4),
               hw = host_random(compute, {C, F}, 5), hbias = host_random(DType::f32, {F}, 6),
               hdyl = host_random(DType::f32, {N, F}, 7), hdw = host_random(DType::f32, {C, F}, 8),
               hv = host_random(DType::f32, {N, C}, 9, 0.f, 1.f);
  DeviceTensor x = d.upload(hx), g = d.upload(hg), b = d.upload(hb), dy = d.upload(hdy);
  DeviceTensor y = d.alloc(DType::f32, {N, C}), mean = d.alloc(DType::f32, {N}), rstd = d.alloc(DType::f32, {N}),
               dx = d.alloc(DType::f32, {N, C});
  DeviceTensor dg = d.upload(hg), db = d.upload(hb);  // gradients add to what is there
  d.layernorm_forward(N, C, f(x), f(g), f(b), f(y), f(mean), f(rstd));
  d.layernorm_backward(N, C, f(x), f(g), f(mean), f(rstd), f(dy), f(dx), f(dg), f(db));
  DeviceTensor ge = d.alloc(DType::f32, {N, C}), gdx = d.alloc(DType::f32, {N, C});
  d.gelu_forward(N * C, f(x), f(ge));
  d.gelu_backward(N * C, f(x), f(dy), f(gdx));
  DeviceTensor w = d.upload(hw), bias = d.upload(hbias), yl = d.alloc(DType::f32, {N, F}), dyl = d.upload(hdyl),
               dxl = d.alloc(DType::f32, {N, C}), dw = d.upload(hdw), dbl = d.upload(hbias), yb = d.upload(hdyl);
  d.linear_forward(N, C, F, f(x), w.ptr<void>(), f(bias), f(yl), compute);
  d.linear_backward(N, C, F, f(x), w.ptr<void>(), f(dyl), f(dxl), f(dw), f(dbl), compute);
  d.add_bias(N, F, f(yb), f(bias));
  DeviceTensor dl = d.alloc(DType::f32, {N, C});
  Tensor se(DType::f32, {1});
  se.ptr<float>()[0] = static_cast<float>(d.squared_error(N * C, f(x), f(y), f(dl), 0.5f));
  DeviceTensor pw = d.upload(hx), pm = d.upload(hdy), pv = d.upload(hv);
  d.adamw(N * C, f(pw), f(dy), f(pm), f(pv), {1e-2f, 0.9f, 0.999f, 1e-8f, 0.01f, 0.19f, 0.002f});
  // The language-model layers: RMSNorm, SwiGLU on a fused gate|up [N, 2F'], RoPE
  // on 5 heads of 40 columns with a row stride beyond them (as in a fused qkv).
  DeviceTensor ry = d.alloc(DType::f32, {N, C}), rr = d.alloc(DType::f32, {N}), rdx = d.alloc(DType::f32, {N, C}),
               rdg = d.upload(hg);
  d.rmsnorm_forward(N, C, f(x), f(g), f(ry), f(rr), 1e-6f);
  d.rmsnorm_backward(N, C, f(x), f(g), f(rr), f(dy), f(rdx), f(rdg));
  const int64_t Fs = C / 2;  // x as [N, 2·Fs]
  DeviceTensor sy = d.alloc(DType::f32, {N, Fs}), sdh = d.alloc(DType::f32, {N, C});
  d.swiglu_forward(N, Fs, f(x), f(sy));
  d.swiglu_backward(N, Fs, f(x), f(y), f(sdh));  // y: any [N, Fs]-sized upstream gradient rows
  std::vector<int64_t> hpos(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i) hpos[i] = (i * 37) % 1000;  // global positions out of order
  const auto pos = d.upload_positions(hpos);
  RopeConfig rc;
  rc.type = "llama3", rc.theta = 500000, rc.factor = 8, rc.original_max_positions = 64;
  const std::vector<float> hf = rope_inv_freq(rc, 40);
  DeviceTensor inv = d.upload(TensorView(const_cast<float*>(hf.data()), DType::f32, {20})), rq = d.upload(hx),
               rb = d.upload(hx);
  d.rope_forward(N, 5, 40, C, f(rq), pos.get(), f(inv));
  d.rope_forward(N, 5, 40, C, f(rb), pos.get(), f(inv));
  d.rope_backward(N, 5, 40, C, f(rb), pos.get(), f(inv));  // back to x
  std::vector<Tensor> out;
  for (const DeviceTensor* t : {&y,  &mean, &rstd, &dx, &dg, &db, &ge,  &gdx, &yl, &dxl, &dw, &dbl, &yb,
                                &dl, &pw,   &pm,   &pv, &ry, &rr, &rdx, &rdg, &sy, &sdh, &rq, &rb})
    out.push_back(download(d, *t));
  out.push_back(std::move(se));
  return out;
}

TEST(CudaLayers, MatchTheCpuLayers) {
  REQUIRE_GPU();
  auto gpu = make_cuda_device(0);
  const char* names[] = {"layernorm y",    "mean",         "rstd",           "layernorm dx", "dgamma",    "dbeta",
                         "gelu",           "gelu dx",      "linear y",       "linear dx",    "linear dW", "linear db",
                         "add_bias",       "loss dy",      "adamw w",        "adamw m",      "adamw v",   "rmsnorm y",
                         "rmsnorm rstd",   "rmsnorm dx",   "rmsnorm dgamma", "swiglu y",     "swiglu dh", "rope",
                         "rope then back", "squared error"};
  for (DType compute : {DType::f32, DType::bf16}) {
    const std::vector<Tensor> want = layer_outputs(cpu_device(), compute), got = layer_outputs(*gpu, compute);
    ASSERT_EQ(want.size(), got.size());
    for (size_t i = 0; i < want.size(); ++i)
      RA_EXPECT_CLOSE(got[i], want[i], 2e-5, cat(names[i], " (", dtype_name(compute), ")"));
  }
}

// A small bf16 model whose head dim (128) the CUDA attention kernels take; GQA,
// causal, a sequence that is not a multiple of the kernels' tiles.
ModelConfig small_model() {
  ModelConfig c;
  c.layers = 2, c.d_model = 256, c.heads = 2, c.kv_heads = 1, c.mlp_hidden = 384, c.causal = true, c.seed = 7;
  c.dtype = DType::bf16;
  return c;
}
constexpr int64_t kB = 2, kL = 96;

struct Step {
  double loss = 0;
  Tensor y, dx;
  std::vector<float> grads;
};

// Forward, MSE loss, backward of m on its device for host x, t [B, L, D].
Step forward_backward(Model& m, const Tensor& x, const Tensor& t) {
  Device& d = m.device();
  DeviceTensor gx = d.upload(x), gt = d.upload(t), dy = d.alloc(DType::f32, {x.dim(0), x.dim(1), x.dim(2)});
  Activations act;
  const DeviceTensor y = model_forward(m, gx, ModelParallel{}, act);
  Step s;
  s.loss = mse_loss(y, gt, dy, nullptr, x.numel(), d);
  m.zero_grads();
  const DeviceTensor dx = model_backward(m, act, dy, ModelParallel{});
  s.y = download(d, y), s.dx = download(d, dx), s.grads = m.host_grads();
  return s;
}

std::vector<double> doubles(const std::vector<float>& v) { return {v.begin(), v.end()}; }

TEST(CudaModel, StepIsAsCloseToFp32AsTheCpuBf16Model) {
  REQUIRE_GPU();
  auto gpu = make_cuda_device(0);
  const ModelConfig c = small_model();
  ModelConfig c32 = c;
  c32.dtype = DType::f32;
  const Tensor x = host_random(DType::f32, {kB, kL, c.d_model}, 31),
               t = host_random(DType::f32, {kB, kL, c.d_model}, 32);
  Model m32(c32), mcpu(c), mgpu(c, 1, 0, 1, 0, gpu.get());
  EXPECT_EQ(mgpu.host_params(), mcpu.host_params()) << "the same initialisation on every device";
  const Step ref = forward_backward(m32, x, t), cpu = forward_backward(mcpu, x, t), got = forward_backward(mgpu, x, t);
  const ErrReport ey_c = compare(cpu.y, ref.y), ey_g = compare(got.y, ref.y);
  const ErrReport ed_c = compare(cpu.dx, ref.dx), ed_g = compare(got.dx, ref.dx);
  const ErrReport eg_c = compare(doubles(cpu.grads), doubles(ref.grads)),
                  eg_g = compare(doubles(got.grads), doubles(ref.grads));
  std::printf(
      "[ model on the GPU ] vs fp32 CPU: y %.2e (CPU bf16 %.2e), dx %.2e (%.2e), grads %.2e (%.2e); loss %.6f "
      "cpu %.6f fp32 %.6f\n",
      ey_g.err, ey_c.err, ed_g.err, ed_c.err, eg_g.err, eg_c.err, got.loss, cpu.loss, ref.loss);
  EXPECT_LE(ey_g.err, 2 * ey_c.err + 1e-3) << ey_g;
  EXPECT_LE(ed_g.err, 2 * ed_c.err + 1e-3) << ed_g;
  EXPECT_LE(eg_g.err, 2 * eg_c.err + 1e-3) << eg_g;
  EXPECT_NEAR(got.loss, ref.loss, 1e-2 * ref.loss);
  // Training: the same few AdamW steps on both bf16 models.
  AdamW ocpu, ogpu;
  DeviceTensor gx = gpu->upload(x), gt = gpu->upload(t);
  double first = 0, last = 0;
  for (int s = 0; s < 4; ++s) {
    const double lc = train_step(mcpu, ocpu, x, t, ModelParallel{}, x.numel(), nullptr);
    const double lg = train_step(mgpu, ogpu, gx, gt, ModelParallel{}, x.numel(), nullptr);
    EXPECT_NEAR(lg, lc, 1e-2 * lc) << "step " << s;
    (s == 0 ? first : last) = lg;
  }
  EXPECT_LT(last, first) << "training on the GPU lowers the loss";
  const ErrReport ep = compare(doubles(mgpu.host_params()), doubles(mcpu.host_params()));
  EXPECT_LE(ep.err, 1e-2) << "parameters after 4 steps: " << ep;
}

// RA+SP training with P ranks sharing GPU 0 (device-local communicator) against
// one rank: loss, outputs and reduced gradients of one step.
TEST(CudaModel, RingTrainingOnPRanksMatchesOneRank) {
  REQUIRE_GPU();
  const ModelConfig c = small_model();
  const int64_t D = c.d_model;
  const Tensor x = host_random(DType::f32, {kB, kL, D}, 41), t = host_random(DType::f32, {kB, kL, D}, 42);
  auto gpu = make_cuda_device(0);
  Model one(c, 1, 0, 1, 0, gpu.get());
  const Step ref = forward_backward(one, x, t);
  double err1 = -1;
  for (int P : {2, 4}) {
    for (Layout layout : {Layout::zigzag, Layout::striped}) {
      Tensor y(DType::f32, {kB, kL, D});
      std::vector<float> grads;
      double loss = 0;
      std::mutex mu;
      run_device_local_group(P, 0, [&](int p, Device& dev, Communicator& comm) {
        Model m(c, 1, 0, 1, 0, &dev);
        Tensor lx(DType::f32, {kB, kL / P, D}), lt(DType::f32, {kB, kL / P, D});
        shard(x, lx, layout, P, p);
        shard(t, lt, layout, P, p);
        DeviceTensor gx = dev.upload(lx), gt = dev.upload(lt), dy = dev.alloc(DType::f32, {kB, kL / P, D});
        ModelParallel sp;
        sp.sp = &comm;
        sp.attn.layout = layout;
        Activations act;
        const DeviceTensor gy = model_forward(m, gx, sp, act);
        const double l = mse_loss(gy, gt, dy, &comm, x.numel(), dev);
        m.zero_grads();
        model_backward(m, act, dy, sp);
        comm.all_reduce(m.grads(), m.num_params(), ReduceOp::sum);
        const Tensor hy = download(dev, gy);
        std::vector<float> g = m.host_grads();
        std::lock_guard<std::mutex> lock(mu);
        unshard(hy, y, layout, P, p);
        if (p == 0) grads = std::move(g), loss = l;
      });
      const ErrReport ey = compare(y, ref.y), eg = compare(doubles(grads), doubles(ref.grads));
      std::printf("[ model ring on one GPU ] P=%d %-8s y %.2e grads %.2e loss %.8f (one rank %.8f)\n", P,
                  layout_name(layout), ey.err, eg.err, loss, ref.loss);
      EXPECT_LE(ey.err, 1e-2) << "P=" << P << " " << layout_name(layout) << ": " << ey;
      EXPECT_LE(eg.err, 2e-2) << "P=" << P << " " << layout_name(layout) << ": " << eg;
      EXPECT_NEAR(loss, ref.loss, 1e-3 * ref.loss);
      if (err1 < 0) err1 = ey.err;
      EXPECT_LE(ey.err, 4 * err1 + 2e-3) << "the error grows with the ring";
    }
  }
}

// Prefill + decode on the GPU (one rank, and the KV cache sharded over 2 ranks
// sharing it) against the forward over the whole sequence on one GPU.
TEST(CudaModel, DecodeMatchesTheWholeSequence) {
  REQUIRE_GPU();
  const ModelConfig c = small_model();
  const int64_t D = c.d_model, L = 70, steps = 3;
  const Tensor seq = host_random(DType::f32, {kB, L + steps, D}, 51);
  auto gpu = make_cuda_device(0);
  Model full(c, 1, 0, 1, 0, gpu.get());
  Activations act;
  const Tensor ref = download(*gpu, model_forward(full, gpu->upload(seq), ModelParallel{}, act));
  for (int P : {1, 2}) {
    Tensor got(DType::f32, {kB, steps, D});
    std::mutex mu;
    run_device_local_group(P, 0, [&](int p, Device& dev, Communicator& comm) {
      Model m(c, 1, 0, 1, 0, &dev);
      ModelParallel sp;
      sp.sp = P > 1 ? &comm : nullptr;
      sp.attn.layout = Layout::contiguous;
      KVCache cache(m, kB, L / P + steps, P, p);
      Tensor prompt(DType::f32, {kB, L, D}), local(DType::f32, {kB, L / P, D});
      copy_into(prompt, seq.view().slice(1, 0, L));
      shard(prompt, local, Layout::contiguous, P, p);
      prefill(m, cache, dev.upload(local), 0, sp);
      for (int64_t j = 0; j < steps; ++j) {
        Tensor in(DType::f32, {kB, 1, D});
        copy_into(in, seq.view().slice(1, L + j, 1));
        const Tensor y = download(dev, decode_step(m, cache, dev.upload(in), sp));
        std::lock_guard<std::mutex> lock(mu);
        if (p == 0) copy_into(got.view().slice(1, j, 1), y);
      }
    });
    const ErrReport e = compare(got, ref.view().slice(1, L, steps));
    std::printf("[ decode on the GPU ] P=%d: %.2e\n", P, e.err);
    EXPECT_LE(e.err, 2e-2) << "P=" << P << ": " << e;
  }
}

// What the GPU model refuses, with a message that says so.
TEST(CudaModel, RefusesWhatItCannotRun) {
  REQUIRE_GPU();
  auto gpu = make_cuda_device(0);
  ModelConfig c = small_model();
  c.dtype = DType::f32;
  EXPECT_THROW(Model(c, 1, 0, 1, 0, gpu.get()), Error);
  c.dtype = DType::bf16;
  EXPECT_THROW(Model(c, 2, 0, 1, 0, gpu.get()), Error);  // tensor parallel
  try {
    c.dtype = DType::f32;
    Model m(c, 1, 0, 1, 0, gpu.get());
    ADD_FAILURE() << "an fp32 model on the GPU was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bf16"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace ringattn::testing
