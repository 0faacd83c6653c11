// .npy I/O: round trips of save_npy/load_npy, files written by hand in the NumPy
// format (versions 1.0, 2.0, 3.0), and malformed files, each of which must throw
// ringattn::Error naming the file.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "ringattn/atomic_file.h"
#include "ringattn/error.h"
#include "ringattn/npy.h"
#include "ringattn/tensor.h"
#include "test_util.h"

namespace ringattn::testing {
namespace {

namespace fs = std::filesystem;

using Npy = ScratchDir;

std::string shape_tuple(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i)
    s += cat(shape[i], i + 1 < shape.size() || shape.size() == 1 ? "," : "", i + 1 < shape.size() ? " " : "");
  return s + ")";
}

// Writes a .npy file by hand. `data` is written verbatim after the header.
void write_npy(const std::string& path, const std::string& descr, bool fortran, const std::vector<int64_t>& shape,
               const std::string& data, int major = 1, const std::string& magic = "\x93NUMPY") {
  std::string dict = cat("{'descr': '", descr, "', 'fortran_order': ", fortran ? "True" : "False",
                         ", 'shape': ", shape_tuple(shape), ", }");
  const size_t preamble = magic.size() + 2 + (major == 1 ? 2 : 4);
  size_t total = preamble + dict.size() + 1;
  const size_t padded = (total + 63) / 64 * 64;
  dict.append(padded - total, ' ');
  dict += '\n';
  std::ofstream f(path, std::ios::binary);
  f.write(magic.data(), static_cast<std::streamsize>(magic.size()));
  const char ver[2] = {static_cast<char>(major), 0};
  f.write(ver, 2);
  const uint32_t hl = static_cast<uint32_t>(dict.size());
  if (major == 1) {
    const unsigned char b[2] = {static_cast<unsigned char>(hl & 0xff), static_cast<unsigned char>(hl >> 8)};
    f.write(reinterpret_cast<const char*>(b), 2);
  } else {
    const unsigned char b[4] = {static_cast<unsigned char>(hl & 0xff), static_cast<unsigned char>((hl >> 8) & 0xff),
                                static_cast<unsigned char>((hl >> 16) & 0xff), static_cast<unsigned char>(hl >> 24)};
    f.write(reinterpret_cast<const char*>(b), 4);
  }
  f.write(dict.data(), static_cast<std::streamsize>(dict.size()));
  f.write(data.data(), static_cast<std::streamsize>(data.size()));
}

// Little-endian float32 bytes of 0, 1, ..., n-1 (scaled).
std::string f32_bytes(int64_t n, float scale = 0.5f) {
  std::string s(static_cast<size_t>(n) * 4, '\0');
  for (int64_t i = 0; i < n; ++i) {
    const float x = static_cast<float>(i) * scale - 3.f;
    std::memcpy(&s[static_cast<size_t>(i) * 4], &x, 4);  // x86 is little-endian
  }
  return s;
}

std::string read_file(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

void expect_load_error(const std::string& p, const std::string& what) {
  try {
    (void)load_npy(p);
    ADD_FAILURE() << what << ": load_npy did not throw";
  } catch (const Error& e) {
    const std::string name = fs::path(p).filename().string();
    EXPECT_NE(std::string(e.what()).find(name), std::string::npos)
        << what << ": message does not name the file: " << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": threw a non-ringattn exception: " << e.what();
  }
}

void expect_same_values(const Tensor& t, const std::vector<int64_t>& shape, const std::vector<double>& values) {
  ASSERT_EQ(t.dtype(), DType::f32);
  ASSERT_EQ(t.rank(), static_cast<int>(shape.size()));
  for (int i = 0; i < t.rank(); ++i) EXPECT_EQ(t.dim(i), shape[i]) << "dim " << i;
  EXPECT_TRUE(t.view().is_contiguous());
  const auto got = to_double(t);
  ASSERT_EQ(got.size(), values.size());
  for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], values[i]) << "element " << i;
}

TEST_F(Npy, RoundTripRanks1To4) {
  const std::vector<std::vector<int64_t>> shapes{{7}, {3, 5}, {2, 3, 4}, {2, 3, 4, 5}, {1, 1, 1, 1}};
  uint32_t seed = 1;
  for (const auto& shape : shapes) {
    TestTensor t = make_tensor(DType::f32, shape);
    fill_normal(t, seed++);
    const std::string p = path(cat("r", shape.size(), "_", seed, ".npy"));
    save_npy(p, t);
    const Tensor back = load_npy(p);
    expect_same_values(back, shape, to_double(t));
  }
}

