// Hugging Face safetensors checkpoints: one file, or shards listed by
// model.safetensors.index.json.
//
// A file is an 8-byte little-endian header length N, N bytes of UTF-8 JSON
//   {"<name>": {"dtype": "F32"|"BF16"|"F16"|..., "shape": [...], "data_offsets": [begin, end]},
//    "__metadata__": {"<key>": "<string>", ...}}
// and then the data: tensor bytes at [begin, end) of the region after the header,
// little-endian, C order, the tensors tiling the region without gaps or overlap.
// Files are memory-mapped read-only; a tensor is a view into the map when its
// address suits its dtype, else an aligned copy.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "ringattn/tensor.h"

namespace ringattn {

struct SafetensorsEntry {
  std::string name;
  DType dtype = DType::f32;
  std::vector<int64_t> shape;
  size_t begin = 0, end = 0;  // byte offsets in the data region
};

class SafetensorsFile {
 public:
  // Maps `path` and checks the whole header: its length against the file, the
  // JSON, every entry's dtype (F32, BF16, F16; others are refused by name), shape
  // and offsets (inside the data, matching the shape, tiling it). Throws Error
  // naming the file, the tensor and the problem.
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return index_.count(name) > 0; }
  const SafetensorsEntry& entry(const std::string& name) const;  // Error naming a missing tensor
  // The tensor's bytes as a read-only (by contract) contiguous view.
  TensorView view(const std::string& name) const;

 private:
  std::string path_;
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
  const unsigned char* data_ = nullptr;  // the data region
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
  mutable std::map<std::string, Tensor> copies_;  // tensors whose offset breaks their alignment
};

// A checkpoint: `dir/model.safetensors`, or the shards that
// `dir/model.safetensors.index.json` maps tensor names to (each shard opened
// once; a name the index lists must be in its shard). A path to a .safetensors
// file is also accepted.
class Checkpoint {
 public:
  explicit Checkpoint(const std::string& dir_or_file);
  bool contains(const std::string& name) const { return where_.count(name) > 0; }
  const SafetensorsEntry& entry(const std::string& name) const;
  TensorView view(const std::string& name) const;
  // Every tensor name, sorted.
  std::vector<std::string> names() const;
  const std::string& source() const { return source_; }

 private:
  std::string source_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> where_;  // name -> files_ index
};

// Writes tensors (any dtype, any strides; stored contiguous in their dtype) as one
// safetensors file, atomically (write_file_atomically), in the order given, with
// the header padded so the data starts 8-byte aligned. Names must be distinct.
void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, TensorView>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace ringattn
