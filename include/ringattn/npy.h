// NumPy .npy files: little-endian float32, C order (format versions 1.0-3.0).
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "ringattn/tensor.h"

namespace ringattn {

// Reads a float32 array. Wrong magic, dtype, byte order, Fortran order, truncated
// data or a missing file throw Error naming the file and the problem.
Tensor load_npy(const std::string& path);
// Reads token ids: a little-endian int64 or int32 array (any shape, C order), its
// shape into *shape when given. Other dtypes are refused naming the file.
std::vector<int64_t> load_npy_ids(const std::string& path, std::vector<int64_t>* shape = nullptr);
// Writes t (any dtype, any strides) as a contiguous little-endian float32 array.
void save_npy(const std::string& path, const TensorView& t);
// Writes token ids as a little-endian int64 array of the given shape.
void save_npy_ids(const std::string& path, std::span<const int64_t> ids, std::span<const int64_t> shape);

}  // namespace ringattn
