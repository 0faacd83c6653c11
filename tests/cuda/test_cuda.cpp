// The CUDA path against the double-precision reference (tests/reference.h), the
// same contracts and tolerances as the CPU kernels: forward (o, lse), backward,
// merge, on odd shapes, causal by explicit or default positions, GQA, rows that
// see no key; then the ring on one GPU with P ranks sharing it (device-local
// communicator) at P = 1..8 and every layout, and NCCL at one rank. Every test
// skips, saying why, when no GPU is visible (CI builds these but has no GPU).
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <mutex>
#include <numeric>
#include <vector>

#include "cuda/gpu_test_util.h"
#include "kernels/cuda/cublas_loader.h"
#include "reference.h"
#include "ringattn/cuda.h"
#include "ringattn/dist_attention.h"
#include "ringattn/layout.h"
#include "test_util.h"

namespace ringattn::testing {
namespace {

double tol_fwd(DType dt) { return dt == DType::bf16 ? kTolBf16 : kTolF16; }
double tol_bwd(DType dt) { return dt == DType::bf16 ? kTolBf16Bwd : 5e-3; }

struct Shape {
  int64_t B, Lq, Lk, H, Hkv, d;
  bool explicit_pos;  // scattered positions (as a zigzag/striped shard has) instead of the defaults
};

std::vector<int64_t> scattered(int64_t n, int64_t mul, int64_t mod, int64_t off) {
  std::vector<int64_t> p(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) p[i] = (i * mul) % mod + off;
  return p;
}

struct Case {
  Shape s;
  DType dt;
  bool causal;
  DType o_dt;
};

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  const Case& c = info.param;
  return cat("B", c.s.B, "_Lq", c.s.Lq, "_Lk", c.s.Lk, "_H", c.s.H, "_Hkv", c.s.Hkv, "_d", c.s.d,
             c.s.explicit_pos ? "_pos" : "", "_", dtype_name(c.dt), c.causal ? "_causal" : "", "_o",
             dtype_name(c.o_dt));
}

std::vector<Case> cases() {
  const Shape shapes[] = {{2, 77, 131, 4, 2, 64, false},
                          {1, 131, 77, 2, 1, 128, false},
                          {1, 200, 200, 2, 2, 128, false},
                          {2, 1, 300, 4, 1, 128, false},
                          {1, 130, 64, 4, 4, 64, true},
                          {1, 96, 160, 2, 1, 128, true},
                          // many key tiles and query blocks (the pipelined stages; causal tiles skipped)
                          {1, 600, 600, 2, 1, 128, false},
                          {1, 77, 1000, 2, 2, 64, true},
                          // causal: whole 128-row query blocks that see no key at all
                          {1, 300, 100, 2, 1, 128, false},
                          // decoding: few query rows, many keys (keys split over blocks, then merged)
                          {3, 1, 777, 2, 2, 64, false},
                          {1, 5, 2048, 2, 1, 64, false},
                          {2, 1, 3000, 4, 2, 128, true}};
  std::vector<Case> out;
  for (const Shape& s : shapes)
    for (DType dt : {DType::bf16, DType::f16})
      for (bool causal : {false, true})
        for (DType o_dt : {DType::f32, dt}) out.push_back({s, dt, causal, o_dt});
  return out;
}

class CudaKernel : public ::testing::TestWithParam<Case> {};

bool cublas_mapped() {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line))
    if (line.find("libcublas") != std::string::npos) return true;
  return false;
}

// No GPU needed: the library opens on first use and has every entry point the
// CUDA path calls (CTest runs this case on machines without a GPU too).
TEST(CublasLoader, OpensTheLibraryOnFirstUse) {
  EXPECT_FALSE(cublas_mapped());
  const cuda::Cublas& blas = cuda::cublas();
  EXPECT_TRUE(cublas_mapped());
  EXPECT_TRUE(blas.create && blas.destroy && blas.set_stream && blas.gemm_ex && blas.status_string);
  EXPECT_STREQ(blas.status_string(CUBLAS_STATUS_NOT_INITIALIZED), "the library was not initialized");
  EXPECT_EQ(&cuda::cublas(), &blas);  // resolved once
}

