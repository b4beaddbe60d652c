// The benchmark probes: memory read bandwidth and prefill's compute roofline, measured with the model library's
// vector loads and instructions on the same number of threads. A library of their own, built by
// kernel_probes.py when a benchmark or test asks, so the model library carries none of it.
#include "common.h"
#include "thread_pool.h"

#define BAICHUAN_ISA_BODY "probes_isa.inc"
#include "isa_select.h"

namespace {

// Sum of the 64-bit words of p[0, bytes), bytes a multiple of 128 (AVX2) / 256 (AVX-512) and p 64-byte aligned:
// 4 vector loads per step, the way the kernels stream weights.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
__attribute__((noinline)) uint64_t read_sum_avx2(const uint8_t *p, size_t bytes) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i + 128 <= bytes; i += 128) {
    a0 = _mm256_add_epi64(a0, _mm256_load_si256(reinterpret_cast<const __m256i *>(p + i)));
    a1 = _mm256_add_epi64(a1, _mm256_load_si256(reinterpret_cast<const __m256i *>(p + i + 32)));
    a2 = _mm256_add_epi64(a2, _mm256_load_si256(reinterpret_cast<const __m256i *>(p + i + 64)));
    a3 = _mm256_add_epi64(a3, _mm256_load_si256(reinterpret_cast<const __m256i *>(p + i + 96)));
  }
  __m256i s = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
  return _mm256_extract_epi64(s, 0) + _mm256_extract_epi64(s, 3);
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
__attribute__((noinline)) uint64_t read_sum_avx512(const uint8_t *p, size_t bytes) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i + 256 <= bytes; i += 256) {
    a0 = _mm512_add_epi64(a0, _mm512_load_si512(p + i));
    a1 = _mm512_add_epi64(a1, _mm512_load_si512(p + i + 64));
    a2 = _mm512_add_epi64(a2, _mm512_load_si512(p + i + 128));
    a3 = _mm512_add_epi64(a3, _mm512_load_si512(p + i + 192));
  }
  return _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
}
#pragma GCC pop_options

double peak_macs(Fmt fmt, double seconds) { ON_CHOSEN_ISA(peak_macs(fmt, seconds), return -1) }

}  // namespace

extern "C" {
// Read bandwidth in GB/s (1e9 bytes/s) over the n buffers ptrs[i] of bytes[i] bytes, read `reps` times with the
// kernels' vector loads on their threads (each thread a contiguous share of the buffers taken in order); the best
// pass counts; -1 when there is nothing to read or no path runs. Each thread's part of a buffer is read from its
// first whole 64-byte line in blocks of 256 bytes (AVX2: 128); the few edge bytes left out are far below the noise.
double ReadBandwidthOf(int n, void *const *ptrs, const int64_t *bytes, int reps) {
  int64_t total = 0;
  for (int i = 0; i < n; ++i) total += bytes[i];
  const Isa isa = chosen_isa();
  if (total <= 0 || isa == kNone) return -1;
  const int nt = kernel_threads();
  double best = 0;
  volatile uint64_t sink = 0;
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    std::atomic<uint64_t> sum{0};
    parallel(nt, [&](int tid, int tcount) {
      int64_t b, e, at = 0;  // this thread's share [b, e) of the concatenation; at = offset of buffer i in it
      thread_range(total, 1, tid, tcount, &b, &e);
      uint64_t s = 0;
      for (int i = 0; i < n && at < e; at += bytes[i], ++i) {
        const int64_t lo = std::max(b, at) - at, hi = std::min(e, at + bytes[i]) - at;
        if (hi <= lo) continue;
        const uintptr_t p = reinterpret_cast<uintptr_t>(ptrs[i]);
        const uintptr_t first = (p + lo + 63) & ~uintptr_t(63), last = (p + hi) & ~uintptr_t(63);
        if (last <= first) continue;
        const uint8_t *q = reinterpret_cast<const uint8_t *>(first);
        s += isa >= kAvx512 ? read_sum_avx512(q, last - first) : read_sum_avx2(q, last - first);
      }
      sum += s;
    });
    double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    sink = sink + sum;
    best = std::max(best, total / sec / 1e9);
  }
  return best;
}

// Prefill's compute roofline for format `fmt` (tables.h's index: 0 float32, 1 bfloat16, 2 int8, 3 int4) on the
// chosen path: GOPS (2 per multiply-add) of its micro-kernel's inner instruction on all the kernels' threads at once,
// each running it `seconds`; -1 where no path runs.
double PeakGops(int fmt, double seconds) {
  if (fmt < 0 || fmt >= kFormatCount || chosen_isa() == kNone) return -1;
  std::vector<double> rates(kernel_threads());
  parallel(kernel_threads(), [&](int tid, int) { rates[tid] = peak_macs(static_cast<Fmt>(fmt), seconds); });
  double total = 0;
  for (double r : rates) total += r;
  return 2 * total / 1e9;
}

// Memory read bandwidth of a fresh buffer of `gigabytes` of random bytes, first touched by the threads that read
// it (see ReadBandwidthOf); -1 on allocation failure. On a shared virtual machine the figure moves with the
// neighbours' load, and buffers made of few distinct pages read up to 1.5x faster (seen on a 2-core EPYC: ~43
// against ~29 GB/s, as if the host had merged them), hence random bytes here, and ReadBandwidthOf, which measures
// the very bytes a decode step reads.
double ReadBandwidth(double gigabytes, int reps) {
  const int64_t bytes = static_cast<int64_t>(gigabytes * 1e9) / 4096 * 4096;
  uint8_t *buf = static_cast<uint8_t *>(aligned_buffer(bytes));
  if (!buf) return -1;
  parallel(kernel_threads(), [&](int tid, int tcount) {  // distinct pages: nothing a hypervisor could merge
    int64_t b, e;
    thread_range(bytes / 8, 1, tid, tcount, &b, &e);
    uint64_t z = 0x9E3779B97F4A7C15ull * (b + 1);
    uint64_t *words = reinterpret_cast<uint64_t *>(buf);
    for (int64_t i = b; i < e; ++i) {
      z ^= z << 13, z ^= z >> 7, z ^= z << 17;  // xorshift64
      words[i] = z;
    }
  });
  void *ptrs[1] = {buf};
  const double gbs = ReadBandwidthOf(1, ptrs, &bytes, reps);
  free(buf);
  return gbs;
}
}  // extern "C"
