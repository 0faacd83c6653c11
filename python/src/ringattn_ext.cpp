// ringattn._ringattn: the C++ library seen from Python. Thin: every array comes
// in as a DLPack/buffer view (numpy arrays, torch tensors) without a copy, every
// check is the library's own (ringattn::Error becomes ValueError with the
// library's message), and the GIL is released while kernels run and while the
// ring waits. Outputs are allocated by the Python side (ringattn/_core.py), so
// numpy and torch get arrays of their own kind back.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "ringattn/attention.h"
#include "ringattn/comm.h"
#include "ringattn/cpu/attention.h"
#include "ringattn/cpu/features.h"
#include "ringattn/dist_attention.h"
#include "ringattn/error.h"
#include "ringattn/layout.h"
#include "ringattn/lm.h"
#include "ringattn/parallel.h"
#include "ringattn/perf.h"
#include "ringattn/version.h"

namespace nb = nanobind;
using namespace nb::literals;
using namespace ringattn;

namespace {

using In = nb::handle;   // an array read by the library (numpy, torch, anything with DLPack)
using Out = nb::handle;  // an array the library writes into
using Offsets = std::optional<std::vector<int32_t>>;

const char* device_name(int type) {
  switch (type) {
    case nb::device::cuda::value:
      return "CUDA";
    case nb::device::cuda_host::value:
      return "CUDA host";
    case nb::device::rocm::value:
      return "ROCm";
    case nb::device::metal::value:
      return "Metal";
    default:
      return "non-CPU";
  }
}

// The storage dtype of a DLPack dtype, or TypeError naming the tensor.
DType dtype_of(nb::dlpack::dtype t, const char* name) {
  using C = nb::dlpack::dtype_code;
  if (t.lanes == 1) {
    if (t.code == static_cast<uint8_t>(C::Float) && t.bits == 32) return DType::f32;
    if (t.code == static_cast<uint8_t>(C::Float) && t.bits == 16) return DType::f16;
    if (t.code == static_cast<uint8_t>(C::Bfloat) && t.bits == 16) return DType::bf16;
  }
  const char* kind = t.code == static_cast<uint8_t>(C::Int)      ? "int"
                     : t.code == static_cast<uint8_t>(C::UInt)   ? "uint"
                     : t.code == static_cast<uint8_t>(C::Float)  ? "float"
                     : t.code == static_cast<uint8_t>(C::Bfloat) ? "bfloat"
                     : t.code == static_cast<uint8_t>(C::Bool)   ? "bool"
                                                                 : "an unknown kind of ";
  throw nb::type_error(cat(name, " is ", kind, int(t.bits), t.lanes > 1 ? cat("x", int(t.lanes)) : std::string(),
                           "; ringattn takes float32, bfloat16 or float16")
                           .c_str());
}

// DLPack's C exchange API (DLPack 1.2): a table of C functions a framework
// (torch >= 2.10) puts on its tensor type as the capsule
// `__dlpack_c_exchange_api__`. Its dltensor_from_py_object_no_sync describes a
// tensor in a DLTensor without any Python call: ~0.1 us where `__dlpack__`
// costs ~2 us per tensor, most of a small call's overhead. Only the entries up
// to that one are used; the layout is the standard's.
struct DlpackExchangeApi {
  uint32_t major, minor;  // DLPackExchangeAPIHeader: version, then the older table
  const void* prev_api;
  const void* managed_tensor_allocator;
  const void* managed_tensor_from_py_object_no_sync;
  const void* managed_tensor_to_py_object_no_sync;
  int (*dltensor_from_py_object_no_sync)(void* py_object, nb::dlpack::dltensor* out);  // may be null
};

// The exchange table of an object's type (looked up once per type), or null.
const DlpackExchangeApi* exchange_api(nb::handle h) {
  static std::unordered_map<PyTypeObject*, const DlpackExchangeApi*> cache;
  PyTypeObject* type = Py_TYPE(h.ptr());
  auto it = cache.find(type);
  if (it != cache.end()) return it->second;
  const DlpackExchangeApi* api = nullptr;
  PyObject* cap = PyObject_GetAttrString(reinterpret_cast<PyObject*>(type), "__dlpack_c_exchange_api__");
  if (cap && PyCapsule_IsValid(cap, "dlpack_exchange_api")) {
    auto* a = static_cast<const DlpackExchangeApi*>(PyCapsule_GetPointer(cap, "dlpack_exchange_api"));
    if (a && a->major == 1 && a->dltensor_from_py_object_no_sync) api = a;
  }
  Py_XDECREF(cap);
  PyErr_Clear();
  cache.emplace(type, api);
  return api;
}

// A TensorView of an array's description; `strides` null: compact row-major.
TensorView make_view(const char* name, void* data, nb::dlpack::dtype dtype, int device, int ndim, const int64_t* shape,
                     const int64_t* strides) {
  if (device != nb::device::cpu::value)
    throw nb::type_error(cat(name, " is a ", device_name(device),
                             " array; the Python package computes on host memory (move it with .cpu())")
                             .c_str());
  check(ndim <= kMaxRank, name, " has ", ndim, " dimensions; at most ", kMaxRank);
  int64_t st[kMaxRank];
  for (int i = ndim - 1, step = 1; i >= 0; step *= static_cast<int>(shape[i]), --i) st[i] = strides ? strides[i] : step;
  return TensorView(data, dtype_of(dtype, name), ndim, shape, st);
}

template <typename A>
TensorView view_of_ndarray(const A& a, const char* name) {
  int64_t shape[kMaxRank], strides[kMaxRank];
  check(a.ndim() <= static_cast<size_t>(kMaxRank), name, " has ", a.ndim(), " dimensions; at most ", kMaxRank);
  for (size_t i = 0; i < a.ndim(); ++i) shape[i] = static_cast<int64_t>(a.shape(i)), strides[i] = a.stride(i);
  return make_view(name, const_cast<void*>(static_cast<const void*>(a.data())), a.dtype(), a.device_type(),
                   static_cast<int>(a.ndim()), shape, strides);
}

// The view of an array argument, never a copy: through the exchange table when
// its type has one, else nanobind's ndarray (buffer protocol, __dlpack__). The
// caller's reference keeps the memory alive for the call.
TensorView view_of(nb::handle h, const char* name, bool writable = false) {
  if (const DlpackExchangeApi* api = exchange_api(h)) {
    nb::dlpack::dltensor t{};
    if (api->dltensor_from_py_object_no_sync(h.ptr(), &t) != 0) throw nb::python_error();
    return make_view(name, static_cast<char*>(t.data) + t.byte_offset, t.dtype, t.device.device_type, t.ndim, t.shape,
                     t.strides);
  }
  const std::string what = cat(name, " must be a", writable ? " writable" : "n",
                               " array (numpy, torch, or anything with DLPack), got ", nb::inst_name(h).c_str());
  if (writable) {
    nb::ndarray<> a;
    if (!nb::try_cast(h, a, false)) throw nb::type_error(what.c_str());
    return view_of_ndarray(a, name);
  }
  nb::ndarray<nb::ro> a;
  if (!nb::try_cast(h, a, false)) throw nb::type_error(what.c_str());
  return view_of_ndarray(a, name);
}

float scale_or_default(std::optional<float> s) { return s ? *s : std::numeric_limits<float>::quiet_NaN(); }

// The local mask options for q [B, Lq, ...] and k [B, Lk, ...]; `docs` keeps
// the positions the options point at.
AttentionOptions local_options(const TensorView& q, const TensorView& k, bool causal, std::optional<float> scale,
                               int64_t wl, int64_t wr, const Offsets& cu_q, const Offsets& cu_k, int threads,
                               Documents& docs) {
  AttentionOptions opt;
  opt.causal = causal;
  opt.scale = scale_or_default(scale);
  opt.window_left = wl, opt.window_right = wr;
  opt.threads = threads;
  check(cu_q || !cu_k, "cu_seqlens_k needs cu_seqlens (the queries' offsets)");
  if (cu_q) {
    check(q.rank == 4 && k.rank == 4, "q and k must be [B, L, H, d], got ", q.shape_str(), " and ", k.shape_str());
    check_cu_seqlens(*cu_q, q.dim(1), cu_k ? "cu_seqlens (the queries' offsets)" : "cu_seqlens");
    check_cu_seqlens(cu_k ? *cu_k : *cu_q, k.dim(1), cu_k ? "cu_seqlens_k" : "cu_seqlens (as the keys' offsets)");
    docs = documents(*cu_q, cu_k ? *cu_k : *cu_q);
    docs.apply(opt);
  }
  return opt;
}

// A Communicator as Python holds it, with the Ulysses × ring meshes built over
// it on demand (one per Ulysses degree, reused by every later call).
struct PyComm {
  std::unique_ptr<Communicator> comm;
  std::map<int, Mesh> meshes;