TEST_P(CudaKernel, ForwardAndBackwardMatchReference) {
  REQUIRE_GPU();
  const Case c = GetParam();
  const Shape& s = c.s;
  auto dev = make_cuda_device(0);
  Tensor q = host_random(c.dt, {s.B, s.Lq, s.H, s.d}, 1), k = host_random(c.dt, {s.B, s.Lk, s.Hkv, s.d}, 2),
         v = host_random(c.dt, {s.B, s.Lk, s.Hkv, s.d}, 3), dout = host_random(c.dt, {s.B, s.Lq, s.H, s.d}, 4);
  AttentionOptions opt;
  opt.causal = c.causal;
  std::vector<int64_t> qp, kp;
  if (s.explicit_pos) {
    qp = scattered(s.Lq, 7, s.Lq + s.Lk, 0);
    kp = scattered(s.Lk, 5, s.Lq + s.Lk, 3);
    opt.q_pos = qp;
    opt.k_pos = kp;
  }
  const RefResult ref = reference_backward(q, k, v, dout, opt);

  DeviceTensor dq_ = dev->upload(q), dk_ = dev->upload(k), dv_ = dev->upload(v), ddo = dev->upload(dout);
  DeviceTensor o = dev->alloc(c.o_dt, {s.B, s.Lq, s.H, s.d}), lse = dev->alloc(DType::f32, {s.B, s.H, s.Lq});
  dev->fill(o, NAN);  // every element must be written
  dev->fill(lse, NAN);
  std::shared_ptr<const int64_t> gq, gk;
  AttentionOptions gopt = opt;
  if (s.explicit_pos) {
    gq = dev->upload_positions(qp);
    gk = dev->upload_positions(kp);
    gopt.q_pos = {gq.get(), qp.size()};
    gopt.k_pos = {gk.get(), kp.size()};
  }
  dev->attention_forward(dq_, dk_, dv_, o, lse, gopt);
  RA_EXPECT_CLOSE(download(*dev, o), ref.o, tol_fwd(c.dt), "o");
  RA_EXPECT_CLOSE(download(*dev, lse), ref.lse, 1e-2, "lse");

  DeviceTensor gdq = dev->alloc(DType::f32, {s.B, s.Lq, s.H, s.d}),
               gdk = dev->alloc(DType::f32, {s.B, s.Lk, s.Hkv, s.d}),
               gdv = dev->alloc(DType::f32, {s.B, s.Lk, s.Hkv, s.d});
  for (const DeviceTensor* g : {&gdq, &gdk, &gdv}) dev->fill(*g, NAN);
  dev->attention_backward(dq_, dk_, dv_, o, lse, ddo, gdq, gdk, gdv, gopt);
  RA_EXPECT_CLOSE_FLOOR(download(*dev, gdq), ref.dq, tol_bwd(c.dt), 1e-3, "dq");
  RA_EXPECT_CLOSE_FLOOR(download(*dev, gdk), ref.dk, tol_bwd(c.dt), 1e-3, "dk");
  RA_EXPECT_CLOSE_FLOOR(download(*dev, gdv), ref.dv, tol_bwd(c.dt), 1e-3, "dv");
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaKernel, ::testing::ValuesIn(cases()), case_name);