TEST_F(Npy, SavedFileIsStandardNpy) {
  Tensor t(DType::f32, {2, 3, 4});
  fill_uniform(t, 5);
  const std::string p = path("std.npy");
  save_npy(p, t);
  const std::string f = read_file(p);
  ASSERT_GE(f.size(), 10u);
  EXPECT_EQ(f.substr(0, 6), std::string("\x93NUMPY"));
  const int major = static_cast<unsigned char>(f[6]);
  ASSERT_TRUE(major >= 1 && major <= 3);
  const size_t pre = major == 1 ? 10 : 12;
  size_t hl = static_cast<unsigned char>(f[8]) | (static_cast<size_t>(static_cast<unsigned char>(f[9])) << 8);
  if (major > 1)
    hl |= (static_cast<size_t>(static_cast<unsigned char>(f[10])) << 16) |
          (static_cast<size_t>(static_cast<unsigned char>(f[11])) << 24);
  EXPECT_EQ((pre + hl) % 64, 0u) << "data should start 64-byte aligned";
  const std::string header = f.substr(pre, hl);
  EXPECT_NE(header.find("'descr': '<f4'"), std::string::npos) << header;
  EXPECT_NE(header.find("'fortran_order': False"), std::string::npos) << header;
  EXPECT_NE(header.find("'shape': (2, 3, 4)"), std::string::npos) << header;
  EXPECT_EQ(header.back(), '\n');
  ASSERT_EQ(f.size(), pre + hl + 24 * 4);
  const auto vals = to_double(t);
  for (size_t i = 0; i < 24; ++i) {
    float x;
    std::memcpy(&x, &f[pre + hl + i * 4], 4);
    EXPECT_EQ(x, vals[i]);
  }
}

TEST_F(Npy, Rank1ShapeIsOneTuple) {
  Tensor t(DType::f32, {5});
  fill_uniform(t, 6);
  const std::string p = path("r1.npy");
  save_npy(p, t);
  EXPECT_NE(read_file(p).find("'shape': (5,)"), std::string::npos);
}

TEST_F(Npy, StridedViewSavedInLogicalOrder) {
  // A transposed [4, 3] view of a [3, 4] buffer and an interior slice of a padded buffer.
  Tensor base(DType::f32, {3, 4});
  fill_uniform(base, 7);
  const TensorView tr = make_view(base.ptr<float>(), DType::f32, {4, 3}, {1, 4});
  ASSERT_FALSE(tr.is_contiguous());
  save_npy(path("tr.npy"), tr);
  expect_same_values(load_npy(path("tr.npy")), {4, 3}, to_double(tr));

  TestTensor padded = make_tensor(DType::f32, {2, 5, 3, 6}, {1, 2, 0, 3}, {0, 1, 1, 0});
  fill_uniform(padded, 8);
  save_npy(path("pad.npy"), padded);
  expect_same_values(load_npy(path("pad.npy")), {2, 5, 3, 6}, to_double(padded));
}

TEST_F(Npy, ReducedPrecisionViewsSavedAsF32) {
  for (DType dt : {DType::bf16, DType::f16}) {
    TestTensor t = make_tensor(dt, {3, 7}, {0, 5});  // strided too
    fill_normal(t, 9);
    const std::string p = path(cat(dtype_name(dt), ".npy"));
    save_npy(p, t);
    expect_same_values(load_npy(p), {3, 7}, to_double(t));  // exact: bf16/f16 ⊂ f32
  }
}

TEST_F(Npy, LoadsHandWrittenVersions1To3) {
  for (int major : {1, 2, 3}) {
    const std::string p = path(cat("v", major, ".npy"));
    write_npy(p, "<f4", false, {2, 3}, f32_bytes(6), major);
    std::vector<double> want;
    for (int i = 0; i < 6; ++i) want.push_back(i * 0.5 - 3.0);
    expect_same_values(load_npy(p), {2, 3}, want);
  }
}

TEST_F(Npy, MissingFile) { expect_load_error(path("does_not_exist.npy"), "missing file"); }

