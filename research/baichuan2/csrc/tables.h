// The tables the C++ and kernels.py share: kernels.py reads FORMATS, ISA_PATHS and GROUP_SIZES from this file (one
// X(...) entry a line, nothing else in a list's body), so adding a format, path or group size here is the one edit.
#pragma once

// Weight formats, in the order of enum Fmt (PeakGops takes its index): X(enum name, format name, MindSpore dtype of
// the stored weight). Layouts: docs/WEIGHT_FORMATS.md.
#define BAICHUAN_FORMATS(X)    \
  X(kF32, float32, float32)    \
  X(kBF16, bfloat16, bfloat16) \
  X(kI8, int8, int8)           \
  X(kI4, int4, uint8)

// Instruction-set paths, from the least the CPU needs to the most: X(enum name, path name). Each has its shim
// header isa_<path name>.h and namespace isa_<path name>.
#define BAICHUAN_ISA_PATHS(X) \
  X(kAvx2, avx2)              \
  X(kAvxVnni, avxvnni)        \
  X(kAvx512, avx512)          \
  X(kAvx512Vnni, avx512vnni)

// Group sizes of the int8 / int4 scales with exported projection symbols (LinearInt8G<size>, ...): X(size). Each
// is a multiple of kChunk.
#define BAICHUAN_GROUP_SIZES(X) \
  X(32)                         \
  X(64)                         \
  X(128)                        \
  X(256)                        \
  X(512)                        \
  X(1024)                       \
  X(2048)                       \
  X(4096)                       \
  X(8192)                       \
  X(16384)
