// What every part of the kernels shares: the standard headers, the weight formats, a projection problem, status
// codes and small helpers. Compiled for baseline x86-64 (the ISA paths get their instructions from target pragmas).
#pragma once
#include <cpuid.h>
#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#include "tables.h"

namespace {

// Chunk = 32 input elements: one int4 block; every supported group size is a multiple of it.
constexpr int kChunk = 32;

#define BAICHUAN_FMT_ENUM(e, name, dtype) e,
enum Fmt { BAICHUAN_FORMATS(BAICHUAN_FMT_ENUM) kFormatCount };
#undef BAICHUAN_FMT_ENUM

// The MindSpore dtype of each format's stored weight.
#define BAICHUAN_FMT_DTYPE(e, name, dtype) #dtype,
const char *const kWeightDtype[] = {BAICHUAN_FORMATS(BAICHUAN_FMT_DTYPE)};
#undef BAICHUAN_FMT_DTYPE

inline bool quantised(int fmt) { return fmt == kI8 || fmt == kI4; }

// What a kernel returns to MindSpore, which raises any value but kOk as an error naming it.
enum Status : int {
  kOk = 0,
  kArgCount = 1,   // the call has the wrong number of tensors
  kRank = 2,       // a tensor has the wrong number of dimensions
  kDtype = 3,      // a tensor has the wrong dtype (the per-op layout entries: or the wrong rank)
  kShape = 4,      // shapes disagree with each other or with the weight format's layout
  kBadValue = 5,   // a group size or scales the format cannot take, a cache slot or position out of range
  kNoPath = 6,     // the CPU has none of the instruction-set paths (no AVX2)
  kNoMemory = 7,   // a scratch buffer could not be allocated
  kBadFormat = 8,  // a weight format the path has no kernel for
};

// One projection y = x W^T: x [M, K], W one of the formats [N, ...], y [M, N].
struct Problem {
  const float *x;       // [M, K]
  const void *w;        // format-specific, [N, ...]
  const uint16_t *s;    // float16 scales [N, G] or nullptr
  const uint16_t *mn;   // int4 asymmetric: float16 minimums [N, G] (w = s (q + 8) + mn), else nullptr
  float *y;             // [M, N]
  int64_t M, N, K, G, group, row_units;  // row_units: elements of the weight type per row of W
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Contiguous row ranges per thread, aligned to `align` rows so every thread runs whole register blocks.
inline void thread_range(int64_t n, int64_t align, int t, int nt, int64_t *begin, int64_t *end) {
  int64_t blocks = ceil_div(n, align);
  int64_t b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;
  *begin = std::min(n, b0 * align);
  *end = std::min(n, b1 * align);
}

void *aligned_buffer(size_t bytes) {
  void *p = nullptr;
  if (posix_memalign(&p, 64, std::max<size_t>(bytes, 64)) != 0) return nullptr;
  return p;
}

// 16 bytes from anywhere (SSE2, every x86-64 path): prefill's repack reads weight rows with it (lanes_of_rows).
inline __m128i ld16(const uint8_t *p) { return _mm_loadu_si128(reinterpret_cast<const __m128i *>(p)); }

}  // namespace

// Loop unrolling the per-ISA bodies ask of GCC where it would not unroll on its own.
#define UNROLL _Pragma("GCC unroll 16")