  Communicator& get() {
    check(comm != nullptr, "this Communicator was closed");
    return *comm;
  }
  DistAttentionOptions options(const std::string& strategy, const std::string& layout, bool causal,
                               std::optional<float> scale, int64_t wl, int64_t wr, std::span<const int32_t> cu,
                               int threads, int ulysses) {
    DistAttentionOptions opt;
    opt.strategy = parse_strategy(strategy);
    opt.layout = parse_layout(layout);
    opt.causal = causal;
    opt.scale = scale_or_default(scale);
    opt.window_left = wl, opt.window_right = wr;
    opt.cu_seqlens = cu;
    opt.threads = threads;
    if (opt.strategy == Strategy::hybrid) {
      check(ulysses >= 2, "strategy 'hybrid' needs ulysses >= 2 (the size of each Ulysses group), got ", ulysses);
      auto it = meshes.find(ulysses);
      if (it == meshes.end()) {
        nb::gil_scoped_release unlocked;  // the splits wait on every rank
        it = meshes.emplace(ulysses, Mesh::build(get(), 1, get().size(), 1, 1, ulysses)).first;
      }
      it->second.use_hybrid(opt);
    } else {
      check(ulysses == 1 || ulysses == 0, "ulysses = ", ulysses, " needs strategy 'hybrid', not '", strategy, "'");
    }
    return opt;
  }
};

std::span<const int32_t> span_of(const Offsets& o) {
  return o ? std::span<const int32_t>(*o) : std::span<const int32_t>();
}

// A contiguous byte buffer (numpy/torch uint8, one dimension) for the byte-level collectives.
std::pair<void*, size_t> bytes_of(const nb::ndarray<nb::ro>& a, const char* name) {
  using C = nb::dlpack::dtype_code;
  check(a.device_type() == nb::device::cpu::value, name, " must be in host memory");
  check(a.dtype().code == static_cast<uint8_t>(C::UInt) && a.dtype().bits == 8 && a.ndim() == 1 &&
            (a.shape(0) <= 1 || a.stride(0) == 1),
        name, " must be a contiguous one-dimensional uint8 array");
  return {const_cast<void*>(static_cast<const void*>(a.data())), a.shape(0)};
}

// A Hugging Face checkpoint as ringattn's model, on this process or sequence
// parallel over a communicator (which Python keeps alive beside it).
struct PyLM {
  LmConfig config;
  std::unique_ptr<RunContext> run;
  std::unique_ptr<Model> model;
};

// An owning float32 numpy array of a Tensor (moved to the heap, freed with the array).
nb::ndarray<nb::numpy, float> to_numpy(Tensor t) {
  auto* owned = new Tensor(std::move(t));
  nb::capsule owner(owned, [](void* p) noexcept { delete static_cast<Tensor*>(p); });
  size_t shape[kMaxRank];
  for (int i = 0; i < owned->rank(); ++i) shape[i] = static_cast<size_t>(owned->dim(i));
  return nb::ndarray<nb::numpy, float>(owned->ptr<float>(), static_cast<size_t>(owned->rank()), shape, owner);
}

using Ids = nb::ndarray<nb::ro, nb::c_contig, nb::ndim<2>>;

// Token ids [B, L] (int64, row-major) as a vector.
std::vector<int64_t> ids_of(const Ids& a, int64_t& B, int64_t& L) {
  using C = nb::dlpack::dtype_code;
  check(a.device_type() == nb::device::cpu::value, "ids must be in host memory");
  check(a.dtype().code == static_cast<uint8_t>(C::Int) && a.dtype().bits == 64, "ids must be int64");
  B = static_cast<int64_t>(a.shape(0)), L = static_cast<int64_t>(a.shape(1));
  const int64_t* p = static_cast<const int64_t*>(a.data());
  return std::vector<int64_t>(p, p + B * L);
}

// The logits f(ids, B, L) of ids [B, L], computed without the GIL.
template <typename F>
nb::ndarray<nb::numpy, float> logits_of(const Ids& ids, F&& f) {
  int64_t B = 0, L = 0;
  const std::vector<int64_t> v = ids_of(ids, B, L);
  Tensor logits;
  {
    nb::gil_scoped_release unlocked;
    logits = f(v, B, L);
  }
  return to_numpy(std::move(logits));
}

}  // namespace