TEST_F(Npy, BadMagic) {
  const std::string p = path("magic.npy");
  write_npy(p, "<f4", false, {4}, f32_bytes(4), 1, "\x93NUMPX");
  expect_load_error(p, "bad magic");
  const std::string q = path("text.npy");
  std::ofstream(q) << "this is not an npy file at all, just some text\n";
  expect_load_error(q, "text file");
  const std::string e = path("empty.npy");
  std::ofstream(e).flush();
  expect_load_error(e, "empty file");
}

TEST_F(Npy, Float64Rejected) {
  const std::string p = path("f8.npy");
  write_npy(p, "<f8", false, {2}, std::string(16, '\0'));
  expect_load_error(p, "<f8");
}

TEST_F(Npy, OtherDtypesRejected) {
  for (const char* descr : {"<i4", "<f2", "|u1"}) {
    const std::string p = path(cat("dt_", descr[1], descr[2], ".npy"));
    write_npy(p, descr, false, {4}, std::string(16, '\0'));
    expect_load_error(p, descr);
  }
}

TEST_F(Npy, TokenIdsReadAsInt64AndInt32) {
  std::string i8, i4;
  const int64_t want[6] = {0, 1, 50256, -1, 7, 128000};
  for (int64_t x : want) {
    i8.append(reinterpret_cast<const char*>(&x), 8);
    const int32_t y = static_cast<int32_t>(x);
    i4.append(reinterpret_cast<const char*>(&y), 4);
  }
  write_npy(path("i8.npy"), "<i8", false, {2, 3}, i8);
  write_npy(path("i4.npy"), "<i4", false, {2, 3}, i4);
  for (const char* name : {"i8.npy", "i4.npy"}) {
    std::vector<int64_t> shape;
    EXPECT_EQ(load_npy_ids(path(name), &shape), std::vector<int64_t>(want, want + 6)) << name;
    EXPECT_EQ(shape, (std::vector<int64_t>{2, 3})) << name;
  }
  write_npy(path("f4.npy"), "<f4", false, {4}, f32_bytes(4));
  const std::string m = message_of([&] { (void)load_npy_ids(path("f4.npy")); });
  EXPECT_NE(m.find("'<f4' is not supported here ('<i8', '<i4')"), std::string::npos) << m;
  write_npy(path("short.npy"), "<i8", false, {4}, i8.substr(0, 24));
  EXPECT_NE(message_of([&] { (void)load_npy_ids(path("short.npy")); }).find("truncated data"), std::string::npos);
}

TEST_F(Npy, BigEndianRejected) {
  const std::string p = path("be.npy");
  write_npy(p, ">f4", false, {3}, f32_bytes(3));
  expect_load_error(p, ">f4");
}

TEST_F(Npy, FortranOrderRejected) {
  const std::string p = path("fortran.npy");
  write_npy(p, "<f4", true, {2, 3}, f32_bytes(6));
  expect_load_error(p, "fortran_order True");
}

TEST_F(Npy, TruncatedDataRejected) {
  const std::string p = path("trunc.npy");
  write_npy(p, "<f4", false, {4, 5}, f32_bytes(19));  // one element short
  expect_load_error(p, "truncated data");
  const std::string q = path("trunc_half.npy");
  write_npy(q, "<f4", false, {4, 5}, f32_bytes(20).substr(0, 77));  // mid-element
  expect_load_error(q, "truncated mid-element");
}

TEST_F(Npy, TruncatedHeaderRejected) {
  const std::string p = path("full.npy");
  write_npy(p, "<f4", false, {4}, f32_bytes(4));
  const std::string f = read_file(p);
  const std::string q = path("trunc_header.npy");
  std::ofstream(q, std::ios::binary) << f.substr(0, 30);
  expect_load_error(q, "truncated header");
}

TEST_F(Npy, SaveToUnwritablePathThrows) {
  Tensor t(DType::f32, {2});
  fill_uniform(t, 1);
  EXPECT_THROW(save_npy(path("no_such_dir/x.npy"), t), Error);
}

// A write that fails part-way leaves the earlier file whole and no temporary file.
TEST_F(Npy, FailedWriteLeavesTheEarlierFileWhole) {
  const std::string p = path("out.npy");
  Tensor t(DType::f32, {3, 5});
  fill_uniform(t, 2);
  save_npy(p, t);
  const std::string before = read_file(p);
  try {
    write_file_atomically(p, [](std::FILE* f) {
      std::fputs("half a result", f);
      errno = ENOSPC;
      return false;
    });
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("No space left"), std::string::npos) << e.what();
  }
  EXPECT_EQ(read_file(p), before);
  for (const auto& entry : fs::directory_iterator(fs::path(p).parent_path()))
    EXPECT_EQ(entry.path().filename().string().find(".tmp."), std::string::npos) << entry.path();
}