// Scores of 1e9 to 1e30 (bf16 q, k entries up to 1e15; fp16 cannot hold them):
// the softmax is (nearly) one-hot and must stay exact, on the tiled kernels and
// the split-key decode kernel; the backward must stay finite. A fused s·c − m once
// left the row max's rounding error in the exponent (Inf, NaN).
TEST(CudaKernelRange, HugeScoresStayExact) {
  REQUIRE_GPU();
  auto dev = make_cuda_device(0);
  const Shape shapes[] = {{1, 200, 200, 2, 1, 128, false}, {2, 1, 3000, 4, 2, 128, false}};
  for (const Shape& s : shapes)
    for (float amp : {3e4f, 1e10f, 1e15f})
      for (bool causal : {false, true}) {
        SCOPED_TRACE(cat("Lq ", s.Lq, " Lk ", s.Lk, " amp ", amp, causal ? " causal" : ""));
        Tensor q = host_random(DType::bf16, {s.B, s.Lq, s.H, s.d}, 11, -amp, amp),
               k = host_random(DType::bf16, {s.B, s.Lk, s.Hkv, s.d}, 12, -amp, amp),
               v = host_random(DType::bf16, {s.B, s.Lk, s.Hkv, s.d}, 13),
               dout = host_random(DType::bf16, {s.B, s.Lq, s.H, s.d}, 14);
        AttentionOptions opt;
        opt.causal = causal;
        const RefResult ref = reference_forward(q, k, v, opt);
        DeviceTensor gq = dev->upload(q), gk = dev->upload(k), gv = dev->upload(v), gdo = dev->upload(dout);
        DeviceTensor o = dev->alloc(DType::f32, {s.B, s.Lq, s.H, s.d}), lse = dev->alloc(DType::f32, {s.B, s.H, s.Lq});
        dev->attention_forward(gq, gk, gv, o, lse, opt);
        RA_EXPECT_CLOSE(download(*dev, o), ref.o, tol_fwd(DType::bf16), "o");
        RA_EXPECT_CLOSE(download(*dev, lse), ref.lse, 1e-2, "lse");
        DeviceTensor gdq = dev->alloc(DType::f32, {s.B, s.Lq, s.H, s.d}),
                     gdk = dev->alloc(DType::f32, {s.B, s.Lk, s.Hkv, s.d}),
                     gdv = dev->alloc(DType::f32, {s.B, s.Lk, s.Hkv, s.d});
        dev->attention_backward(gq, gk, gv, o, lse, gdo, gdq, gdk, gdv, opt);
        for (const DeviceTensor* g : {&gdq, &gdk, &gdv}) {
          const Tensor h = download(*dev, *g);
          bool finite = true;
          for (int64_t i = 0; i < h.numel(); ++i) finite &= std::isfinite(h.ptr<float>()[i]);
          EXPECT_TRUE(finite) << "a gradient is not finite";
        }
      }
}

// Two halves of the keys, merged, give the full attention (to the rounding of P).
TEST(CudaMerge, HalvesMergeToTheWhole) {
  REQUIRE_GPU();
  auto dev = make_cuda_device(0);
  const int64_t B = 2, Lq = 90, Lk = 150, H = 4, Hkv = 2, d = 64;
  Tensor q = host_random(DType::bf16, {B, Lq, H, d}, 5), k = host_random(DType::bf16, {B, Lk, Hkv, d}, 6),
         v = host_random(DType::bf16, {B, Lk, Hkv, d}, 7);
  AttentionOptions opt;
  opt.causal = true;
  const RefResult ref = reference_forward(q, k, v, opt);
  DeviceTensor gq = dev->upload(q), gk = dev->upload(k), gv = dev->upload(v);
  std::vector<int64_t> qp = iota_pos(Lq, Lk - Lq), k1 = iota_pos(70), k2 = iota_pos(Lk - 70, 70);
  auto gqp = dev->upload_positions(qp), gk1 = dev->upload_positions(k1), gk2 = dev->upload_positions(k2);
  DeviceTensor o = dev->alloc(DType::f32, {B, Lq, H, d}), lse = dev->alloc(DType::f32, {B, H, Lq});
  DeviceTensor o2 = dev->alloc(DType::f32, {B, Lq, H, d}), lse2 = dev->alloc(DType::f32, {B, H, Lq});
  AttentionOptions a = opt;
  a.q_pos = {gqp.get(), qp.size()};
  a.k_pos = {gk1.get(), k1.size()};
  dev->attention_forward(gq, gk.view().slice(1, 0, 70), gv.view().slice(1, 0, 70), o, lse, a);
  a.k_pos = {gk2.get(), k2.size()};
  dev->attention_forward(gq, gk.view().slice(1, 70, Lk - 70), gv.view().slice(1, 70, Lk - 70), o2, lse2, a);
  dev->attention_merge(o, lse, o2, lse2, 0);
  RA_EXPECT_CLOSE(download(*dev, o), ref.o, kTolBf16, "merged o");
  RA_EXPECT_CLOSE(download(*dev, lse), ref.lse, 1e-2, "merged lse");
}

