// Safetensors files (see ringattn/safetensors.h): a checked, memory-mapped reader,
// sharded checkpoints, and an atomic writer.
#include "ringattn/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "ringattn/atomic_file.h"
#include "ringattn/error.h"

namespace ringattn {
namespace {

constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;  // the safetensors format's own limit

const char* st_name(DType t) { return t == DType::f32 ? "F32" : t == DType::bf16 ? "BF16" : "F16"; }

DType st_dtype(const std::string& s, const std::string& where) {
  if (s == "F32") return DType::f32;
  if (s == "BF16") return DType::bf16;
  if (s == "F16") return DType::f16;
  throw Error(cat(where, ": dtype ", s, " is not supported (ringattn reads F32, BF16 and F16 tensors)"));
}

uint64_t read_le64(const unsigned char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// A JSON number that is a whole number >= 0 (safetensors writes offsets and
// dimensions as unsigned integers).
uint64_t count_of(const nlohmann::json& v, const std::string& what) {
  check(v.is_number_unsigned() || (v.is_number_integer() && v.get<int64_t>() >= 0), what,
        " must be a whole number >= 0, got ", v.dump());
  return v.get<uint64_t>();
}

}  // namespace

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  check(fd >= 0, path, ": cannot open: ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(cat(path, ": not a regular file"));
  }
  map_bytes_ = static_cast<size_t>(st.st_size);
  if (map_bytes_ < 8) {
    ::close(fd);
    throw Error(cat(path, ": ", map_bytes_, " bytes is too short for a safetensors file (8-byte header length)"));
  }
  map_ = ::mmap(nullptr, map_bytes_, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_errno = errno;
  ::close(fd);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    throw Error(cat(path, ": cannot map: ", std::strerror(map_errno)));
  }
  try {
    const auto* bytes = static_cast<const unsigned char*>(map_);
    const uint64_t n = read_le64(bytes);
    check(n <= map_bytes_ - 8, path, ": the header claims ", n, " bytes but the file has only ", map_bytes_ - 8,
          " after the length (truncated, or not a safetensors file)");
    check(n <= kMaxHeaderBytes, path, ": a header of ", n, " bytes is beyond the format's 100 MiB limit");
    nlohmann::json header;
    try {
      header = nlohmann::json::parse(bytes + 8, bytes + 8 + n);
    } catch (const nlohmann::json::exception& e) {
      throw Error(cat(path, ": the header is not valid JSON: ", e.what()));
    }
    check(header.is_object(), path, ": the header must be a JSON object, got ", header.type_name());
    data_ = bytes + 8 + n;
    const size_t data_bytes = map_bytes_ - 8 - n;
    for (const auto& [name, v] : header.items()) {
      const std::string where = cat(path, ": tensor '", name, "'");
      if (name == "__metadata__") {
        check(v.is_object(), path, ": __metadata__ must be an object of strings");
        for (const auto& [k, s] : v.items()) {
          check(s.is_string(), path, ": __metadata__ entry '", k, "' must be a string, got ", s.dump());
          metadata_[k] = s.get<std::string>();
        }
        continue;
      }
      check(v.is_object() && v.contains("dtype") && v.contains("shape") && v.contains("data_offsets"), where,
            " must be an object with dtype, shape and data_offsets");
      check(v["dtype"].is_string(), where, ": dtype must be a string");
      SafetensorsEntry e;
      e.name = name;
      e.dtype = st_dtype(v["dtype"].get<std::string>(), where);
      check(v["shape"].is_array(), where, ": shape must be an array");
      check(v["shape"].size() <= static_cast<size_t>(kMaxRank), where, " has ", v["shape"].size(),
            " dimensions; ringattn holds at most ", kMaxRank);
      uint64_t numel = 1;
      for (const auto& d : v["shape"]) {
        const uint64_t x = count_of(d, where + ": a dimension");
        check(x == 0 || numel <= std::numeric_limits<uint64_t>::max() / x, where, ": the shape overflows");
        numel *= x;
        e.shape.push_back(static_cast<int64_t>(x));
      }
      const auto& off = v["data_offsets"];
      check(off.is_array() && off.size() == 2, where, ": data_offsets must be [begin, end]");
      e.begin = count_of(off[0], where + ": data_offsets[0]");
      e.end = count_of(off[1], where + ": data_offsets[1]");
      check(e.begin <= e.end && e.end <= data_bytes, where, ": data_offsets [", e.begin, ", ", e.end,
            "] are outside the ", data_bytes, " data bytes");
      check(numel <= (e.end - e.begin) / dtype_size(e.dtype) && numel * dtype_size(e.dtype) == e.end - e.begin, where,
            ": shape ", v["shape"].dump(), " of ", st_name(e.dtype), " needs ", numel * dtype_size(e.dtype),
            " bytes but data_offsets give ", e.end - e.begin);
      index_[name] = entries_.size();
      entries_.push_back(std::move(e));
    }
    // The tensors tile the data region: no gaps, no overlaps (the format's rule).
    std::vector<const SafetensorsEntry*> order;
    for (const auto& e : entries_) order.push_back(&e);
    std::sort(order.begin(), order.end(), [](const SafetensorsEntry* a, const SafetensorsEntry* b) {
      return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
    });
    size_t at = 0;
    for (const SafetensorsEntry* e : order) {
      check(e->begin == at, path, ": tensor '", e->name, "' starts at data byte ", e->begin, " but the tensors before ",
            "it end at ", at, " (a gap or an overlap)");
      at = e->end;
    }
    check(at == data_bytes, path, ": the tensors end at data byte ", at, " but the file holds ", data_bytes,
          " (trailing bytes)");
  } catch (...) {
    ::munmap(map_, map_bytes_);
    map_ = nullptr;
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, map_bytes_);
}

const SafetensorsEntry& SafetensorsFile::entry(const std::string& name) const {
  const auto it = index_.find(name);
  check(it != index_.end(), path_, ": no tensor '", name, "'");
  return entries_[it->second];
}

TensorView SafetensorsFile::view(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  const unsigned char* p = data_ + e.begin;
  const int rank = static_cast<int>(e.shape.size());
  if (reinterpret_cast<uintptr_t>(p) % dtype_size(e.dtype) == 0) {
    std::array<int64_t, kMaxRank> strides{};
    int64_t stride = 1;
    for (int i = rank - 1; i >= 0; --i) strides[i] = stride, stride *= e.shape[i];
    return TensorView(const_cast<unsigned char*>(p), e.dtype, rank, e.shape.data(), strides.data());
  }
  auto it = copies_.find(name);
  if (it == copies_.end()) {
    Tensor t(e.dtype, rank, e.shape.data());
    if (e.end > e.begin) std::memcpy(t.ptr<void>(), p, e.end - e.begin);
    it = copies_.emplace(name, std::move(t)).first;
  }
  return it->second.view();
}

Checkpoint::Checkpoint(const std::string& dir_or_file) : source_(dir_or_file) {
  namespace fs = std::filesystem;
  auto add_file = [&](const std::string& path) {
    files_.push_back(std::make_unique<SafetensorsFile>(path));
    return files_.size() - 1;
  };
  if (fs::is_regular_file(dir_or_file)) {
    const size_t f = add_file(dir_or_file);
    for (const auto& e : files_[f]->entries()) where_[e.name] = f;
    return;
  }
  check(fs::is_directory(dir_or_file), dir_or_file, ": no such checkpoint file or directory");
  const fs::path dir(dir_or_file), index = dir / "model.safetensors.index.json", one = dir / "model.safetensors";
  if (!fs::exists(index)) {
    check(fs::exists(one), dir_or_file, " holds neither model.safetensors nor model.safetensors.index.json");
    const size_t f = add_file(one.string());
    for (const auto& e : files_[f]->entries()) where_[e.name] = f;
    return;
  }
  std::ifstream in(index);
  check(in.good(), index.string(), ": cannot read");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw Error(cat(index.string(), ": not valid JSON: ", e.what()));
  }
  check(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(), index.string(),
        ": needs a \"weight_map\" object of tensor name -> shard file");
  std::map<std::string, size_t> shard_of_file;
  for (const auto& [name, file] : j["weight_map"].items()) {
    check(file.is_string(), index.string(), ": the shard of '", name, "' must be a file name");
    const std::string shard = file.get<std::string>();
    check(!shard.empty() && shard.find('/') == std::string::npos && shard != "." && shard != "..", index.string(),
          ": shard '", shard, "' of '", name, "' must be a file name in ", dir_or_file);
    auto it = shard_of_file.find(shard);
    if (it == shard_of_file.end()) it = shard_of_file.emplace(shard, add_file((dir / shard).string())).first;
    check(files_[it->second]->contains(name), index.string(), " lists '", name, "' in ", shard,
          ", which does not hold it");
    where_[name] = it->second;
  }
}