NB_MODULE(_ringattn, m) {
  m.doc() = "ringattn's C++ library (use the ringattn package, not this module)";
  m.attr("__version__") = RINGATTN_VERSION;
  // Module globals and autograd graphs may hold a Communicator or a model until
  // the interpreter is torn down, which nanobind would report as leaks at exit;
  // their MPI resources are released before MPI_Finalize (ringattn/_core.py).
  nb::set_leak_warnings(false);
  // Under mpirun, ranks on one machine divide its CPUs (threads=0), as the command's do.
  ringattn::share_cpus_with_local_ranks();

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const Error& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  m.def(
      "attention_forward",
      [](In q, In k, In v, Out o, Out lse, bool causal, std::optional<float> scale, int64_t wl, int64_t wr,
         Offsets cu_q, Offsets cu_k, int threads) {
        const TensorView Q = view_of(q, "q"), K = view_of(k, "k"), V = view_of(v, "v"), O = view_of(o, "o", true),
                         S = view_of(lse, "lse", true);
        Documents docs;
        const AttentionOptions opt = local_options(Q, K, causal, scale, wl, wr, cu_q, cu_k, threads, docs);
        nb::gil_scoped_release unlocked;
        attention_forward(Q, K, V, O, S, opt);
      },
      "q"_a, "k"_a, "v"_a, "o"_a, "lse"_a, "causal"_a, "scale"_a.none(), "window_left"_a, "window_right"_a,
      "cu_seqlens_q"_a.none(), "cu_seqlens_k"_a.none(), "threads"_a);

  m.def(
      "attention_backward",
      [](In q, In k, In v, In o, In lse, In dout, Out dq, Out dk, Out dv, bool causal, std::optional<float> scale,
         int64_t wl, int64_t wr, Offsets cu_q, Offsets cu_k, int threads) {
        const TensorView Q = view_of(q, "q"), K = view_of(k, "k"), V = view_of(v, "v"), O = view_of(o, "o"),
                         S = view_of(lse, "lse"), dO = view_of(dout, "dout"), dQ = view_of(dq, "dq", true),
                         dK = view_of(dk, "dk", true), dV = view_of(dv, "dv", true);
        Documents docs;
        const AttentionOptions opt = local_options(Q, K, causal, scale, wl, wr, cu_q, cu_k, threads, docs);
        nb::gil_scoped_release unlocked;
        attention_backward(Q, K, V, O, S, dO, dQ, dK, dV, opt);
      },
      "q"_a, "k"_a, "v"_a, "o"_a, "lse"_a, "dout"_a, "dq"_a, "dk"_a, "dv"_a, "causal"_a, "scale"_a.none(),
      "window_left"_a, "window_right"_a, "cu_seqlens_q"_a.none(), "cu_seqlens_k"_a.none(), "threads"_a);

  m.def(
      "shard_positions",
      [](const std::string& layout, int64_t L, int P, int p, Offsets cu) {
        const Layout l = parse_layout(layout);
        check(P >= 1 && p >= 0 && p < P, "rank ", p, " of ", P, " ranks");
        check_layout(l, L, P, span_of(cu));
        return shard_positions(l, L, P, p, span_of(cu));
      },
      "layout"_a, "L"_a, "P"_a, "p"_a, "cu_seqlens"_a.none() = nb::none());

  // Where the library sees an array's data: the test that nothing was copied on the way in.
  m.def(
      "data_pointer", [](In a) { return reinterpret_cast<uintptr_t>(view_of(a, "array").data); }, "array"_a);

  // The machine's peaks for benchmarks' ratios (one core, this run).
  m.def("isa", [] { return std::string(isa_name(default_isa())); });
  m.def(
      "measure_fma_peak_gflops",
      [](const std::string& dtype) {
        const DType t = parse_dtype(dtype);
        nb::gil_scoped_release unlocked;
        return measure_fma_peak_gflops(t, default_isa());
      },
      "dtype"_a);

  m.def(
      "check_layout",
      [](const std::string& layout, int64_t L, int P, Offsets cu) {
        check_layout(parse_layout(layout), L, P, span_of(cu));
      },
      "layout"_a, "L"_a, "P"_a, "cu_seqlens"_a.none() = nb::none());

  nb::class_<PyComm>(m, "Communicator", nb::is_weak_referenceable())
      .def_static(
          "from_fortran_handle",
          [](int64_t handle, double timeout) {
            auto c = std::make_unique<PyComm>();
            nb::gil_scoped_release unlocked;
            c->comm = mpi_from_fortran_handle(handle, timeout);
            return c.release();
          },
          "handle"_a, "timeout"_a, nb::rv_policy::take_ownership)
      .def_prop_ro("rank", [](PyComm& c) { return c.get().rank(); })
      .def_prop_ro("size", [](PyComm& c) { return c.get().size(); })
      .def_prop_ro("backend", [](PyComm& c) { return c.get().backend(); })
      .def_prop_rw(
          "timeout", [](PyComm& c) { return c.get().timeout_seconds(); },
          [](PyComm& c, double s) { c.get().set_timeout_seconds(s); })
      .def("barrier",
           [](PyComm& c) {
             nb::gil_scoped_release unlocked;
             c.get().barrier();
           })
      .def(
          "all_gather_bytes",
          [](PyComm& c, nb::ndarray<nb::ro> send, nb::ndarray<> recv) {
            auto [s, n] = bytes_of(send, "send");
            auto [r, total] = bytes_of(nb::ndarray<nb::ro>(recv), "recv");
            check(total == n * static_cast<size_t>(c.get().size()), "recv holds ", total, " bytes; ", c.get().size(),
                  " ranks of ", n, " bytes need ", n * c.get().size());
            nb::gil_scoped_release unlocked;
            c.get().all_gather(s, r, n);
          },
          "send"_a, "recv"_a)
      .def(
          "all_reduce_sum",
          [](PyComm& c, nb::ndarray<> buf) {
            using C = nb::dlpack::dtype_code;
            check(buf.device_type() == nb::device::cpu::value, "all_reduce_sum: the array must be in host memory");
            bool contiguous = true;
            for (size_t i = buf.ndim(), expect = 1; i-- > 0; expect *= buf.shape(i))
              contiguous = contiguous && (buf.shape(i) <= 1 || buf.stride(i) == static_cast<int64_t>(expect));
            check(contiguous, "all_reduce_sum: the array must be contiguous");
            const bool f32 = buf.dtype().code == static_cast<uint8_t>(C::Float) && buf.dtype().bits == 32;
            const bool f64 = buf.dtype().code == static_cast<uint8_t>(C::Float) && buf.dtype().bits == 64;
            if (!f32 && !f64) throw nb::type_error("all_reduce_sum takes float32 or float64 arrays");
            const int64_t n = static_cast<int64_t>(buf.size());
            nb::gil_scoped_release unlocked;
            if (f32)
              c.get().all_reduce(static_cast<float*>(buf.data()), n, ReduceOp::sum);
            else
              c.get().all_reduce(static_cast<double*>(buf.data()), n, ReduceOp::sum);
          },
          "buf"_a)
      .def(
          "split",
          [](PyComm& c, int color, int key) {
            auto sub = std::make_unique<PyComm>();
            nb::gil_scoped_release unlocked;
            sub->comm = c.get().split(color, key);
            return sub.release();
          },
          "color"_a, "key"_a, nb::rv_policy::take_ownership)
      .def("stats",
           [](PyComm& c) {
             const CommStats& s = c.get().stats();
             return std::map<std::string, double>{{"bytes_sent", double(s.bytes_sent)},
                                                  {"bytes_received", double(s.bytes_received)},
                                                  {"messages_sent", double(s.messages_sent)},
                                                  {"wait_seconds", s.wait_seconds}};
           })
      .def("close", [](PyComm& c) {
        c.meshes.clear();
        c.comm.reset();
      });

  m.def(
      "dist_forward",
      [](PyComm& c, In q, In k, In v, Out o, Out lse, const std::string& strategy, const std::string& layout,
         bool causal, std::optional<float> scale, int64_t wl, int64_t wr, Offsets cu, int threads, int ulysses) {
        const DistAttentionOptions opt =
            c.options(strategy, layout, causal, scale, wl, wr, span_of(cu), threads, ulysses);
        const TensorView Q = view_of(q, "q"), K = view_of(k, "k"), V = view_of(v, "v"), O = view_of(o, "o", true),
                         S = view_of(lse, "lse", true);
        DistStats stats;
        {
          nb::gil_scoped_release unlocked;
          dist_attention_forward(c.get(), Q, K, V, O, S, opt, &stats);
        }
        return std::map<std::string, double>{{"seconds", stats.seconds},
                                             {"compute_seconds", stats.compute_seconds},
                                             {"wait_seconds", stats.wait_seconds},
                                             {"bytes_sent", double(stats.bytes_sent)},
                                             {"bytes_received", double(stats.bytes_received)},
                                             {"stages_skipped", double(stats.stages_skipped)}};
      },
      "comm"_a, "q"_a, "k"_a, "v"_a, "o"_a, "lse"_a, "strategy"_a, "layout"_a, "causal"_a, "scale"_a.none(),
      "window_left"_a, "window_right"_a, "cu_seqlens"_a.none(), "threads"_a, "ulysses"_a);

  m.def(
      "dist_backward",
      [](PyComm& c, In q, In k, In v, In o, In lse, In dout, Out dq, Out dk, Out dv, const std::string& strategy,
         const std::string& layout, bool causal, std::optional<float> scale, int64_t wl, int64_t wr, Offsets cu,
         int threads, int ulysses) {
        const DistAttentionOptions opt =
            c.options(strategy, layout, causal, scale, wl, wr, span_of(cu), threads, ulysses);
        const TensorView Q = view_of(q, "q"), K = view_of(k, "k"), V = view_of(v, "v"), O = view_of(o, "o"),
                         S = view_of(lse, "lse"), dO = view_of(dout, "dout"), dQ = view_of(dq, "dq", true),
                         dK = view_of(dk, "dk", true), dV = view_of(dv, "dv", true);
        nb::gil_scoped_release unlocked;
        dist_attention_backward(c.get(), Q, K, V, O, S, dO, dQ, dK, dV, opt);
      },
      "comm"_a, "q"_a, "k"_a, "v"_a, "o"_a, "lse"_a, "dout"_a, "dq"_a, "dk"_a, "dv"_a, "strategy"_a, "layout"_a,
      "causal"_a, "scale"_a.none(), "window_left"_a, "window_right"_a, "cu_seqlens"_a.none(), "threads"_a, "ulysses"_a);

  nb::class_<PyLM>(m, "LanguageModel")
      .def_static(
          "load",
          [](const std::string& dir, PyComm* comm, const std::string& strategy, const std::string& layout,
             const std::string& dtype, int threads) {
            auto p = std::make_unique<PyLM>();
            ParallelConfig pc;
            pc.strategy = parse_strategy(strategy);
            pc.layout = parse_layout(layout);
            pc.threads = threads;
            nb::gil_scoped_release unlocked;
            p->config = load_lm_config(dir);
            p->run = std::make_unique<RunContext>(comm ? &comm->get() : nullptr,
                                                  pc.for_ranks(comm ? comm->get().size() : 1));
            p->model = std::make_unique<Model>(lm_model(dir, parse_dtype(dtype), *p->run));
            return p.release();
          },
          "dir"_a, "comm"_a.none(), "strategy"_a, "layout"_a, "dtype"_a, "threads"_a, nb::rv_policy::take_ownership)
      .def_prop_ro("config",
                   [](PyLM& p) {
                     const LmConfig& c = p.config;
                     return std::map<std::string, std::string>{{"arch", arch_name(c.arch)},
                                                               {"vocab", std::to_string(c.vocab)},
                                                               {"d_model", std::to_string(c.d_model)},
                                                               {"layers", std::to_string(c.layers)},
                                                               {"heads", std::to_string(c.heads)},
                                                               {"kv_heads", std::to_string(c.kv_heads)},
                                                               {"head_dim", std::to_string(c.head_dim)},
                                                               {"eos_token_id", std::to_string(c.eos_token)},
                                                               {"sliding_window", std::to_string(c.sliding_window)}};
                   })
      .def(
          "forward",
          [](PyLM& p, Ids ids) {
            return logits_of(ids, [&](const std::vector<int64_t>& v, int64_t B, int64_t L) {
              p.run->config().check_sequence(L);
              return lm_forward(*p.model, p.run->model_parallel(), v, B, L);
            });
          },
          "ids"_a)
      .def(
          "generate",
          [](PyLM& p, std::vector<std::vector<int64_t>> prompts, int64_t new_tokens, std::optional<float> temperature,
             int64_t top_k, float top_p, uint64_t seed, bool ignore_eos) {
            LmGenerateOptions o;
            o.new_tokens = new_tokens;
            o.sampling.greedy = !temperature;
            if (temperature) o.sampling.temperature = *temperature;
            o.sampling.top_k = top_k, o.sampling.top_p = top_p;
            o.seed = seed;
            o.eos = ignore_eos ? -1 : p.config.eos_token;
            check_sampling(o.sampling);
            check(new_tokens >= 0, "new_tokens must be >= 0, got ", new_tokens);
            nb::gil_scoped_release unlocked;
            return lm_generate(*p.model, p.run->model_parallel(), prompts, o);
          },
          "prompts"_a, "new_tokens"_a, "temperature"_a.none(), "top_k"_a, "top_p"_a, "seed"_a, "ignore_eos"_a);
}