TEST(CudaErrors, UnsupportedInputsSayWhatToFix) {
  REQUIRE_GPU();
  auto dev = make_cuda_device(0);
  DeviceTensor q = dev->alloc(DType::bf16, {1, 8, 2, 96}), o = dev->alloc(DType::f32, {1, 8, 2, 96}),
               lse = dev->alloc(DType::f32, {1, 2, 8});
  try {
    dev->attention_forward(q, q, q, o, lse, {});
    FAIL() << "d = 96 was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("head dims 64 and 128"), std::string::npos) << e.what();
  }
  DeviceTensor qf = dev->alloc(DType::f32, {1, 8, 2, 64}), of = dev->alloc(DType::f32, {1, 8, 2, 64});
  try {
    dev->attention_forward(qf, qf, qf, of, lse, {});
    FAIL() << "fp32 q was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bf16 or fp16"), std::string::npos) << e.what();
  }
}

// ---- the ring on one GPU -------------------------------------------------------------

struct RingErr {
  double o, lse, dq, dk, dv;
};

// The ring (dist_attention_forward/backward on P ranks sharing GPU 0) against the
// double reference of the whole sequence.
RingErr ring_errors(int P, Layout layout, bool causal) {
  const int64_t B = 1, L = 240, H = 4, Hkv = 2, d = 128, Ll = L / P;
  const DType dt = DType::bf16;
  Tensor q = host_random(dt, {B, L, H, d}, 11), k = host_random(dt, {B, L, Hkv, d}, 12),
         v = host_random(dt, {B, L, Hkv, d}, 13), dout = host_random(dt, {B, L, H, d}, 14);
  AttentionOptions ropt;
  ropt.causal = causal;
  const RefResult ref = reference_backward(q, k, v, dout, ropt);
  Tensor o(DType::f32, {B, L, H, d}), lse(DType::f32, {B, H, L}), dq(DType::f32, {B, L, H, d}),
      dk(DType::f32, {B, L, Hkv, d}), dv(DType::f32, {B, L, Hkv, d});
  std::mutex mu;
  run_device_local_group(P, 0, [&](int p, Device& dev, Communicator& comm) {
    auto local = [&](const Tensor& full) {
      Tensor t(full.dtype(), {B, Ll, full.dim(2), d});
      shard(full, t, layout, P, p);
      return dev.upload(t);
    };
    DeviceTensor lq = local(q), lk = local(k), lv = local(v), ldo = local(dout);
    DeviceTensor lo = dev.alloc(DType::f32, {B, Ll, H, d}), llse = dev.alloc(DType::f32, {B, H, Ll});
    DeviceTensor ldq = dev.alloc(DType::f32, {B, Ll, H, d}), ldk = dev.alloc(DType::f32, {B, Ll, Hkv, d}),
                 ldv = dev.alloc(DType::f32, {B, Ll, Hkv, d});
    DistAttentionOptions opt;
    opt.layout = layout;
    opt.causal = causal;
    opt.device = &dev;
    dist_attention_forward(comm, lq, lk, lv, lo, llse, opt);
    dist_attention_backward(comm, lq, lk, lv, lo, llse, ldo, ldq, ldk, ldv, opt);
    const Tensor ho = download(dev, lo), hl = download(dev, llse), hdq = download(dev, ldq), hdk = download(dev, ldk),
                 hdv = download(dev, ldv);
    std::lock_guard<std::mutex> lock(mu);
    unshard(ho, o, layout, P, p);
    unshard(hl, lse, layout, P, p, 2);
    unshard(hdq, dq, layout, P, p);
    unshard(hdk, dk, layout, P, p);
    unshard(hdv, dv, layout, P, p);
  });
  return {compare(o, ref.o).err, compare(lse, ref.lse).err, compare(dq, ref.dq, 1e-3).err,
          compare(dk, ref.dk, 1e-3).err, compare(dv, ref.dv, 1e-3).err};
}