const SafetensorsEntry& Checkpoint::entry(const std::string& name) const {
  const auto it = where_.find(name);
  check(it != where_.end(), source_, ": the checkpoint has no tensor '", name, "'");
  return files_[it->second]->entry(name);
}

TensorView Checkpoint::view(const std::string& name) const {
  const auto it = where_.find(name);
  check(it != where_.end(), source_, ": the checkpoint has no tensor '", name, "'");
  return files_[it->second]->view(name);
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  for (const auto& [name, f] : where_) out.push_back(name);
  return out;
}

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, TensorView>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::set<std::string> seen;
  std::vector<Tensor> contiguous;  // copies of the strided views (reserved: `data` points into it)
  contiguous.reserve(tensors.size());
  std::vector<const TensorView*> data;
  size_t at = 0;
  for (const auto& [name, t] : tensors) {
    check(!name.empty() && name != "__metadata__", path, ": '", name, "' is not a usable tensor name");
    check(seen.insert(name).second, path, ": tensor '", name, "' is given twice");
    check(t.numel() == 0 || !t.empty(), path, ": tensor '", name, "' has no data");
    const TensorView* v = &t;
    if (!t.is_contiguous()) {
      contiguous.emplace_back(t.dtype, t.rank, t.shape.data());
      copy_into(contiguous.back(), t);
      v = &contiguous.back().view();
    }
    const size_t bytes = static_cast<size_t>(t.numel()) * dtype_size(t.dtype);
    header[name] = {{"dtype", st_name(t.dtype)},
                    {"shape", std::vector<int64_t>(t.shape.begin(), t.shape.begin() + t.rank)},
                    {"data_offsets", {at, at + bytes}}};
    at += bytes;
    data.push_back(v);
  }
  std::string text = header.dump();
  text.append((8 - (8 + text.size()) % 8) % 8, ' ');  // the data starts 8-byte aligned
  write_file_atomically(path, [&](std::FILE* f) {
    unsigned char len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(static_cast<uint64_t>(text.size()) >> (8 * i));
    if (std::fwrite(len, 1, 8, f) != 8 || std::fwrite(text.data(), 1, text.size(), f) != text.size()) return false;
    for (const TensorView* v : data) {
      const size_t bytes = static_cast<size_t>(v->numel()) * dtype_size(v->dtype);
      if (bytes > 0 && std::fwrite(v->data, 1, bytes, f) != bytes) return false;
    }
    return true;
  });
}

}  // namespace ringattn