// ---- output paths: what the path points at is written, never replaced ----------

void write_text(const std::string& p, const char* text) {
  write_file_atomically(p, [&](std::FILE* f) { return std::fputs(text, f) >= 0; });
}

// fn throws ringattn::Error whose message contains every needle.
void expect_error(const std::function<void()>& fn, std::initializer_list<const char*> needles) {
  try {
    fn();
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    for (const char* n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what();
  }
}

TEST_F(Npy, WriteThroughASymlinkKeepsTheLinkAndWritesItsTarget) {
  const std::string target = path("real.npy"), link = path("link.npy");
  write_text(target, "old");
  fs::create_symlink("real.npy", link);  // relative, as users make them
  write_text(link, "new");
  EXPECT_TRUE(fs::is_symlink(link)) << "the link was replaced by a regular file";
  EXPECT_EQ(read_file(target), "new");
  // A dangling link: the file it names is created, the link stays.
  const std::string dangling = path("dangling.npy");
  fs::create_symlink("created.npy", dangling);
  write_text(dangling, "made");
  EXPECT_TRUE(fs::is_symlink(dangling));
  EXPECT_EQ(read_file(path("created.npy")), "made");
}

TEST_F(Npy, WriteKeepsTheExistingFilesMode) {
  const std::string p = path("private.npy");
  write_text(p, "old");
  fs::permissions(p, fs::perms::owner_read | fs::perms::owner_write);
  write_text(p, "new");
  EXPECT_EQ(fs::status(p).permissions() & fs::perms::all, fs::perms::owner_read | fs::perms::owner_write);
  EXPECT_EQ(read_file(p), "new");
}

TEST_F(Npy, NonRegularTargetsAreWrittenNotReplaced) {
  const std::string fifo = path("fifo");
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  std::string got;
  std::thread reader([&] { got = read_file(fifo); });
  write_text(fifo, "through the pipe");
  reader.join();
  EXPECT_EQ(got, "through the pipe");
  EXPECT_TRUE(fs::is_fifo(fifo)) << "the FIFO was replaced by a regular file";
  // A character device of the test's own (the system's /dev/null would be
  // replaced by a regression; as root it once was), when this process may make one.
  const std::string dev = path("null");
  if (mknod(dev.c_str(), S_IFCHR | 0666, makedev(1, 3)) != 0) GTEST_SKIP() << "cannot create a device node here";
  write_text(dev, "discarded");
  EXPECT_TRUE(fs::is_character_file(dev)) << "the device was replaced by a regular file";
}

TEST_F(Npy, DirectoriesAndMissingDirectoriesAreRefused) {
  expect_error([&] { write_text(dir(), "x"); }, {"is a directory"});
  expect_error([&] { write_text(path("no/such/dir/x.npy"), "x"); }, {"does not exist"});
}

TEST_F(Npy, OutputPathsAreCheckedBeforeComputing) {
  const std::string in = path("q.npy"), out = path("o.npy");
  write_text(in, "input");
  fs::create_symlink("q.npy", path("alias.npy"));
  check_output_paths({{"--out", out}, {"--lse", path("lse.npy")}}, {{"--q", in}});  // fine
  expect_error([&] { check_output_paths({{"--out", out}, {"--lse", out}}); }, {"--out", "--lse", "same file"});
  expect_error([&] { check_output_paths({{"--out", in}}, {{"--q", in}}); }, {"--q", "overwritten"});
  expect_error([&] { check_output_paths({{"--out", path("alias.npy")}}, {{"--q", in}}); }, {"overwritten"});
  expect_error([&] { check_output_paths({{"--out", path("nodir/o.npy")}}); }, {"--out", "does not exist"});
  expect_error([&] { check_output_paths({{"--out", dir()}}); }, {"is a directory"});
  // Several outputs may go to /dev/null.
  check_output_paths({{"--out", "/dev/null"}, {"--lse", "/dev/null"}});
}

}  // namespace
}  // namespace ringattn::testing