TEST(CudaRing, EveryRankCountAndLayoutMatchesTheReferenceWithoutGrowingError) {
  REQUIRE_GPU();
  for (bool causal : {false, true})
    for (Layout layout : {Layout::contiguous, Layout::zigzag, Layout::striped}) {
      double err1 = 0;
      for (int P : {1, 2, 3, 4, 8}) {
        const RingErr e = ring_errors(P, layout, causal);
        const std::string what = cat("P=", P, " ", layout_name(layout), causal ? " causal" : "");
        std::printf("[ ring on one GPU ] %-22s o %.2e lse %.2e dq %.2e dk %.2e dv %.2e\n", what.c_str(), e.o, e.lse,
                    e.dq, e.dk, e.dv);
        EXPECT_LE(e.o, kTolBf16) << what;
        EXPECT_LE(e.lse, 1e-2) << what;
        EXPECT_LE(std::max({e.dq, e.dk, e.dv}), kTolBf16Bwd) << what;
        if (P == 1) err1 = e.o;
        // The merge is exact in fp32: the error must not grow with the ring.
        EXPECT_LE(e.o, 2 * err1 + 1e-3) << what << ": error grew from " << err1 << " at P=1";
      }
    }
}

// A rank that throws ends the group with that error; the others do not hang.
TEST(CudaRing, AFailingRankEndsTheGroup) {
  REQUIRE_GPU();
  try {
    run_device_local_group(3, 0, [](int p, Device& dev, Communicator& comm) {
      comm.set_timeout_seconds(20);
      if (p == 1) throw Error("rank 1 gave up");
      DeviceTensor x = dev.alloc(DType::f32, {16});
      Request r = comm.irecv(x.ptr<void>(), x.bytes(), (p + 2) % 3, 0);
      comm.wait(r);
    });
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("rank 1 gave up"), std::string::npos) << e.what();
  }
}

// ---- NCCL at one rank ----------------------------------------------------------------

TEST(CudaNccl, SendRecvCollectivesAndTheRingAtOneRank) {
  REQUIRE_GPU();
  run_device_local_group(1, 0, [](int, Device& dev, Communicator& boot) {
    auto nccl = nccl_communicator(boot, dev);
    EXPECT_EQ(nccl->backend(), "nccl");
    ASSERT_EQ(nccl->size(), 1);
    Tensor h = host_random(DType::f32, {1000}, 21);
    DeviceTensor a = dev.upload(h), b = dev.alloc(DType::f32, {1000});
    dev.fill(b, NAN);
    Request s = nccl->isend(a.ptr<void>(), a.bytes(), 0, 0), r = nccl->irecv(b.ptr<void>(), b.bytes(), 0, 0);
    nccl->progress();
    nccl->wait(s);
    nccl->wait(r);
    EXPECT_TRUE(bitwise_equal(download(dev, b), h)) << "self send/recv";
    // Collectives on device and host buffers.
    nccl->all_reduce(b.ptr<float>(), 1000, ReduceOp::sum);
    EXPECT_TRUE(bitwise_equal(download(dev, b), h)) << "all_reduce of one rank";
    std::vector<int64_t> cfg = {1, 2, 3};
    nccl->all_reduce(cfg.data(), 3, ReduceOp::max);
    EXPECT_EQ(cfg, (std::vector<int64_t>{1, 2, 3}));
    // The ring at one rank through NCCL (no transfers, the checks' collectives).
    const int64_t B = 1, L = 100, H = 2, d = 64;
    Tensor q = host_random(DType::bf16, {B, L, H, d}, 22);
    AttentionOptions ropt;
    ropt.causal = true;
    const RefResult ref = reference_forward(q, q, q, ropt);
    DeviceTensor gq = dev.upload(q), o = dev.alloc(DType::f32, {B, L, H, d}), lse = dev.alloc(DType::f32, {B, H, L});
    DistAttentionOptions opt;
    opt.causal = true;
    opt.device = &dev;
    dist_attention_forward(*nccl, gq, gq, gq, o, lse, opt);
    RA_EXPECT_CLOSE(download(dev, o), ref.o, kTolBf16, "ring over NCCL, P=1");
  });
}

}  // namespace
}  // namespace ringattn::testing
