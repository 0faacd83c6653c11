// Output files, written as a careful Unix tool writes them.
//
// write_file_atomically(path, write): results are never left half-written and
// never replace what `path` points at.
//   - `path` names a regular file, or nothing yet: symbolic links are followed to
//     the real file; the contents go to a temporary file in that file's own
//     directory, are flushed to disk and renamed over it (atomic on POSIX file
//     systems). An existing file keeps its permission bits (and its owner, where
//     the process may set it). If writing fails, the earlier file stays whole and
//     the temporary file is removed.
//   - `path` names something else that can be written (a character device such as
//     /dev/null or a terminal, a FIFO, /dev/stdout on a pipe): written directly,
//     never replaced by a regular file.
//   - a directory, or a path whose directory does not exist: Error.
//
// check_output_paths(outputs, inputs): what a command checks before it computes,
// so that a bad output path fails in a second, not after hours: every output can
// be created or written, no two outputs are the same file, and no output is one of
// the inputs. Each path comes with the option that named it, for the message.
#pragma once
#include <cstdio>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace ringattn {

// write(f) writes the contents and returns false on failure (errno set). Throws
// Error naming `path` and the reason.
void write_file_atomically(const std::string& path, const std::function<bool(std::FILE*)>& write);

// (option, path) pairs; empty paths (options not given) are skipped.
using NamedPaths = std::vector<std::pair<std::string, std::string>>;
void check_output_paths(const NamedPaths& outputs, const NamedPaths& inputs = {});

}  // namespace ringattn
