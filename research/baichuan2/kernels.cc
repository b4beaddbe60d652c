// Projection kernels y = x W^T for mindspore.ops.Custom(func_type="aot") on x86-64 CPUs (built by kernels.py).
//
// x float32 [M, K], y float32 [M, N]; W is one of (layouts in QUANT_FORMAT.md / kernels.py):
//   float32 [N, K] | bfloat16 [N, K] | int8 [N, K] + float16 scales [N, ceil(K/group)]
//   | int4 uint8 [N, ceil(K/32)*16] (q4_0-style blocks of 32, stored q + 8) + float16 scales [N, ceil(K/group)]
// M <= 4 (decode): matrix-vector, R rows of W at a time against all M rows of x, so each weight byte is read once
//   and the loop streams W at memory speed. int8 / int4: x is quantised once per call to int8 per 32-element chunk
//   (scale absmax / 127, so |x - x_q| <= scale / 2) and each chunk is an integer dot product (VNNI vpdpbusd, else
//   maddubs + madd: unsigned x signed bytes, so int8 weights go in as |w| against x_q with w's sign, int4 as their
//   stored q + 8 with 8 s sum(x_q) taken off at the end), scaled by weight scale x activation scale in float32.
//   bfloat16 with AVX512-BF16: x rounded to bfloat16 once per call and vdpbf16ps (|x - x_bf16| <= 2^-8 |x|).
// M > 4 (prefill): float32 / bfloat16: a tile of W converted to float32 once and reused by every row of x (x
//   repacked so that an 8 (6 on AVX2) x 2-vector register block of y is updated per k); int8 / int4: x quantised
//   as for decode and integer dots against tiles of W rows interleaved 4 bytes at a time (see gemm_q).
// Besides the projections: CachedStack, a whole cached step (prefill or decode) through every decoder layer in one
// op with the caches written in place, and layout / attention ops for the per-op path (see each one's comment).
// Accumulation is float32 throughout. One source serves every x86-64 machine: the body below is compiled four
// times (avx2: AVX2+FMA+F16C; avxvnni: + AVX-VNNI; avx512: F/BW/VL/DQ; avx512vnni: + AVX512-VNNI + AVX512-BF16) by
// including this file into itself under `#pragma GCC target`, and the best path is picked at run time from cpuid;
// BAICHUAN_KERNEL_ISA=<path> forces one the CPU has (for tests). Threads: see kernel_threads().
#ifndef BAICHUAN_KERNEL_BODY
#include <cpuid.h>
#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>
#include <cmath>
#include <type_traits>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

// Chunk = 32 input elements: one int4 block; every supported group size is a multiple of it.
constexpr int kChunk = 32;

struct Problem {
  const float *x;       // [M, K]
  const void *w;        // format-specific, [N, ...]
  const uint16_t *s;    // float16 scales [N, G] or nullptr
  float *y;             // [M, N]
  int64_t M, N, K, G, group, row_units;  // row_units: elements of the weight type per row of W
};

enum Fmt { kF32, kBF16, kI8, kI4 };

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Threads = the CPUs this process may run on (its affinity mask, which taskset / cpusets narrow), unless
// BAICHUAN_KERNEL_THREADS says otherwise. OMP_NUM_THREADS is no guide: importing mindspore sets it to 1.
int kernel_threads() {
  static int n = [] {
    const char *v = getenv("BAICHUAN_KERNEL_THREADS");
    if (v && atoi(v) > 0) return atoi(v);
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
    return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  }();
  return n;
}

// The kernels' threads: a small persistent pool rather than OpenMP. libgomp's idle threads spin after every
// parallel region, and on a 2-core machine they took the cores MindSpore's own threads needed between our calls
// (measured: a decode step 20-30x slower). These workers spin only briefly (kSpinMicros) for the next job, then
// block on a condition variable; the caller waits for them the same way. A decode step calls the kernels every few
// tens of microseconds, and waking a blocked thread costs about as much as a small projection: with blocking only,
// a 2-thread step of the 58M shape S took 8.6 ms against 5.9 ms on one thread (measured).
// parallel(nt, fn) runs fn(t, nt) for t = 0..nt-1 (t = 0 on the calling thread) and returns when all are done.
constexpr int64_t kSpinMicros = 100;

// Spins (with pause) while `busy()` holds, up to kSpinMicros; true when it stopped holding in that time.
template <class Busy>
bool spin_while(Busy busy) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
  for (int i = 0;; ++i) {
    if (!busy()) return true;
    _mm_pause();
    if ((i & 63) == 63 && std::chrono::steady_clock::now() > until) return false;
  }
}

class Pool {
 public:
  void run(int nt, const std::function<void(int, int)> &fn) {
    std::lock_guard<std::mutex> one_job(job_mu_);  // MindSpore may launch kernels from several threads
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = &fn;
      nt_ = nt;
      // a new worker first takes mu_ after this job is posted, so it starts with it
      while (static_cast<int>(workers_) < nt - 1) std::thread(&Pool::work, this, ++workers_).detach();
      pending_.store(static_cast<int>(workers_));
      generation_.fetch_add(1);  // under mu_: a worker about to block re-checks it there
    }
    wake_.notify_all();
    fn(0, nt);
    if (spin_while([this] { return pending_.load() != 0; })) return;
    std::unique_lock<std::mutex> lk(mu_);
    done_.wait(lk, [this] { return pending_.load() == 0; });
  }

 private:
  void work(int id) {
    uint64_t seen;
    {
      std::lock_guard<std::mutex> lk(mu_);
      seen = generation_.load() - 1;  // started inside run(): the job posted there is ours too
    }
    for (;;) {
      if (!spin_while([&] { return generation_.load() == seen; })) {
        std::unique_lock<std::mutex> lk(mu_);
        wake_.wait(lk, [&] { return generation_.load() != seen; });
      }
      const std::function<void(int, int)> *fn;
      int nt;
      {
        std::lock_guard<std::mutex> lk(mu_);
        seen = generation_.load();
        fn = job_;
        nt = nt_;
      }
      if (id < nt) (*fn)(id, nt);
      if (pending_.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lk(mu_);  // the caller checks pending_ under mu_ before it blocks
        done_.notify_one();
      }
    }
  }
  std::mutex job_mu_, mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int, int)> *job_ = nullptr;
  int nt_ = 0;
  std::atomic<int> pending_{0};
  unsigned workers_ = 0;
  std::atomic<uint64_t> generation_{1};
};

void parallel(int nt, const std::function<void(int, int)> &fn) {
  if (nt <= 1) {
    fn(0, 1);
    return;
  }
  static Pool *pool = new Pool;  // never destroyed: its detached workers outlive static destructors
  pool->run(nt, fn);
}

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

#define BAICHUAN_KERNEL_BODY 1

// ---------------------------------------------------------------- AVX2 + FMA + F16C: 8 floats per vector
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace isa_avx2 {
constexpr int W = 8;
using F = __m256;
#define KI static inline __attribute__((always_inline))
KI F fzero() { return _mm256_setzero_ps(); }
KI F fload(const float *p) { return _mm256_loadu_ps(p); }
KI void fstore(float *p, F v) { _mm256_storeu_ps(p, v); }
KI F fset1(float v) { return _mm256_set1_ps(v); }
KI F ffma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
KI F fmul(F a, F b) { return _mm256_mul_ps(a, b); }
KI float hsum(F v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
KI F ld_bf16(const uint16_t *p) {
  __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
// Integer decode primitives: I = one vector of bytes (32 = one chunk here); lane i of a dot sums bytes 4i..4i+3.
using I = __m256i;
constexpr bool kBF16Dot = false;
KI I iload(const void *p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)); }
KI F icvt(I v) { return _mm256_cvtepi32_ps(v); }
// sum of unsigned a x signed b per 4 bytes; |a| <= 128, |b| <= 127 keeps maddubs' int16 pairs from saturating
KI I dot_us(I a, I b) { return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)); }
KI I iabs8(I w) { return _mm256_sign_epi8(w, w); }  // -128 -> 0x80, read as unsigned 128: still |w|
KI I sign8(I x, I w) { return _mm256_sign_epi8(x, w); }
// a . b + c . d with small unsigned a, c (int4 values 0..15: the int16 sums stay far from saturation)
KI I dot_us2(I a, I b, I c, I d) {
  return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(a, b), _mm256_maddubs_epi16(c, d)),
                           _mm256_set1_epi16(1));
}
KI I lo_nibbles(I v) { return _mm256_and_si256(v, _mm256_set1_epi8(0xF)); }
KI I hi_nibbles(I v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0xF)); }
// Prefill's integer primitives: acc + a . b per 4 bytes; int16 pair sums and their widening (the two halves of
// dot_us, for sums of several pair sums that cannot saturate); 4 bytes to every lane; lanes from base + idx bytes.
constexpr bool kDotAcc = false;  // true where dot_acc is one instruction (VNNI)
KI I dot_acc(I acc, I a, I b) { return _mm256_add_epi32(acc, dot_us(a, b)); }
KI I pairs_us(I a, I b) { return _mm256_maddubs_epi16(a, b); }
KI I widen16(I v) { return _mm256_madd_epi16(v, _mm256_set1_epi16(1)); }
KI I iadd16(I a, I b) { return _mm256_add_epi16(a, b); }
KI I iadd32(I a, I b) { return _mm256_add_epi32(a, b); }
KI I ixor(I a, I b) { return _mm256_xor_si256(a, b); }
KI I izero() { return _mm256_setzero_si256(); }
KI I iset1(int32_t v) { return _mm256_set1_epi32(v); }
KI void istore(void *p, I v) { _mm256_storeu_si256(reinterpret_cast<__m256i *>(p), v); }
KI I bcast4(const int8_t *p) {
  int32_t v;
  memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}
// Prefill's repack (rows_sideways): the 16 bytes at row[q] + off, row[4 + q] + off, ... in successive 128-bit
// lanes, and 32- / 64-bit interleaves within each lane.
KI I lanes_of_rows(const uint8_t *const row[W], int q, int64_t off) {
  return _mm256_inserti128_si256(_mm256_castsi128_si256(ld16(row[q] + off)), ld16(row[4 + q] + off), 1);
}
KI I unpack_lo32(I a, I b) { return _mm256_unpacklo_epi32(a, b); }
KI I unpack_hi32(I a, I b) { return _mm256_unpackhi_epi32(a, b); }
KI I unpack_lo64(I a, I b) { return _mm256_unpacklo_epi64(a, b); }
KI I unpack_hi64(I a, I b) { return _mm256_unpackhi_epi64(a, b); }
// Decode's scales: W float16 to float32; lane l of the result = v[idx[l]]; the index vector whose lane l is
// first + l / lanes_per_chunk (the chunk, of W in a vector of scales, whose dot lane l holds).
KI F ld_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))); }
KI F permute(F v, I idx) { return _mm256_permutevar8x32_ps(v, idx); }
KI I lane_index(int lanes_per_chunk, int first) {
  alignas(32) int32_t t[8];
  for (int l = 0; l < 8; ++l) t[l] = first + l / lanes_per_chunk;
  return _mm256_load_si256(reinterpret_cast<const __m256i *>(t));
}
KI F dot_bf16(F acc, const uint16_t *, const uint16_t *) { return acc; }  // unused: no BF16 dot on this path
KI F dot_bf16_bcast(F acc, F, uint32_t) { return acc; }
KI void pairs_bf16(const float *, uint32_t *) {}
KI F fadd(F a, F b) { return _mm256_add_ps(a, b); }
KI F fdiv(F a, F b) { return _mm256_div_ps(a, b); }
KI F fclamp(F x, float lo, float hi) { return _mm256_min_ps(_mm256_max_ps(x, fset1(lo)), fset1(hi)); }
KI F fround(F x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
KI F fabsv(F v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
KI F fmaxv(F a, F b) { return _mm256_max_ps(a, b); }
KI float hmax(F v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
KI void store_i8(int8_t *p, F v) {  // W integer-valued floats in [-127, 127] as int8
  const __m256i i = _mm256_cvtps_epi32(v);
  const __m128i h = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i *>(p), _mm_packs_epi16(h, h));
}
KI F fpow2i(F n) {  // 2^n for integer-valued n in [-126, 127]: n + 127 in the exponent bits
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
static __attribute__((noinline)) uint64_t read_sum(const uint8_t *p, size_t bytes) {  // bandwidth probe: 4 x 32 B loads per step
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
#include __FILE__
#undef KI
}  // namespace isa_avx2
#pragma GCC pop_options

// ---------------------------------------------------------------- AVX2 + AVX-VNNI: as AVX2, the byte dot in one op
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
namespace isa_avxvnni {
using namespace isa_avx2;  // every primitive but the dot (names defined here hide those)
#define KI static inline __attribute__((always_inline))
KI I dot_us(I a, I b) { return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b); }
KI I dot_us2(I a, I b, I c, I d) { return _mm256_dpbusd_avx_epi32(dot_us(a, b), c, d); }
constexpr bool kDotAcc = true;
KI I dot_acc(I acc, I a, I b) { return _mm256_dpbusd_avx_epi32(acc, a, b); }
#include __FILE__
#undef KI
}  // namespace isa_avxvnni
#pragma GCC pop_options

// ---------------------------------------------------------------- AVX-512 (F, BW, VL, DQ): 16 floats per vector
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace isa_avx512 {
constexpr int W = 16;
using F = __m512;
#define KI static inline __attribute__((always_inline))
KI F fzero() { return _mm512_setzero_ps(); }
KI F fload(const float *p) { return _mm512_loadu_ps(p); }
KI void fstore(float *p, F v) { _mm512_storeu_ps(p, v); }
KI F fset1(float v) { return _mm512_set1_ps(v); }
KI F ffma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
KI F fmul(F a, F b) { return _mm512_mul_ps(a, b); }
KI float hsum(F v) { return _mm512_reduce_add_ps(v); }
KI F ld_bf16(const uint16_t *p) {
  __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
using I = __m512i;  // 64 bytes = two chunks: lanes 0-7 chunk c, lanes 8-15 chunk c + 1
constexpr bool kBF16Dot = false;
KI I dot_us(I a, I b) { return _mm512_madd_epi16(_mm512_maddubs_epi16(a, b), _mm512_set1_epi16(1)); }
KI F dot_bf16(F acc, const uint16_t *, const uint16_t *) { return acc; }
KI F dot_bf16_bcast(F acc, F, uint32_t) { return acc; }
KI void pairs_bf16(const float *, uint32_t *) {}
KI F fadd(F a, F b) { return _mm512_add_ps(a, b); }
KI F fdiv(F a, F b) { return _mm512_div_ps(a, b); }
KI F fclamp(F x, float lo, float hi) { return _mm512_min_ps(_mm512_max_ps(x, fset1(lo)), fset1(hi)); }
KI F fround(F x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
KI F fabsv(F v) { return _mm512_abs_ps(v); }
KI F fmaxv(F a, F b) { return _mm512_max_ps(a, b); }
KI float hmax(F v) { return _mm512_reduce_max_ps(v); }
KI void store_i8(int8_t *p, F v) {  // W integer-valued floats in [-127, 127] as int8
  _mm_storeu_si128(reinterpret_cast<__m128i *>(p), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
}
KI F fpow2i(F n) {  // 2^n for integer-valued n in [-126, 127]: n + 127 in the exponent bits
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
KI I iload(const void *p) { return _mm512_loadu_si512(p); }
KI F icvt(I v) { return _mm512_cvtepi32_ps(v); }
KI I iabs8(I w) { return _mm512_abs_epi8(w); }
KI I sign8(I x, I w) { return _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x); }
KI I dot_us2(I a, I b, I c, I d) {
  return _mm512_madd_epi16(_mm512_add_epi16(_mm512_maddubs_epi16(a, b), _mm512_maddubs_epi16(c, d)),
                           _mm512_set1_epi16(1));
}
KI I lo_nibbles(I v) { return _mm512_and_si512(v, _mm512_set1_epi8(0xF)); }
KI I hi_nibbles(I v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0xF)); }
constexpr bool kDotAcc = false;
KI I dot_acc(I acc, I a, I b) { return _mm512_add_epi32(acc, dot_us(a, b)); }
KI I pairs_us(I a, I b) { return _mm512_maddubs_epi16(a, b); }
KI I widen16(I v) { return _mm512_madd_epi16(v, _mm512_set1_epi16(1)); }
KI I iadd16(I a, I b) { return _mm512_add_epi16(a, b); }
KI I iadd32(I a, I b) { return _mm512_add_epi32(a, b); }
KI I ixor(I a, I b) { return _mm512_xor_si512(a, b); }
KI I izero() { return _mm512_setzero_si512(); }
KI I iset1(int32_t v) { return _mm512_set1_epi32(v); }
KI void istore(void *p, I v) { _mm512_storeu_si512(p, v); }
KI I bcast4(const int8_t *p) {
  int32_t v;
  memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}
KI I lanes_of_rows(const uint8_t *const row[W], int q, int64_t off) {  // as AVX2's, four 128-bit lanes
  const I v = _mm512_inserti32x4(_mm512_castsi128_si512(ld16(row[q] + off)), ld16(row[4 + q] + off), 1);
  return _mm512_inserti32x4(_mm512_inserti32x4(v, ld16(row[8 + q] + off), 2), ld16(row[12 + q] + off), 3);
}
KI I unpack_lo32(I a, I b) { return _mm512_unpacklo_epi32(a, b); }
KI I unpack_hi32(I a, I b) { return _mm512_unpackhi_epi32(a, b); }
KI I unpack_lo64(I a, I b) { return _mm512_unpacklo_epi64(a, b); }
KI I unpack_hi64(I a, I b) { return _mm512_unpackhi_epi64(a, b); }
KI F ld_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p))); }
KI F permute(F v, I idx) { return _mm512_permutexvar_ps(idx, v); }
KI I lane_index(int lanes_per_chunk, int first) {
  alignas(64) int32_t t[16];
  for (int l = 0; l < 16; ++l) t[l] = first + l / lanes_per_chunk;
  return _mm512_load_si512(t);
}
static __attribute__((noinline)) uint64_t read_sum(const uint8_t *p, size_t bytes) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i + 256 <= bytes; i += 256) {
    a0 = _mm512_add_epi64(a0, _mm512_load_si512(p + i));
    a1 = _mm512_add_epi64(a1, _mm512_load_si512(p + i + 64));
    a2 = _mm512_add_epi64(a2, _mm512_load_si512(p + i + 128));
    a3 = _mm512_add_epi64(a3, _mm512_load_si512(p + i + 192));
  }
  return _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
}
#include __FILE__
#undef KI
}  // namespace isa_avx512
#pragma GCC pop_options

// ---------------------------------------------------------------- AVX-512 + VNNI + BF16: the same, dot products in one op
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,avx2,fma,f16c")
namespace isa_avx512vnni {
using namespace isa_avx512;  // every primitive but the dot products (names defined here hide those)
#define KI static inline __attribute__((always_inline))
constexpr bool kBF16Dot = true;
KI I dot_us(I a, I b) { return _mm512_dpbusd_epi32(_mm512_setzero_si512(), a, b); }
KI I dot_us2(I a, I b, I c, I d) { return _mm512_dpbusd_epi32(dot_us(a, b), c, d); }
constexpr bool kDotAcc = true;
KI I dot_acc(I acc, I a, I b) { return _mm512_dpbusd_epi32(acc, a, b); }
// acc += w . x over 32 bfloat16 (lane i: elements 2i and 2i + 1); the products are exact in float32
KI F dot_bf16(F acc, const uint16_t *w, const uint16_t *x) {
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w), (__m512bh)_mm512_loadu_si512(x));
}
// acc[i] += x[2i] w0 + x[2i + 1] w1 for the bfloat16 pair (w0, w1) in w2's low and high half (prefill)
KI F dot_bf16_bcast(F acc, F x, uint32_t w2) {
  return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)_mm512_set1_epi32(static_cast<int>(w2)));
}
// 2W floats to W words, word i = bfloat16(x[2i]) | bfloat16(x[2i + 1]) << 16, rounded to nearest even (prefill)
KI void pairs_bf16(const float *x, uint32_t *out) {
  istore(out, (I)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + W), _mm512_loadu_ps(x)));
}
#include __FILE__
#undef KI
}  // namespace isa_avx512vnni
#pragma GCC pop_options

// ---------------------------------------------------------------- run-time choice and the exported entry points
namespace {

enum Isa { kNone = 0, kAvx2, kAvxVnni, kAvx512, kAvx512Vnni };
const char *const kIsaNames[] = {"none", "avx2", "avxvnni", "avx512", "avx512vnni"};

// Which paths this CPU can run (cpuid leaf 7: VNNI = sub-leaf 0 ECX bit 11; AVX-VNNI, AVX512-BF16 = sub-leaf 1 EAX
// bits 4, 5).
bool cpu_has(Isa isa) {
  static const unsigned mask = [] {
    __builtin_cpu_init();
    bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    unsigned a0 = 0, b0 = 0, c0 = 0, d0 = 0, a1 = 0, b1 = 0, c1 = 0, d1 = 0;
    __get_cpuid_count(7, 0, &a0, &b0, &c0, &d0);
    if (a0 >= 1) __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1);
    bool vnni512 = (c0 >> 11) & 1, avxvnni = (a1 >> 4) & 1, bf16 = (a1 >> 5) & 1;
    return (avx2 ? 1u << kAvx2 : 0) | (avx2 && avxvnni ? 1u << kAvxVnni : 0) | (avx512 ? 1u << kAvx512 : 0) |
           (avx512 && vnni512 && bf16 ? 1u << kAvx512Vnni : 0);
  }();
  return (mask >> isa) & 1;
}

Isa best_isa() {
  for (Isa isa : {kAvx512Vnni, kAvx512, kAvxVnni, kAvx2})
    if (cpu_has(isa)) return isa;
  return kNone;
}

// Read on every call (a getenv is nothing next to a projection) so a test can switch paths inside one process.
// A forced path the CPU lacks falls back to the best one it has; KernelIsa() reports what actually runs.
Isa chosen_isa() {
  static const Isa best = best_isa();
  const char *force = getenv("BAICHUAN_KERNEL_ISA");
  if (force)
    for (int i = kAvx2; i <= kAvx512Vnni; ++i)
      if (strcmp(force, kIsaNames[i]) == 0 && cpu_has(static_cast<Isa>(i))) return static_cast<Isa>(i);
  return best;
}

const char *isa_name(Isa isa) { return kIsaNames[isa]; }

// `return <path>::call` on the chosen path; `none` where the CPU has none (no AVX2).
#define ON_CHOSEN_ISA(call, none)                   \
  switch (chosen_isa()) {                           \
    case kAvx512Vnni: return isa_avx512vnni::call;  \
    case kAvx512: return isa_avx512::call;          \
    case kAvxVnni: return isa_avxvnni::call;        \
    case kAvx2: return isa_avx2::call;              \
    default: none;                                  \
  }

// The cached-stack op calls these only after a projection ran, which needs a path.
void silu_mul(float *g, const float *u, int64_t n) { ON_CHOSEN_ISA(silu_mul(g, u, n), return) }

void attend_query(const float *q, const float *kc, const float *vc, int64_t D, int64_t last, const uint8_t *real,
                  const int64_t *pos, float slope, float scale, float *p, float *out) {
  ON_CHOSEN_ISA(attend_query(q, kc, vc, D, last, real, pos, slope, scale, p, out), return)
}

// nw projections of one x (ps[i].x equal) on the chosen path and the kernels' threads.
int project(Fmt fmt, const Problem *ps, int nw) { ON_CHOSEN_ISA(run(fmt, ps, nw, kernel_threads()), return 6) }
double peak_macs(Fmt fmt, double seconds) { ON_CHOSEN_ISA(peak_macs(fmt, seconds), return -1) }

// y = w * x / sqrt(mean(x^2) + eps) per row of H; x, y [M, H], w [H].
void rms_norm_rows(const float *x, const float *w, float eps, int64_t M, int64_t H, float *y) {
  for (int64_t m = 0; m < M; ++m) {
    const float *xr = x + m * H;
    float ss = 0.f;
    for (int64_t i = 0; i < H; ++i) ss += xr[i] * xr[i];
    const float r = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
    for (int64_t i = 0; i < H; ++i) y[m * H + i] = w[i] * (xr[i] * r);
  }
}

// RoPE, half rotation (as Hugging Face Llama), of one head's D values at one position: y may be x.
void rope_half(const float *x, const float *cs, const float *sn, int64_t D, float *y) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    y[i] = a * cs[i] - b * sn[i];
    y[i + h] = b * cs[i + h] + a * sn[i + h];
  }
}

// The MindSpore dtype of each format's stored weight.
const char *const kWeightDtype[] = {"float32", "bfloat16", "int8", "uint8"};

// Binds the weight tensors at params[wi] (weight, or qweight + scales) of a projection with K inputs to p (w, s, N,
// K, G, group, row_units), checking them against the format's layout; N < 0 takes the row count from the weight.
int bind_weight(Fmt fmt, int64_t group, int wi, int64_t N, int64_t K, void **params, int *ndims, int64_t **shapes,
                const char **dtypes, Problem *p) {
  const bool quant = fmt == kI8 || fmt == kI4;
  if (strcmp(dtypes[wi], kWeightDtype[fmt]) != 0 || ndims[wi] != 2) return 3;
  if (quant && (group <= 0 || group % kChunk != 0)) return 5;
  p->w = params[wi];
  p->s = quant ? static_cast<const uint16_t *>(params[wi + 1]) : nullptr;
  p->N = N < 0 ? shapes[wi][0] : N;
  p->K = K;
  p->group = group;
  p->row_units = shapes[wi][1];
  p->G = quant ? ceil_div(K, group) : 0;
  if (shapes[wi][0] != p->N || p->row_units != (fmt == kI4 ? ceil_div(K, kChunk) * 16 : K)) return 4;
  if (quant && (strcmp(dtypes[wi + 1], "float16") != 0 || ndims[wi + 1] != 2 || shapes[wi + 1][0] != p->N ||
                shapes[wi + 1][1] != p->G))
    return 5;
  return 0;
}

// Shapes and dtypes as MindSpore hands them over: x, then per weight its tensors (weight, or qweight + scales),
// then one output per weight. A mismatch returns non-zero, which MindSpore raises as an error.
int linear(Fmt fmt, int64_t group, int nw, int nparam, void **params, int *ndims, int64_t **shapes,
           const char **dtypes) {
  const int per = fmt == kI8 || fmt == kI4 ? 2 : 1, nin = 1 + per * nw;
  if (nparam != nin + nw) return 1;
  for (int i = 0; i < nparam; ++i)
    if (ndims[i] != 2) return 2;
  if (strcmp(dtypes[0], "float32") != 0) return 3;
  Problem ps[3];
  for (int i = 0; i < nw; ++i) {
    const int yi = nin + i;
    Problem &p = ps[i];
    if (int err = bind_weight(fmt, group, 1 + per * i, -1, shapes[0][1], params, ndims, shapes, dtypes, &p)) return err;
    if (strcmp(dtypes[yi], "float32") != 0) return 3;
    p.x = static_cast<const float *>(params[0]);
    p.y = static_cast<float *>(params[yi]);
    p.M = shapes[0][0];
    if (shapes[yi][0] != p.M || shapes[yi][1] != p.N) return 4;
  }
  if (ps[0].M == 0) return 0;
  if (ps[0].K == 0) {
    for (int i = 0; i < nw; ++i) memset(ps[i].y, 0, sizeof(float) * ps[i].M * ps[i].N);
    return 0;
  }
  return project(fmt, ps, nw);
}

}  // namespace

#define AOT_ARGS int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *
#define AOT_ARGS_NAMED int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes
#define AOT_FWD nparam, params, ndims, shapes, dtypes

extern "C" {
// One symbol per format, group size (kernels.py GROUP_SIZES) and number of weights sharing x (1, 2: gate/up,
// 3: q/k/v; suffix x2 / x3): the aot interface passes no attributes.
#define ENTRIES(name, fmt, g)                                                     \
  int name(AOT_ARGS) { return linear(fmt, g, 1, AOT_FWD); }                       \
  int name##x2(AOT_ARGS) { return linear(fmt, g, 2, AOT_FWD); }                   \
  int name##x3(AOT_ARGS) { return linear(fmt, g, 3, AOT_FWD); }
ENTRIES(LinearF32, kF32, 0)
ENTRIES(LinearBF16, kBF16, 0)
#define QUANT_ENTRIES(g)              \
  ENTRIES(LinearInt8G##g, kI8, g)     \
  ENTRIES(LinearInt4G##g, kI4, g)
QUANT_ENTRIES(32)
QUANT_ENTRIES(64)
QUANT_ENTRIES(128)
QUANT_ENTRIES(256)
QUANT_ENTRIES(512)
QUANT_ENTRIES(1024)
QUANT_ENTRIES(2048)
QUANT_ENTRIES(4096)
QUANT_ENTRIES(8192)
QUANT_ENTRIES(16384)

// x [A, B, C, D] -> y [A, C, B, D], float32: attention's head transposes at inference ([B, S, N, D] <-> [B, N, S, D]).
// MindSpore's CPU Transpose keeps one 64-bit source offset per element for the life of the compiled graph (~2x the
// tensor per op instance, 4 per layer); this copies rows of D floats and keeps nothing.
int SwapAxes12(AOT_ARGS) {
  if (nparam != 2 || ndims[0] != 4 || ndims[1] != 4) return 1;
  if (strcmp(dtypes[0], "float32") != 0 || strcmp(dtypes[1], "float32") != 0) return 3;
  const int64_t A = shapes[0][0], B = shapes[0][1], C = shapes[0][2], D = shapes[0][3];
  if (shapes[1][0] != A || shapes[1][1] != C || shapes[1][2] != B || shapes[1][3] != D) return 4;
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  for (int64_t a = 0; a < A; ++a)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c)
        memcpy(y + ((a * C + c) * B + b) * D, x + ((a * B + b) * C + c) * D, sizeof(float) * D);
  return 0;
}

// y = x.swapaxes(1, 2) with RoPE applied (half rotation, as Hugging Face Llama): x [A, B, C, D], cos / sin and
// y [A, C, B, D], float32. One op for what takes seven (slices, negation, concatenation, products) plus a transpose.
int RopeSwapAxes12(AOT_ARGS) {
  if (nparam != 4) return 1;
  for (int i = 0; i < 4; ++i)
    if (ndims[i] != 4 || strcmp(dtypes[i], "float32") != 0) return 3;
  const int64_t A = shapes[0][0], B = shapes[0][1], C = shapes[0][2], D = shapes[0][3];
  for (int i = 1; i < 4; ++i)
    if (shapes[i][0] != A || shapes[i][1] != C || shapes[i][2] != B || shapes[i][3] != D) return 4;
  if (D % 2) return 4;
  const float *x = static_cast<const float *>(params[0]), *cs = static_cast<const float *>(params[1]),
              *sn = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  for (int64_t a = 0; a < A; ++a)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c) {
        const float *xr = x + ((a * B + b) * C + c) * D;
        const int64_t o = ((a * C + c) * B + b) * D;
        rope_half(xr, cs + o, sn + o, D, y + o);
      }
  return 0;
}

// One decode step of attention with its cache writes, float32: q, k, v [B, N, 1, D] (the new token), caches kc, vc
// [B, N, L, D], slot (int32, 0-d or [1]: the cache slot of the new token), bias [B, N, 1, L] (additive, masked keys
// very negative) -> out [B, 1, N, D] (the layout o_proj reads), kc' and vc' (the caches with the new row at slot).
// out = softmax(q kc'^T / sqrt(D) + bias) vc'. Replaces ~14 stock ops a layer (gather + select per cache, the score
// and value products, softmax, casts, the output transpose), each of which costs a launch in every step.
int DecodeAttention(AOT_ARGS) {
  if (nparam != 10) return 1;
  const int ins[] = {0, 1, 2, 3, 4, 6, 7, 8, 9};
  for (int i : ins)
    if (ndims[i] != 4 || strcmp(dtypes[i], "float32") != 0) return 3;
  if (ndims[5] > 1 || strcmp(dtypes[5], "int32") != 0) return 3;
  const int64_t B = shapes[3][0], N = shapes[3][1], L = shapes[3][2], D = shapes[3][3];
  for (int i = 0; i < 3; ++i)
    if (shapes[i][0] != B || shapes[i][1] != N || shapes[i][2] != 1 || shapes[i][3] != D) return 4;
  for (int i : {4, 8, 9})
    if (shapes[i][0] != B || shapes[i][1] != N || shapes[i][2] != L || shapes[i][3] != D) return 4;
  if (shapes[6][0] != B || shapes[6][1] != N || shapes[6][2] != 1 || shapes[6][3] != L) return 4;
  if (shapes[7][0] != B || shapes[7][1] != 1 || shapes[7][2] != N || shapes[7][3] != D) return 4;
  const int64_t slot = *static_cast<const int32_t *>(params[5]);
  if (slot < 0 || slot >= L) return 5;
  const float *q = static_cast<const float *>(params[0]), *k = static_cast<const float *>(params[1]),
              *v = static_cast<const float *>(params[2]), *kc = static_cast<const float *>(params[3]),
              *vc = static_cast<const float *>(params[4]), *bias = static_cast<const float *>(params[6]);
  float *out = static_cast<float *>(params[7]), *ko = static_cast<float *>(params[8]),
        *vo = static_cast<float *>(params[9]);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<float> p(L);
  for (int64_t h = 0; h < B * N; ++h) {  // h = b * N + n: the caches' and q's layout
    float *kh = ko + h * L * D, *vh = vo + h * L * D;
    memcpy(kh, kc + h * L * D, sizeof(float) * L * D);
    memcpy(vh, vc + h * L * D, sizeof(float) * L * D);
    memcpy(kh + slot * D, k + h * D, sizeof(float) * D);
    memcpy(vh + slot * D, v + h * D, sizeof(float) * D);
    const float *qh = q + h * D, *bh = bias + h * L;
    float top = -INFINITY;
    for (int64_t l = 0; l < L; ++l) {
      float t = 0.f;
      for (int64_t d = 0; d < D; ++d) t += qh[d] * kh[l * D + d];
      p[l] = t * scale + bh[l];
      top = std::max(top, p[l]);
    }
    float sum = 0.f;
    for (int64_t l = 0; l < L; ++l) sum += (p[l] = std::exp(p[l] - top));
    float *oh = out + ((h / N) * N + h % N) * D;  // [B, 1, N, D]: the same offset as [B, N, D]
    for (int64_t d = 0; d < D; ++d) oh[d] = 0.f;
    for (int64_t l = 0; l < L; ++l) {
      const float w = p[l] / sum;
      for (int64_t d = 0; d < D; ++d) oh[d] += w * vh[l * D + d];
    }
  }
  return 0;
}

// A cached step through the whole decoder stack and the final RMSNorm in one op, the key/value caches written in
// place: Ly layers over S new tokens of each of B sequences (prefill: S = the prompt, from slot 0; decode: S = 1),
// float32 activations, all weights in one format. Per layer, on the hidden state x:
//   h = x + o_proj(attention(rope(q), rope(k), v));  x = h + down(silu(gate(n2)) * up(n2))
//   where q, k, v = q/k/v_proj(n1), n1 = RMSNorm(x) * ln1, n2 = RMSNorm(h) * ln2;  then y = RMSNorm(x) * norm.
// Why one op: a decode step once launched ~18 MindSpore ops a layer plus ~25 for the positions and the attention
// mask, each 15-50 us on these 2-core machines, several times the projections' own time at small shapes; and every
// stock op of a compiled graph keeps memory for the graph's life (the prefill graph of a 7B held ~21 MB a layer).
// Why one op for all layers rather than one a layer: MindSpore's time between our kernels grows with how long they
// ran (measured on a shared 2-core EPYC: a shape-S step of 10 launches took 0.5 ms back to back with instant
// kernels, 1.6-2.3 ms with 6 ms of other work between steps; its launch bookkeeping is evicted from the caches
// meanwhile), so a step costs in proportion to how much of that bookkeeping it touches: one launch and one set of
// shared inputs for the whole stack, not one a layer.
// Why in place: an op output is fresh memory, so returning the caches copied all of them every step; the op writes
// the new rows into the cache tensors it is given instead, which on CPU are the caller's own buffers
// (tests/test_kernels.py checks that the caller sees them).
// Positions and visibility come from the attention mask, as BaichuanModel.position_inputs builds them for the stock
// ops: key positions p_l = max(cumsum(mask)_l - 1, 0); the query in slot j has position p_j and sees key l when
// l <= j and (mask_l or l == j); RoPE (half rotation) at the token's position, or ALiBi adds slope_n (p_l - p_j).
// Inputs: x [B * S, H] (sequence-major); norm [H] (the final RMSNorm); eps [1] float32; spec int32 [2] = (group
// size, 1 = RoPE / 0 = ALiBi); mask int32 [B, L] (1 = a real token, the new ones included); slot int32 (0-d or [1]:
// the first new token's cache slot; they fill [slot, slot + S)); cos, sin float32 [P, D] (RoPE tables, a row per
// position) and slopes float32 [N] (ALiBi; whichever is unused may be any float32 tensor); caches kc, vc
// [Ly, B, N, L, D]; then per layer ln1, ln2 [H] and the weights of q, k, v, o, gate, up, down, each (w) for
// float32 / bfloat16 or (qweight, scales) for int8 / int4 (the format is read from their dtypes). Output y [B * S, H].
// CachedStackLogits: the same with the lm_head's weights last (w, or qweight + scales, in any format; group size
// as the layers'), and the output the logits [B, V] of each sequence's last new token: the lm_head, the strided
// slice before it and their launches leave the decode graph too.
static int cached_stack(bool with_head, AOT_ARGS_NAMED) {
  // x norm eps spec mask slot cos sin slopes kc vc | per layer: ln1 ln2 q k v o gate up down | [head] | y
  constexpr int kFixed = 11, kWeights = 7;
  if (nparam < kFixed + 2 + kWeights + 1 + with_head) return 1;
  int fmt = -1, head_fmt = -1;
  const int head_tensors = !with_head ? 0 : strcmp(dtypes[nparam - 2], "float16") == 0 ? 2 : 1;
  const int head_at = nparam - 1 - head_tensors;
  for (int f = 0; f < 4; ++f) {
    if (strcmp(dtypes[kFixed + 2], kWeightDtype[f]) == 0) fmt = f;
    if (with_head && strcmp(dtypes[head_at], kWeightDtype[f]) == 0) head_fmt = f;
  }
  if (fmt < 0 || (with_head && (head_fmt < 0 || (head_tensors == 2) != (head_fmt == kI8 || head_fmt == kI4))))
    return 3;
  const int per = fmt == kI8 || fmt == kI4 ? 2 : 1, per_layer = 2 + per * kWeights;
  if ((head_at - kFixed) % per_layer != 0) return 1;
  const int64_t layers = (head_at - kFixed) / per_layer;
  for (int i : {0, 1, 2, 6, 7, 8, 9, 10, nparam - 1})
    if (strcmp(dtypes[i], "float32") != 0) return 3;
  for (int i : {3, 4, 5})
    if (strcmp(dtypes[i], "int32") != 0) return 3;
  if (ndims[0] != 2 || ndims[1] != 1 || ndims[9] != 5 || ndims[10] != 5 || ndims[4] != 2 || ndims[3] != 1 ||
      shapes[3][0] != 2)
    return 2;
  const int64_t M = shapes[0][0], H = shapes[0][1];
  const int64_t B = shapes[9][1], N = shapes[9][2], L = shapes[9][3], D = shapes[9][4];
  for (int c : {9, 10})
    if (shapes[c][0] != layers || shapes[c][1] != B || shapes[c][2] != N || shapes[c][3] != L || shapes[c][4] != D)
      return 4;
  if (B <= 0 || M % B != 0 || N * D != H || shapes[1][0] != H || shapes[4][0] != B || shapes[4][1] != L)
    return 4;
  const int64_t S = M / B;
  const int32_t *spec = static_cast<const int32_t *>(params[3]);
  const int64_t group = spec[0];
  const bool rope = spec[1] != 0;
  const int64_t P = rope ? shapes[6][0] : 0;
  if (rope && (ndims[6] != 2 || ndims[7] != 2 || shapes[6][1] != D || shapes[7][0] != P || shapes[7][1] != D ||
               D % 2 != 0))
    return 4;
  if (!rope && (ndims[8] != 1 || shapes[8][0] != N)) return 4;
  const int64_t slot = *static_cast<const int32_t *>(params[5]);
  if (slot < 0 || slot + S > L) return 5;
  const int64_t I = shapes[kFixed + 2 + per * 4][0];  // gate rows
  // Weight w (0..6 = q k v o gate up down) of layer l: shape [rows, K], checked against the format's layout.
  std::vector<Problem> ps(static_cast<size_t>(layers * kWeights));
  const int64_t rows[kWeights] = {H, H, H, H, I, I, H}, cols[kWeights] = {H, H, H, H, H, H, I};
  const Fmt f = static_cast<Fmt>(fmt);
  for (int64_t l = 0; l < layers; ++l) {
    const int base = kFixed + static_cast<int>(l) * per_layer;
    for (int i : {base, base + 1})
      if (strcmp(dtypes[i], "float32") != 0 || ndims[i] != 1 || shapes[i][0] != H) return 4;
    for (int w = 0; w < kWeights; ++w) {
      Problem *p = &ps[l * kWeights + w];
      p->M = M;
      if (int err = bind_weight(f, group, base + 2 + per * w, rows[w], cols[w], params, ndims, shapes, dtypes, p))
        return err;
    }
  }
  Problem head;  // the lm_head over the last new token of each sequence: B rows
  if (with_head) {
    head.M = B;
    if (int err = bind_weight(static_cast<Fmt>(head_fmt), group, head_at, -1, H, params, ndims, shapes, dtypes, &head))
      return err;
    if (shapes[nparam - 1][0] != B || shapes[nparam - 1][1] != head.N) return 4;
  } else if (shapes[nparam - 1][0] != M || shapes[nparam - 1][1] != H) {
    return 4;
  }
  const float *x_in = static_cast<const float *>(params[0]), *cos_table = static_cast<const float *>(params[6]),
              *sin_table = static_cast<const float *>(params[7]), *slopes = static_cast<const float *>(params[8]);
  const int32_t *mask = static_cast<const int32_t *>(params[4]);
  const float eps = *static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[nparam - 1]);
  const int64_t keys = slot + S;  // slots a query can see: [0, slot + S)
  // per sequence and slot: whether it holds a real token, and its key position
  std::vector<uint8_t> real(static_cast<size_t>(B * keys));
  std::vector<int64_t> pos(static_cast<size_t>(B * keys));
  for (int64_t b = 0; b < B; ++b) {
    int64_t seen = 0;
    for (int64_t l = 0; l < keys; ++l) {
      real[b * keys + l] = mask[b * L + l] > 0;
      seen += real[b * keys + l];
      pos[b * keys + l] = std::max<int64_t>(seen - 1, 0);
    }
    if (rope && pos[b * keys + keys - 1] >= P) return 5;  // past the RoPE tables: the caller's context check failed
  }
  // scratch: the hidden state x, n, q, k, v, attn, h [M, H] each; gate, up [M, I] each
  std::vector<float> scratch(static_cast<size_t>(M * (7 * H + 2 * I)));
  float *x = scratch.data(), *n = x + M * H, *q = n + M * H, *k = q + M * H, *v = k + M * H, *att = v + M * H,
        *h = att + M * H, *gate = h + M * H, *up = gate + M * I;
  memcpy(x, x_in, sizeof(float) * M * H);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const uint8_t *real_p = real.data();
  const int64_t *pos_p = pos.data();
  for (int64_t layer = 0; layer < layers; ++layer) {
    const int base = kFixed + static_cast<int>(layer) * per_layer;
    const float *ln1 = static_cast<const float *>(params[base]), *ln2 = static_cast<const float *>(params[base + 1]);
    float *kc = static_cast<float *>(params[9]) + layer * B * N * L * D,
          *vc = static_cast<float *>(params[10]) + layer * B * N * L * D;
    Problem *lp = &ps[layer * kWeights];
    auto run = [&](int first, int count, const float *in, std::initializer_list<float *> outs) {
      int i = 0;
      for (float *out : outs) {
        lp[first + i].x = in;
        lp[first + i].y = out;
        ++i;
      }
      return project(f, lp + first, count);
    };
    rms_norm_rows(x, ln1, eps, M, H, n);
    if (int err = run(0, 3, n, {q, k, v})) return err;
    parallel(kernel_threads(), [&](int t, int nt) {
      int64_t h0, h1;
      thread_range(B * N, 1, t, nt, &h0, &h1);
      std::vector<float> p(static_cast<size_t>(keys));
      for (int64_t bh = h0; bh < h1; ++bh) {  // bh = b * N + head: the caches' layout; rows of q / k / v: b * S + s
        const int64_t b = bh / N, head = bh % N;
        float *kcache = kc + bh * L * D, *vcache = vc + bh * L * D;
        for (int64_t s = 0; s < S; ++s) {  // RoPE, then the cache rows of every new token first: later ones see them
          const int64_t row = (b * S + s) * H + head * D, j = slot + s;
          if (rope) {
            const int64_t at = pos_p[b * keys + j] * D;
            rope_half(q + row, cos_table + at, sin_table + at, D, q + row);
            rope_half(k + row, cos_table + at, sin_table + at, D, k + row);
          }
          memcpy(kcache + j * D, k + row, sizeof(float) * D);
          memcpy(vcache + j * D, v + row, sizeof(float) * D);
        }
        for (int64_t s = 0; s < S; ++s) {
          const int64_t row = (b * S + s) * H + head * D;
          attend_query(q + row, kcache, vcache, D, slot + s, real_p + b * keys, pos_p + b * keys,
                       rope ? 0.f : slopes[head], scale, p.data(), att + row);
        }
      }
    });
    if (int err = run(3, 1, att, {h})) return err;
    for (int64_t i = 0; i < M * H; ++i) h[i] += x[i];
    rms_norm_rows(h, ln2, eps, M, H, n);
    if (int err = run(4, 2, n, {gate, up})) return err;
    parallel(kernel_threads(), [&](int t, int nt) {
      int64_t i0, i1;
      thread_range(M * I, 64, t, nt, &i0, &i1);
      silu_mul(gate + i0, up + i0, i1 - i0);
    });
    if (int err = run(6, 1, gate, {x})) return err;  // x is last read by h += x above: the new x replaces it
    for (int64_t i = 0; i < M * H; ++i) x[i] += h[i];
  }
  const float *norm = static_cast<const float *>(params[1]);
  if (!with_head) {
    rms_norm_rows(x, norm, eps, M, H, y);
    return 0;
  }
  for (int64_t b = 0; b < B; ++b) rms_norm_rows(x + (b * S + S - 1) * H, norm, eps, 1, H, n + b * H);
  head.x = n;
  head.y = y;
  return project(static_cast<Fmt>(head_fmt), &head, 1);
}

int CachedStack(AOT_ARGS) { return cached_stack(false, AOT_FWD); }
int CachedStackLogits(AOT_ARGS) { return cached_stack(true, AOT_FWD); }

// RMSNorm over the last axis: y = w * x / sqrt(mean(x^2) + eps); x and y [M, H], w [H], eps [1], float32.
int RmsNormF32(AOT_ARGS) {
  if (nparam != 4 || ndims[0] != 2 || ndims[1] != 1 || ndims[2] != 1 || ndims[3] != 2) return 1;
  for (int i = 0; i < 4; ++i)
    if (strcmp(dtypes[i], "float32") != 0) return 3;
  const int64_t M = shapes[0][0], H = shapes[0][1];
  if (shapes[1][0] != H || shapes[2][0] != 1 || shapes[3][0] != M || shapes[3][1] != H) return 4;
  rms_norm_rows(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                *static_cast<const float *>(params[2]), M, H, static_cast<float *>(params[3]));
  return 0;
}

const char *KernelIsa() { return isa_name(chosen_isa()); }
// Whether this CPU can run the path `name` (avx2, avxvnni, avx512, avx512vnni).
int KernelHasIsa(const char *name) {
  for (int i = kAvx2; i <= kAvx512Vnni; ++i)
    if (strcmp(name, kIsaNames[i]) == 0) return cpu_has(static_cast<Isa>(i));
  return 0;
}
int KernelThreads() { return kernel_threads(); }

// Read bandwidth in GB/s (1e9 bytes/s) over the n buffers ptrs[i] of bytes[i] bytes, read `reps` times with the
// kernels' vector loads on their threads (each thread a contiguous share of the buffers taken in order); the best
// pass counts. Each thread's part of a buffer is read from its first whole 64-byte line in blocks of 256 bytes
// (AVX2: 128); the few edge bytes left out are far below the noise.
double ReadBandwidthOf(int n, void *const *ptrs, const int64_t *bytes, int reps) {
  int64_t total = 0;
  for (int i = 0; i < n; ++i) total += bytes[i];
  if (total <= 0) return -1;
  const int nt = kernel_threads();
  const Isa isa = chosen_isa();
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
        s += isa >= kAvx512 ? isa_avx512::read_sum(q, last - first) : isa_avx2::read_sum(q, last - first);
      }
      sum += s;
    });
    double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    sink = sink + sum;
    best = std::max(best, total / sec / 1e9);
  }
  return best;
}

// Prefill's compute roofline for format `fmt` (enum Fmt: 0 float32, 1 bfloat16, 2 int8, 3 int4) on the chosen path:
// GOPS (2 per multiply-add) of its micro-kernel's inner instruction on all the kernels' threads at once, each
// running it `seconds`; -1 where no path runs.
double PeakGops(int fmt, double seconds) {
  if (fmt < kF32 || fmt > kI4 || chosen_isa() == kNone) return -1;
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

#else  // ================================================================ the body, compiled once per instruction set

// Per format: the weight element type; float formats: elements of it per 32-element chunk and `raw` = a chunk as
// W-wide float vectors in element order; quantised ones: decode's integer dots (prefill's are in micro_q).
struct F32 {
  using T = float;
  static constexpr int units = kChunk;
  static constexpr bool quant = false;
  static constexpr float offset = 0;
  KI void raw(const T *p, F *out) {
    for (int v = 0; v < kChunk / W; ++v) out[v] = fload(p + v * W);
  }
};
struct BF16 {
  using T = uint16_t;
  static constexpr int units = kChunk;
  static constexpr bool quant = false;
  static constexpr float offset = 0;
  KI void raw(const T *p, F *out) {
    for (int v = 0; v < kChunk / W; ++v) out[v] = ld_bf16(p + v * W);
  }
};
struct I8 {
  using T = int8_t;
  static constexpr bool quant = true;
  static constexpr float offset = 0;
  // Decode: one integer vector of weights covers CPV chunks; x_q is in element order.
  static constexpr int CPV = W / 8;
  KI int64_t xq_pos(int64_t k) { return k; }
  // Integer dots of one vector of weights with each row of x_q: |w| (unsigned) against x_q carrying w's sign.
  template <int MX>
  KI void idot(const T *src, const int8_t *xq, int64_t kp, I d[MX]) {
    I w = iload(src), a = iabs8(w);
    for (int m = 0; m < MX; ++m) d[m] = dot_us(a, sign8(iload(xq + m * kp), w));
  }
};
struct I4 {
  using T = uint8_t;
  static constexpr bool quant = true;
  static constexpr float offset = 8;  // stored q + 8
  // Decode: one integer vector of packed bytes covers CPV blocks. Rather than reorder the nibbles, x_q is stored
  // in their order: per CPV blocks, first every block's elements 0..15 (the low nibbles), then every 16..31.
  static constexpr int CPV = W / 4;
  KI int64_t xq_pos(int64_t k) {
    const int64_t c = k / kChunk, t = k % kChunk;
    return (c / CPV) * (CPV * kChunk) + (t / 16) * (CPV * 16) + (c % CPV) * 16 + t % 16;
  }
  // The stored q + 8 (unsigned) against x_q; the 8 sum(x_q) this adds is taken off per row at the end (corr).
  template <int MX>
  KI void idot(const T *src, const int8_t *xq, int64_t kp, I d[MX]) {
    I v = iload(src), lo = lo_nibbles(v), hi = hi_nibbles(v);
    for (int m = 0; m < MX; ++m) d[m] = dot_us2(lo, iload(xq + m * kp), hi, iload(xq + m * kp + CPV * 16));
  }
};

// The last, partial chunk of a row (formats stored without padding): copied into a zero-filled chunk.
template <class Fm>
KI const typename Fm::T *tail_chunk(const typename Fm::T *row, int64_t full, int64_t K, typename Fm::T *buf) {
  memset(buf, 0, sizeof(typename Fm::T) * Fm::units);
  memcpy(buf, row + full * Fm::units, sizeof(typename Fm::T) * (K - full * kChunk));
  return buf;
}

// Decode reads R weight rows at a time, and the next block of R rows follows them in memory. Rows are short (2-8 KB
// at 7B), so the hardware prefetcher barely ramps up on one before it ends: while a block is read, each step also
// prefetches the line at the same offset of the next block into L2 (2-core Xeon at 11008 x 4096, in fractions of the
// bandwidth roofline: int4 41% -> 76%, int8 69% -> 91%, bfloat16 84% -> ~100%; into L1 it was 64% / 84% / 95%, two
// blocks ahead no better; on a 2-core EPYC, Zen 3, L1 and L2 measured the same side by side). Past the last row it
// fetches lines nothing reads: a prefetch never faults, and this costs less than a bounds check per step.
// At least kPrefetchAhead bytes ahead, though: int4's batch-1 block is one 2 KB row, fetched in about a memory
// latency at the rate a thread reads (2-core EPYC, Zen 4, a 7B step's int4 projections in fractions of the read
// bandwidth of their own weights, interleaved runs: one row ahead 76-77%, 8 KB 82-90%, 16 KB 88-89%, 32 KB 84-88%).
constexpr int64_t kPrefetchAhead = 16384;
struct NextBlock {
  const char *base;
  int64_t ahead;  // rows
  NextBlock(const void *w, int64_t row_bytes, int64_t n0, int R)
      : ahead(std::max<int64_t>(R, ceil_div(kPrefetchAhead, row_bytes))) {
    base = static_cast<const char *>(w) + (n0 + ahead) * row_bytes;
  }
  inline __attribute__((always_inline)) void fetch(int64_t offset) const { _mm_prefetch(base + offset, _MM_HINT_T1); }
  // The quantised formats' scales of the R rows as far ahead (R G float16, contiguous): read a block of W chunks
  // at a time, a line of each row's, they came too late from memory otherwise (int8 batch 1 reads 8 rows at a time:
  // 7B decode on a 2-core EPYC, Zen 4, 74-79% of the roofline in two runs without this, 89% with it).
  void fetch_scales(const uint16_t *s, int64_t G, int64_t n0, int R) const {
    const char *p = reinterpret_cast<const char *>(s + (n0 + ahead) * G);
    for (int64_t line = 0; line < R * G * 2; line += 64) _mm_prefetch(p + line, _MM_HINT_T1);
  }
};

// ---- decode, float32 / bfloat16: y[m, n0:n0+R] for all M (<= 4) rows of x; xp = x zero-padded to whole chunks,
// row stride kp.
template <class Fm, int R, int MX>
static inline void gemv_block(const Problem &p, const float *xp, int64_t kp, int64_t n0) {
  using T = typename Fm::T;
  const T *rows[R];
  for (int r = 0; r < R; ++r) rows[r] = static_cast<const T *>(p.w) + (n0 + r) * p.row_units;
  F acc[R][MX];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MX; ++m) acc[r][m] = fzero();
  const int64_t chunks = ceil_div(p.K, kChunk), full = p.K / kChunk;
  const NextBlock next(p.w, p.row_units * sizeof(T), n0, R);
  auto step = [&](int r, const T *src, int64_t c) __attribute__((always_inline)) {
    for (int64_t line = 0; line < Fm::units * static_cast<int64_t>(sizeof(T)); line += 64)
      next.fetch((r * p.row_units + c * Fm::units) * sizeof(T) + line);
    F w[kChunk / W];
    Fm::raw(src, w);
    const float *xc = xp + c * kChunk;
    for (int v = 0; v < kChunk / W; ++v)
      for (int m = 0; m < MX; ++m) acc[r][m] = ffma(w[v], fload(xc + m * kp + v * W), acc[r][m]);
  };
  for (int64_t c = 0; c < full; ++c)
    for (int r = 0; r < R; ++r) step(r, rows[r] + c * Fm::units, c);
  if (full < chunks) {
    alignas(64) T buf[Fm::units];
    for (int r = 0; r < R; ++r) step(r, tail_chunk<Fm>(rows[r], full, p.K, buf), full);
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MX; ++m) p.y[m * p.N + n0 + r] = hsum(acc[r][m]);
}

// Decode runs every weight of a call (nw of them, same x) in one parallel region: each thread takes its share of
// every weight's rows, so a fused q/k/v or gate/up call costs one thread fork/join and one preparation of x.
template <class Fm, int MX>
static int gemv(const Problem *ps, int nw, int nt) {
  const Problem &p = ps[0];
  // Rows of W per register block: all of AVX-512's 32 registers hold 4 x MX accumulators; AVX2 has 16.
  constexpr int R = (W == 16 || MX == 1) ? 4 : 2;
  const int64_t kp = ceil_div(p.K, kChunk) * kChunk;
  float *xp = static_cast<float *>(aligned_buffer(sizeof(float) * MX * kp));
  if (!xp) return 7;
  for (int m = 0; m < MX; ++m) {
    memcpy(xp + m * kp, p.x + m * p.K, sizeof(float) * p.K);
    memset(xp + m * kp + p.K, 0, sizeof(float) * (kp - p.K));
  }
  parallel(nt, [&](int tid, int tcount) {
    for (int i = 0; i < nw; ++i) {
      int64_t b, e;
      thread_range(ps[i].N, R, tid, tcount, &b, &e);
      int64_t n = b;
      for (; n + R <= e; n += R) gemv_block<Fm, R, MX>(ps[i], xp, kp, n);
      for (; n < e; ++n) gemv_block<Fm, 1, MX>(ps[i], xp, kp, n);
    }
  });
  free(xp);
  return 0;
}

// One chunk of x (kl <= 32 elements) to int8: x_q = round(x / dx) in [-127, 127] (nearest, ties to even), dx =
// absmax / 127 (0 for an all-zero chunk); elements 0..15 go to lo[0..15], 16..31 to hi[0..15] (int4's decode keeps
// them apart), *sum is their sum; returns dx. A whole chunk is done in vectors, with the same values.
KI float quantise_chunk(const float *x, int64_t kl, int8_t *lo, int8_t *hi, int *sum) {
  constexpr int NV = kChunk / W;
  if (kl == kChunk) {
    F v[NV], a = fzero();
    for (int i = 0; i < NV; ++i) {
      v[i] = fload(x + i * W);
      a = fmaxv(a, fabsv(v[i]));
    }
    const float amax = hmax(a), inv = amax > 0 ? 127.0f / amax : 0.0f;
    F t = fzero();
    for (int i = 0; i < NV; ++i) {
      const F q = fclamp(fround(fmul(v[i], fset1(inv))), -127.f, 127.f);
      store_i8(i * W < 16 ? lo + i * W : hi + i * W - 16, q);
      t = fadd(t, q);
    }
    *sum = static_cast<int>(hsum(t));  // integers of at most 32 x 127: exact in float32
    return amax / 127.0f;
  }
  float amax = 0;
  for (int64_t j = 0; j < kl; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float inv = amax > 0 ? 127.0f / amax : 0.0f;
  *sum = 0;
  for (int64_t j = 0; j < kl; ++j) {
    const int q = std::min(127, std::max(-127, static_cast<int>(std::nearbyint(x[j] * inv))));
    (j < 16 ? lo[j] : hi[j - 16]) = static_cast<int8_t>(q);
    *sum += q;
  }
  return amax / 127.0f;
}

// ---- decode, int8 / int4: x quantised to int8 per chunk once per call (xq [MX][kp], kp = K padded to whole steps
// of CPV chunks, in Fm::xq_pos order; dx [MX][ncp]: each chunk's scale, zero past the real chunks; dxs = dx x the
// chunk's sum of x_q, for the offset correction). A step is one integer vector of weights (CPV chunks) and its dots
// with each x_q; the float work is one conversion and one FMA per dot, acc += dot x (s_w s_x) spread over the dot's
// lanes. The scales come a block of W chunks at a time (one float vector: W weight scales from float16 times x's
// chunk scales) and each step picks its chunks' lanes out of that vector with one permute: no per-row pass over the
// scales, no store and reload. Decode of int8 / int4 is compute-bound at about the memory bandwidth on 2 cores, so
// every operation a step counts (in cache, one thread, int4 256 x 4096 on a noisy Zen 4 EPYC: 20.7-24.9 us a call
// with the per-row pass, 18.6-22.5 without).
// Formats with an offset (int4: stored q + 8): sum (q - 8) s x = sum s (q x) - 8 corr, corr = sum_c s_w dx xs.
template <class Fm, int R, int MX>
static inline void gemv_q_block(const Problem &p, const int8_t *xq, const float *dx, const float *dxs, int64_t kp,
                                int64_t ncp, int gshift, const I *idx, int64_t n0) {
  using T = typename Fm::T;
  constexpr int VU = 4 * W;              // weight bytes per integer vector (a step)
  constexpr int EPS = Fm::CPV * kChunk;  // elements per step
  constexpr int SPB = W / Fm::CPV;       // steps per block of W chunks
  constexpr bool kCorr = Fm::offset != 0;
  const int64_t rs = p.row_units, nv = kp / EPS, fullv = rs / VU, chunks = ceil_div(p.K, kChunk);
  const T *w0 = static_cast<const T *>(p.w) + n0 * rs;
  // accumulators per row: a lone row alternates two, so that its consecutive FMAs do not wait on each other
  constexpr int A = R == 1 ? 2 : 1;
  F acc[A][R][MX], corr[R][MX];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MX; ++m) {
      corr[r][m] = fzero();
      for (int a = 0; a < A; ++a) acc[a][r][m] = fzero();
    }
  const NextBlock next(p.w, rs * sizeof(T), n0, R);
  next.fetch_scales(p.s, p.G, n0, R);
  // s_w x s_x of the block of W chunks from c0, per row and x row (and the offset correction's sums)
  auto block_scales = [&](int64_t c0, F cs[R][MX]) __attribute__((always_inline)) {
    for (int r = 0; r < R; ++r) {
      const uint16_t *h = p.s + (n0 + r) * p.G;
      F sw;
      if (gshift == 0 && c0 + W <= chunks) {
        sw = ld_f16(h + c0);
      } else {  // group > 32, or the row's last block: chunk by chunk, zero past the last chunk
        alignas(64) float t[W];
        for (int i = 0; i < W; ++i) t[i] = c0 + i < chunks ? _cvtsh_ss(h[(c0 + i) >> gshift]) : 0.0f;
        sw = fload(t);
      }
      for (int m = 0; m < MX; ++m) {
        cs[r][m] = fmul(sw, fload(dx + m * ncp + c0));
        if (kCorr) corr[r][m] = ffma(sw, fload(dxs + m * ncp + c0), corr[r][m]);
      }
    }
  };
  auto step = [&](int a, int r, const T *src, int64_t v, const F cs[MX], I lanes) __attribute__((always_inline)) {
    next.fetch((r * rs + v * VU) * sizeof(T));
    I d[MX];
    Fm::template idot<MX>(src, xq + v * EPS, kp, d);
    for (int m = 0; m < MX; ++m) acc[a][r][m] = ffma(icvt(d[m]), permute(cs[m], lanes), acc[a][r][m]);
  };
  int64_t v = 0;
  for (; v + SPB <= fullv; v += SPB) {  // whole blocks of W chunks, every vector of them full
    F cs[R][MX];
    block_scales(v * Fm::CPV, cs);
    for (int j = 0; j < SPB; ++j)
      for (int r = 0; r < R; ++r) step(j % A, r, w0 + r * rs + (v + j) * VU, v + j, cs[r], idx[j]);
  }
  if (v < nv) {  // the last block: part of it, and its last vector partial (zero-filled; x_q is zero there too)
    F cs[R][MX];
    block_scales(v * Fm::CPV, cs);
    alignas(64) T buf[VU];
    for (int j = 0; v + j < nv; ++j)
      for (int r = 0; r < R; ++r) {
        const T *src = w0 + r * rs + (v + j) * VU;
        if (v + j >= fullv) {
          memset(buf, 0, sizeof(buf));
          memcpy(buf, src, sizeof(T) * (rs - fullv * VU));
          src = buf;
        }
        step(0, r, src, v + j, cs[r], idx[j]);
      }
  }
  for (int a = 1; a < A; ++a)
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MX; ++m) acc[0][r][m] = fadd(acc[0][r][m], acc[a][r][m]);
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MX; ++m)
      p.y[m * p.N + n0 + r] = hsum(acc[0][r][m]) - (kCorr ? Fm::offset * hsum(corr[r][m]) : 0.0f);
}

template <class Fm, int MX>
static int gemv_q(const Problem *ps, int nw, int nt) {
  const Problem &p = ps[0];
  // Rows per block, batch 1 (of the bandwidth roofline at 11008 x 4096, 2 threads): int8 4 rows (AVX2; 8 on AVX-512,
  // measured on a 2-core Xeon: 85-87% against 83% for 4); int4 one row, so that each thread reads one sequential
  // stream (2-core EPYC, Zen 3, interleaved runs: 1 row 88-90% against 2 rows 66-74% and 4 rows 76-80%; at
  // 125696 x 4096 91% against 64%). Batch > 1: 2 rows (4 on AVX-512), the accumulators need the registers.
  constexpr int R = MX == 1 ? (Fm::offset != 0 ? 1 : (W == 16 ? 8 : 4)) : (W == 16 ? 4 : 2);
  // elements per step; dot lanes per chunk; steps per block of W chunks (W / CPV both: a vector's W lanes cover
  // its CPV chunks, and W chunks take W / CPV vectors)
  constexpr int EPS = Fm::CPV * kChunk, LPC = W / Fm::CPV, SPB = W / Fm::CPV;
  const int64_t chunks = ceil_div(p.K, kChunk), kp = ceil_div(p.K, EPS) * EPS;
  const int64_t ncp = ceil_div(kp / kChunk, W) * W;  // chunks padded to whole blocks of W
  int8_t *xq = static_cast<int8_t *>(aligned_buffer(MX * kp));
  float *dx = static_cast<float *>(aligned_buffer(sizeof(float) * 2 * MX * ncp));
  if (!xq || !dx) {
    free(xq);
    free(dx);
    return 7;
  }
  float *dxs = dx + MX * ncp;
  memset(xq, 0, MX * kp);
  memset(dx, 0, sizeof(float) * 2 * MX * ncp);
  for (int m = 0; m < MX; ++m)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t k0 = c * kChunk;
      int sum;
      dx[m * ncp + c] = quantise_chunk(p.x + m * p.K + k0, std::min<int64_t>(kChunk, p.K - k0),
                                       xq + m * kp + Fm::xq_pos(k0), xq + m * kp + Fm::xq_pos(k0 + 16), &sum);
      dxs[m * ncp + c] = dx[m * ncp + c] * static_cast<float>(sum);
    }
  const int gshift = __builtin_ctzll(p.group / kChunk);
  I idx[SPB];  // step j of a block: its CPV chunks, from j * CPV, over LPC lanes each
  for (int j = 0; j < SPB; ++j) idx[j] = lane_index(LPC, j * Fm::CPV);
  parallel(nt, [&](int tid, int tcount) {
    for (int i = 0; i < nw; ++i) {
      int64_t b, e;
      thread_range(ps[i].N, R, tid, tcount, &b, &e);
      int64_t n = b;
      for (; n + R <= e; n += R) gemv_q_block<Fm, R, MX>(ps[i], xq, dx, dxs, kp, ncp, gshift, idx, n);
      for (; n < e; ++n) gemv_q_block<Fm, 1, MX>(ps[i], xq, dx, dxs, kp, ncp, gshift, idx, n);
    }
  });
  free(xq);
  free(dx);
  return 0;
}

// ---- decode, bfloat16 where the CPU has a bfloat16 dot (kBF16Dot): x rounded to bfloat16 (nearest even) once.
KI uint16_t to_bf16(float f) {
  uint32_t bits;
  memcpy(&bits, &f, 4);
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}
template <int R, int MX>
static inline void gemv_bf16_block(const Problem &p, const uint16_t *xb, int64_t kp, int64_t n0) {
  const uint16_t *rows[R];
  for (int r = 0; r < R; ++r) rows[r] = static_cast<const uint16_t *>(p.w) + (n0 + r) * p.K;
  F acc[R][MX];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MX; ++m) acc[r][m] = fzero();
  const int64_t full = p.K / kChunk;
  const NextBlock next(p.w, p.K * 2, n0, R);
  for (int64_t c = 0; c < full; ++c)
    for (int r = 0; r < R; ++r) {
      next.fetch((r * p.K + c * kChunk) * 2);  // one 64-byte line per chunk of 32 bfloat16
      for (int m = 0; m < MX; ++m) acc[r][m] = dot_bf16(acc[r][m], rows[r] + c * kChunk, xb + m * kp + c * kChunk);
    }
  if (full * kChunk < p.K) {
    alignas(64) uint16_t buf[kChunk];
    for (int r = 0; r < R; ++r) {
      const uint16_t *src = tail_chunk<BF16>(rows[r], full, p.K, buf);
      for (int m = 0; m < MX; ++m) acc[r][m] = dot_bf16(acc[r][m], src, xb + m * kp + full * kChunk);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MX; ++m) p.y[m * p.N + n0 + r] = hsum(acc[r][m]);
}

template <int MX>
static int gemv_bf16(const Problem *ps, int nw, int nt) {
  const Problem &p = ps[0];
  constexpr int R = 4;
  const int64_t kp = ceil_div(p.K, kChunk) * kChunk;
  uint16_t *xb = static_cast<uint16_t *>(aligned_buffer(sizeof(uint16_t) * MX * kp));
  if (!xb) return 7;
  memset(xb, 0, sizeof(uint16_t) * MX * kp);
  for (int m = 0; m < MX; ++m)
    for (int64_t k = 0; k < p.K; ++k) xb[m * kp + k] = to_bf16(p.x[m * p.K + k]);
  parallel(nt, [&](int tid, int tcount) {
    for (int i = 0; i < nw; ++i) {
      int64_t b, e;
      thread_range(ps[i].N, R, tid, tcount, &b, &e);
      int64_t n = b;
      for (; n + R <= e; n += R) gemv_bf16_block<R, MX>(ps[i], xb, kp, n);
      for (; n < e; ++n) gemv_bf16_block<1, MX>(ps[i], xb, kp, n);
    }
  });
  free(xb);
  return 0;
}

template <class Fm, int MX>
static int decode(const Problem *ps, int nw, int nt) {
  if constexpr (Fm::quant)
    return gemv_q<Fm, MX>(ps, nw, nt);
  else if constexpr (kBF16Dot && std::is_same<Fm, BF16>::value)
    return gemv_bf16<MX>(ps, nw, nt);
  else
    return gemv<Fm, MX>(ps, nw, nt);
}

// ---- prefill: per thread, tiles of NB rows x KB columns of W dequantised to float32 (row-major, ld KB) and
// multiplied into every row of x. x is repacked per block of MB = 2W rows as xb[k][MB] (zero rows past M), so the
// micro-kernel updates an NR x MB block of y^T with 2 vector loads, NR broadcasts and 2 NR FMAs per k.
constexpr int MB = 2 * W, NR = W == 16 ? 8 : 6, NB = 16 * NR, KB = 512;  // 2 NR accumulators + 3 fit the registers

KI void micro(const float *wt, const float *xb, int64_t klen, float out[NR][MB]) {
  F c[NR][2];
  for (int i = 0; i < NR; ++i) c[i][0] = c[i][1] = fzero();
  for (int64_t k = 0; k < klen; ++k) {
    F x0 = fload(xb + k * MB), x1 = fload(xb + k * MB + W);
    for (int i = 0; i < NR; ++i) {
      F b = fset1(wt[i * KB + k]);
      c[i][0] = ffma(b, x0, c[i][0]);
      c[i][1] = ffma(b, x1, c[i][1]);
    }
  }
  for (int i = 0; i < NR; ++i) {
    fstore(out[i], c[i][0]);
    fstore(out[i] + W, c[i][1]);
  }
}

template <class Fm>
static int gemm(const Problem &p, int nt) {
  using T = typename Fm::T;
  const int64_t mblocks = ceil_div(p.M, MB);
  const int64_t chunks = ceil_div(p.K, kChunk);
  const int64_t full = p.K / kChunk;
  float *xb = static_cast<float *>(aligned_buffer(sizeof(float) * mblocks * p.K * MB));
  if (!xb) return 7;
  std::atomic<int> failed{0};
  for (int64_t mb = 0; mb < mblocks; ++mb)  // one pass over x: nothing next to the product
    for (int64_t k = 0; k < p.K; ++k)
      for (int j = 0; j < MB; ++j) {
        int64_t m = mb * MB + j;
        xb[(mb * p.K + k) * MB + j] = m < p.M ? p.x[m * p.K + k] : 0.0f;
      }
  parallel(nt, [&](int tid, int tcount) {
    float *tile = static_cast<float *>(aligned_buffer(sizeof(float) * NB * KB));
    failed |= tile == nullptr;
    int64_t b, e;
    thread_range(p.N, NR, tid, tcount, &b, &e);
    alignas(64) float out[NR][MB];
    alignas(64) T buf[Fm::units];
    for (int64_t n0 = b; n0 < e && tile; n0 += NB) {
      const int64_t nrows = std::min<int64_t>(NB, e - n0);
      for (int64_t k0 = 0; k0 < p.K; k0 += KB) {
        const int64_t klen = std::min<int64_t>(KB, p.K - k0);
        for (int64_t r = 0; r < NB; ++r) {
          float *dst = tile + r * KB;
          if (r >= nrows) {
            memset(dst, 0, sizeof(float) * KB);
            continue;
          }
          const T *row = static_cast<const T *>(p.w) + (n0 + r) * p.row_units;
          for (int64_t c = k0 / kChunk; c < std::min(chunks, (k0 + KB) / kChunk); ++c) {
            const T *src = c < full ? row + c * Fm::units : tail_chunk<Fm>(row, full, p.K, buf);
            F w[kChunk / W];
            Fm::raw(src, w);
            for (int v = 0; v < kChunk / W; ++v) fstore(dst + (c * kChunk - k0) + v * W, w[v]);
          }
        }
        for (int64_t mb = 0; mb < mblocks; ++mb) {
          const int64_t mlen = std::min<int64_t>(MB, p.M - mb * MB);
          const float *xk = xb + (mb * p.K + k0) * MB;
          for (int64_t i0 = 0; i0 < nrows; i0 += NR) {
            micro(tile + i0 * KB, xk, klen, out);
            const int64_t ilen = std::min<int64_t>(NR, nrows - i0);
            for (int64_t j = 0; j < mlen; ++j) {
              float *yr = p.y + (mb * MB + j) * p.N + n0 + i0;
              if (k0 == 0)
                for (int64_t i = 0; i < ilen; ++i) yr[i] = out[i][j];
              else
                for (int64_t i = 0; i < ilen; ++i) yr[i] += out[i][j];
            }
          }
        }
      }
    }
    free(tile);
  });
  free(xb);
  return failed ? 7 : 0;
}

// ---- prefill, bfloat16 where the CPU has a bfloat16 dot (kBF16Dot): x rounded to bfloat16 as for decode and
// repacked per block of MB rows as xb[k pair][MB][2], so that a vector holds W rows' pairs (x[k], x[k + 1]). The
// micro-kernel broadcasts a weight row's pair (w[k], w[k + 1]) and one vdpbf16ps adds both products per lane: the
// float32 tile's NR x MB block of y^T per two k for the same instruction count. W is already bfloat16, so it is
// read in place, NB rows x KBB columns at a time (a block that stays in L2 while every x block passes over it).
KI void micro_bf16(const uint16_t *const wr[NR], int64_t pairs, bool odd, const uint16_t *xb, float *yt, int64_t ld,
                    bool first) {
  F c[NR][2];
  for (int i = 0; i < NR; ++i)
    for (int v = 0; v < 2; ++v) c[i][v] = first ? fzero() : fload(yt + i * ld + v * W);
  auto step = [&](const uint16_t *xk, const uint32_t w2[NR]) __attribute__((always_inline)) {
    const F x0 = fload(reinterpret_cast<const float *>(xk)), x1 = fload(reinterpret_cast<const float *>(xk) + W);
    for (int i = 0; i < NR; ++i) {
      c[i][0] = dot_bf16_bcast(c[i][0], x0, w2[i]);
      c[i][1] = dot_bf16_bcast(c[i][1], x1, w2[i]);
    }
  };
  uint32_t w2[NR];
  for (int64_t q = 0; q < pairs; ++q) {
    for (int i = 0; i < NR; ++i) memcpy(&w2[i], wr[i] + 2 * q, 4);
    step(xb + q * 2 * MB, w2);
  }
  if (odd) {  // K odd: the last element alone (x's pair partner is 0; w's would be the next row's first)
    for (int i = 0; i < NR; ++i) w2[i] = wr[i][2 * pairs];
    step(xb + pairs * 2 * MB, w2);
  }
  for (int i = 0; i < NR; ++i)
    for (int v = 0; v < 2; ++v) fstore(yt + i * ld + v * W, c[i][v]);
}

constexpr int KBB = 1024;  // bfloat16's block of W columns (its rows' results stay in y^T between blocks)

// All nw weights of a call (same x, ps[i].x equal): x converted and repacked once, on every thread (columns split
// between them), then each weight's rows split between the threads in one parallel region. Per thread, y^T of a
// block of NB rows ([NB][Mp]) holds the micro-kernel's sums from one block of KBB columns to the next and goes
// into y once (2-core EPYC, Zen 4, 64 x 4096 x 11008: ~365 -> ~405 GFLOPS against adding each block's sums to y).
static int gemm_bf16(const Problem *ps, int nw, int nt) {
  const Problem &p = ps[0];
  const int64_t mblocks = ceil_div(p.M, MB), kpairs = ceil_div(p.K, 2), ld = mblocks * MB;
  const int64_t xblock = kpairs * 2 * MB;  // bfloat16 per block of MB x rows
  uint16_t *xb = static_cast<uint16_t *>(aligned_buffer(sizeof(uint16_t) * mblocks * xblock));
  if (!xb) return 7;
  memset(xb, 0, sizeof(uint16_t) * mblocks * xblock);
  std::atomic<int> failed{0};
  parallel(nt, [&](int tid, int tcount) {
    int64_t qb, qe;  // pairs of columns: a cache line of xb holds one pair's rows, so no line is shared
    thread_range(kpairs, 1, tid, tcount, &qb, &qe);
    for (int64_t m = 0; m < p.M; ++m) {
      uint16_t *dst = xb + (m / MB) * xblock + (m % MB) * 2;
      const float *src = p.x + m * p.K;
      int64_t q = qb;
      alignas(64) uint32_t words[W];
      for (; q + W <= qe && 2 * (q + W) <= p.K; q += W) {
        pairs_bf16(src + 2 * q, words);
        for (int i = 0; i < W; ++i) memcpy(dst + (q + i) * 2 * MB, &words[i], 4);
      }
      for (int64_t k = 2 * q; k < std::min(2 * qe, p.K); ++k) dst[(k / 2) * 2 * MB + k % 2] = to_bf16(src[k]);
    }
  });
  parallel(nt, [&](int tid, int tcount) {
    float *yt = static_cast<float *>(aligned_buffer(sizeof(float) * NB * ld));
    if (!yt) failed = 1;
    for (int wi = 0; wi < nw && !failed; ++wi) {
      const Problem &pw = ps[wi];
      const uint16_t *w = static_cast<const uint16_t *>(pw.w);
      int64_t b, e;
      thread_range(pw.N, NR, tid, tcount, &b, &e);
      for (int64_t n0 = b; n0 < e; n0 += NB) {
        const int64_t nrows = std::min<int64_t>(NB, e - n0);
        for (int64_t k0 = 0; k0 < p.K; k0 += KBB) {  // KBB even: only the last block can end on an odd K
          const int64_t klen = std::min<int64_t>(KBB, p.K - k0);
          for (int64_t mb = 0; mb < mblocks; ++mb) {
            const uint16_t *xk = xb + mb * xblock + (k0 / 2) * 2 * MB;
            for (int64_t i0 = 0; i0 < nrows; i0 += NR) {
              const int64_t ilen = std::min<int64_t>(NR, nrows - i0);
              const uint16_t *wr[NR];
              for (int i = 0; i < NR; ++i) wr[i] = w + (n0 + i0 + std::min<int64_t>(i, ilen - 1)) * p.K + k0;
              micro_bf16(wr, klen / 2, klen % 2, xk, yt + i0 * ld + mb * MB, ld, k0 == 0);
            }
          }
        }
        for (int64_t m = 0; m < p.M; ++m)
          for (int64_t i = 0; i < nrows; ++i) pw.y[m * pw.N + n0 + i] = yt[i * ld + m];
      }
    }
    free(yt);
  });
  free(xb);
  return failed ? 7 : 0;
}

// ---- prefill, int8 / int4: integer dot products as in decode, at matrix-matrix reuse. x is quantised once per
// call (as decode: int8 per chunk, element order, rows padded to a multiple of MR with zeros). Per thread, blocks
// of RB = W rows of W are repacked into a tile of bytes [chunk][step][row][4], a step being 4 consecutive elements
// of the chunk (int4: its nibbles, unpacked to bytes 0..15), with each row's chunk scales beside [chunk][row]. The
// micro-kernel broadcasts 4 bytes of an x row against a step: the RB lanes of the dot are the RB rows, so nothing
// is summed across lanes, and each chunk ends as one int32 vector per x row, scaled by the rows' weight scales x
// the x row's chunk scale into float32. The tile holds unsigned bytes where it can: int4's stored q + 8, and
// int8's q + 128 on the VNNI paths (their dot is one instruction and does not saturate), so that a step is one dot
// instruction per x row; the offset's share, -offset x sum(x_q) per chunk, is where the sums start. int8 without
// VNNI keeps |w| against x carrying w's sign (maddubs would saturate on q + 128); int4 without VNNI sums a chunk's
// 8 pair-sum vectors in int16 (|(q + 8) x| <= 15 * 127 a product: 8 of the pair sums stay below 2^15) and widens
// once. Measured at 64 x 11008 x 4096 and 64 x 4096 x 11008 on a 2-core EPYC, Zen 4, whose two cores issue
// ~900 GOPS of 512-bit vpdpbusd: int4 ~570, int8 ~490-560 GOPS (not measured apart: each chunk ends in 3 float
// operations per 8 dots on the same units); two vectors of rows a tile (8 dot chains) measured the same as one.
constexpr int RB = W, MR = 4, KC = 16 * 1024 / (kChunk * RB);  // chunks per pass: a 16 KB tile slice, half of L1
constexpr int kSteps = kChunk / 4;
template <class Fm>
constexpr int tile_offset() {
  return Fm::offset != 0 ? static_cast<int>(Fm::offset) : (kDotAcc ? 128 : 0);
}

// An empty asm that claims to change v: the integer sums stay one chain per accumulator. Without it GCC
// re-associated a chunk's 8 steps x MR dots into a tree and spilled its 32 partial results to the stack (int8
// prefill at a fifth of its speed, measured on an AMD EPYC). "v": any vector register; "x" allowed only the
// first 16 of AVX-512's 32, and GCC copied the sums in and out of them.
template <class V>
KI V opaque(V v) {
  asm("" : "+v"(v));
  return v;
}
#define UNROLL _Pragma("GCC unroll 16")

// y_acc[m][0:RB] += the tile's chunks [c0, c1) against x rows m0..m0+MR-1 (xoff: each chunk's -offset x sum of
// x_q, where the integer sums start).
template <class Fm>
KI void micro_q(const uint8_t *tile, const float *tsc, const int8_t *xq, const float *sx, const int32_t *xoff,
                int64_t kp, int64_t chunks, int64_t c0, int64_t c1, int64_t m0, float *yacc) {
  constexpr int OFF = tile_offset<Fm>();
  F acc[MR];
  UNROLL for (int m = 0; m < MR; ++m) acc[m] = fload(yacc + (m0 + m) * RB);
  for (int64_t c = c0; c < c1; ++c) {
    const uint8_t *tc = tile + c * kChunk * RB;
    const int8_t *xc = xq + m0 * kp + c * kChunk;
    const int32_t *off = xoff + m0 * chunks + c;
    I d[MR];
    if constexpr (OFF != 0 && !kDotAcc) {  // int4, pair sums in int16
      I h[MR];
      UNROLL for (int m = 0; m < MR; ++m) h[m] = izero();
      UNROLL for (int st = 0; st < kSteps; ++st) {
        const I w = iload(tc + st * 4 * RB);
        UNROLL for (int m = 0; m < MR; ++m) h[m] = opaque(iadd16(h[m], pairs_us(w, bcast4(xc + m * kp + 4 * st))));
      }
      UNROLL for (int m = 0; m < MR; ++m) d[m] = iadd32(widen16(h[m]), iset1(off[m * chunks]));
    } else if constexpr (OFF != 0) {  // unsigned stored bytes: one dot instruction a step and x row
      UNROLL for (int m = 0; m < MR; ++m) d[m] = iset1(off[m * chunks]);
      UNROLL for (int st = 0; st < kSteps; ++st) {
        const I w = iload(tc + st * 4 * RB);
        UNROLL for (int m = 0; m < MR; ++m) d[m] = opaque(dot_acc(d[m], w, bcast4(xc + m * kp + 4 * st)));
      }
    } else {  // int8 without VNNI: |w| against x carrying w's sign, as decode
      UNROLL for (int m = 0; m < MR; ++m) d[m] = izero();
      UNROLL for (int st = 0; st < kSteps; ++st) {
        const I w = iload(tc + st * 4 * RB), a = iabs8(w);
        UNROLL for (int m = 0; m < MR; ++m) d[m] = opaque(dot_acc(d[m], a, sign8(bcast4(xc + m * kp + 4 * st), w)));
      }
    }
    const F sw = fload(tsc + c * RB);
    UNROLL for (int m = 0; m < MR; ++m) acc[m] = ffma(icvt(d[m]), fmul(sw, fset1(sx[(m0 + m) * chunks + c])), acc[m]);
  }
  UNROLL for (int m = 0; m < MR; ++m) fstore(yacc + (m0 + m) * RB, acc[m]);
}

// out[j] lane l = the 4 bytes at row[l] + off + 4 j, j < 4: 16 bytes of each of W rows turned on their side, a
// 4 x 4 transpose of 32-bit words inside each 128-bit lane, whose input lanes are the rows q, 4 + q, ... (hardware
// gathers did the same in a fifth of int4 prefill's time on a Zen 4 EPYC; this, in a few percent).
KI void rows_sideways(const uint8_t *const row[W], int64_t off, I out[4]) {
  I x[4];
  for (int q = 0; q < 4; ++q) x[q] = lanes_of_rows(row, q, off);
  const I t0 = unpack_lo32(x[0], x[1]), t1 = unpack_hi32(x[0], x[1]);
  const I t2 = unpack_lo32(x[2], x[3]), t3 = unpack_hi32(x[2], x[3]);
  out[0] = unpack_lo64(t0, t2);
  out[1] = unpack_hi64(t0, t2);
  out[2] = unpack_lo64(t1, t3);
  out[3] = unpack_hi64(t1, t3);
}

// Rows n0..n0+RB-1 of W (those past N repeat row N-1: computed, never stored) into the tile and its scales.
template <class Fm>
static void repack_q(const Problem &p, int64_t n0, int64_t chunks, uint8_t *tile, float *tsc) {
  const uint8_t flip = tile_offset<Fm>() == 128 ? 0x80 : 0;  // int8 q + 128 as an unsigned byte: top bit flipped
  const uint8_t *base = static_cast<const uint8_t *>(p.w) + n0 * p.row_units;
  int64_t row[RB];
  const uint8_t *rowp[RB];
  for (int r = 0; r < RB; ++r) {
    row[r] = std::min<int64_t>(r, p.N - 1 - n0);
    rowp[r] = base + row[r] * p.row_units;
  }
  const I flips = iset1(flip * 0x01010101);
  // int8 rows are K bytes: a last, partial chunk is filled byte by byte (zeros past K)
  const int64_t full = Fm::offset != 0 ? chunks : p.K / kChunk;
  for (int64_t c = 0; c < full; ++c) {
    uint8_t *tc = tile + c * kChunk * RB;
    I q[4];
    if constexpr (Fm::offset != 0) {  // int4 block: byte j holds elements j (low nibble) and 16 + j (high)
      rows_sideways(rowp, c * 16, q);
      for (int j = 0; j < 4; ++j) {
        istore(tc + j * 4 * RB, lo_nibbles(q[j]));
        istore(tc + (4 + j) * 4 * RB, hi_nibbles(q[j]));
      }
    } else {
      for (int half = 0; half < 2; ++half) {
        rows_sideways(rowp, c * kChunk + 16 * half, q);
        for (int j = 0; j < 4; ++j) istore(tc + (4 * half + j) * 4 * RB, ixor(q[j], flips));
      }
    }
  }
  for (int64_t c = full; c < chunks; ++c)
    for (int r = 0; r < RB; ++r)
      for (int e = 0; e < kChunk; ++e) {
        const int64_t k = c * kChunk + e;
        tile[c * kChunk * RB + (e / 4) * 4 * RB + r * 4 + e % 4] = (k < p.K ? base[row[r] * p.row_units + k] : 0) ^ flip;
      }
  for (int64_t c = 0; c < chunks; ++c)
    for (int r = 0; r < RB; ++r) tsc[c * RB + r] = _cvtsh_ss(p.s[(n0 + row[r]) * p.G + c * kChunk / p.group]);
}

// Fetches `bytes` from p into L2 in `steps` equal slices, one slice a step() (past the end: nothing). Prefill's
// repack reads a tile's RB rows 16 bytes a row at a time, more streams than the hardware prefetcher follows; the
// next tile's rows, fetched over the current tile's micro-kernel calls, measured 2-5% faster at int4 (Zen 4 EPYC).
struct SpreadPrefetch {
  const char *p, *end;
  int64_t slice;
  SpreadPrefetch(const char *p, int64_t bytes, int64_t steps)
      : p(p), end(p + std::max<int64_t>(bytes, 0)), slice(ceil_div(std::max<int64_t>(bytes, 0), steps * 64) * 64) {}
  void step() {
    const char *stop = std::min(end, p + slice);
    for (; p < stop; p += 64) _mm_prefetch(p, _MM_HINT_T1);
  }
};

template <class Fm>
static int gemm_q(const Problem *ps, int nw, int nt) {
  const Problem &p = ps[0];
  const int64_t chunks = ceil_div(p.K, kChunk), kp = chunks * kChunk, Mp = ceil_div(p.M, MR) * MR;
  int8_t *xq = static_cast<int8_t *>(aligned_buffer(Mp * kp));
  float *sx = static_cast<float *>(aligned_buffer(sizeof(float) * Mp * chunks));
  int32_t *xoff = static_cast<int32_t *>(aligned_buffer(sizeof(int32_t) * Mp * chunks));
  std::atomic<int> failed{!xq || !sx || !xoff};
  if (!failed) {
    memset(xq, 0, Mp * kp);
    memset(sx, 0, sizeof(float) * Mp * chunks);
    memset(xoff, 0, sizeof(int32_t) * Mp * chunks);
    for (int64_t m = 0; m < p.M; ++m)
      for (int64_t c = 0; c < chunks; ++c) {
        int8_t *dst = xq + m * kp + c * kChunk;
        int sum;
        sx[m * chunks + c] = quantise_chunk(p.x + m * p.K + c * kChunk, std::min<int64_t>(kChunk, p.K - c * kChunk),
                                            dst, dst + 16, &sum);
        xoff[m * chunks + c] = -tile_offset<Fm>() * sum;
      }
    parallel(nt, [&](int tid, int tcount) {
      uint8_t *tile = static_cast<uint8_t *>(aligned_buffer(kp * RB));
      float *tsc = static_cast<float *>(aligned_buffer(sizeof(float) * chunks * RB));
      float *yacc = static_cast<float *>(aligned_buffer(sizeof(float) * Mp * RB));
      if (!tile || !tsc || !yacc) failed = 1;
      for (int i = 0; i < nw && !failed; ++i) {
        const Problem &pi = ps[i];
        int64_t b, e;
        thread_range(pi.N, RB, tid, tcount, &b, &e);
        for (int64_t n0 = b; n0 < e; n0 += RB) {
          repack_q<Fm>(pi, n0, chunks, tile, tsc);
          memset(yacc, 0, sizeof(float) * Mp * RB);
          const int64_t next = std::min<int64_t>(RB, e - n0 - RB);  // the next tile's rows (contiguous in W)
          SpreadPrefetch ahead(static_cast<const char *>(pi.w) + (n0 + RB) * pi.row_units, next * pi.row_units,
                               ceil_div(chunks, KC) * (Mp / MR));
          for (int64_t c0 = 0; c0 < chunks; c0 += KC)
            for (int64_t m0 = 0; m0 < Mp; m0 += MR) {
              ahead.step();
              micro_q<Fm>(tile, tsc, xq, sx, xoff, kp, chunks, c0, std::min(chunks, c0 + KC), m0, yacc);
            }
          const int64_t rows = std::min<int64_t>(RB, e - n0);
          for (int64_t m = 0; m < pi.M; ++m) memcpy(pi.y + m * pi.N + n0, yacc + m * RB, sizeof(float) * rows);
        }
      }
      free(tile);
      free(tsc);
      free(yacc);
    });
  }
  free(xq);
  free(sx);
  free(xoff);
  return failed ? 7 : 0;
}

// ---- prefill's compute roofline: multiply-adds per second, on this thread, of the instructions a format's prefill
// micro-kernel is built on (int8 / int4: the byte dot, dot_acc, or int4's int16 pair sums where the path has no
// VNNI; bfloat16: vdpbf16ps where the path has it, else the float32 tile's FMA; float32: FMA), in 12 independent
// chains held in registers. A first version kept its sums in an array that GCC left in memory: it measured half
// the rate (a "peak" of 1.7 G vpdpbusd a second per core on a Zen 4 EPYC that issues 3.6 G).
template <class V, class Op>
static double chain_rate(V zero, Op op, int64_t macs_per_op, double seconds) {
  constexpr int kChains = 12, kRound = 1024;
  V acc[kChains];
  UNROLL for (int i = 0; i < kChains; ++i) acc[i] = zero;
  const auto t0 = std::chrono::steady_clock::now();
  int64_t rounds = 0;
  double elapsed;
  do {
    for (int r = 0; r < kRound; ++r) UNROLL for (int i = 0; i < kChains; ++i) acc[i] = opaque(op(acc[i]));
    rounds += kRound;
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  } while (elapsed < seconds);
  UNROLL for (int i = 0; i < kChains; ++i) asm volatile("" : : "v"(acc[i]));  // every chain's result is used
  return static_cast<double>(rounds) * kChains * macs_per_op / elapsed;
}

static double peak_macs(Fmt fmt, double seconds) {
  const I a = iset1(0x01020304);  // integer chains: their own sums as the signed operand, nothing to hoist
  if (fmt == kI4 && !kDotAcc)  // int4 without VNNI: int16 pair sums, widened once a chunk
    return chain_rate(izero(), [&](I acc) __attribute__((always_inline)) { return iadd16(acc, pairs_us(a, acc)); },
                      4 * W, seconds);
  if (fmt == kI8 || fmt == kI4)
    return chain_rate(izero(), [&](I acc) __attribute__((always_inline)) { return dot_acc(acc, a, acc); }, 4 * W,
                      seconds);
  const F x = fset1(1e-3f);
  if (fmt == kBF16 && kBF16Dot)
    return chain_rate(
        fzero(), [&](F acc) __attribute__((always_inline)) { return dot_bf16_bcast(acc, x, 0x3A833A83u); }, 2 * W,
        seconds);
  return chain_rate(fzero(), [&](F acc) __attribute__((always_inline)) { return ffma(x, x, acc); }, W, seconds);
}

// ---- e^x, vectorised (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial for e^r; relative
// error ~1e-7 against libm's), for the cached-stack op's SiLU: a scalar expf per element cost ~10 ms a 7B layer at
// a 64-token prefill. x is clamped to [-87, 88], where e^x stays a normal float.
KI F fexp(F x) {
  x = fclamp(x, -87.0f, 88.0f);
  const F n = fround(fmul(x, fset1(1.44269504f)));
  F r = ffma(n, fset1(-0.693359375f), x);
  r = ffma(n, fset1(2.12194440e-4f), r);
  F p = fset1(1.9875691500e-4f);
  p = ffma(p, r, fset1(1.3981999507e-3f));
  p = ffma(p, r, fset1(8.3334519073e-3f));
  p = ffma(p, r, fset1(4.1665795894e-2f));
  p = ffma(p, r, fset1(1.6666665459e-1f));
  p = ffma(p, r, fset1(5.0000001201e-1f));
  p = ffma(p, fmul(r, r), fadd(r, fset1(1.0f)));
  return fmul(p, fpow2i(n));
}

// g[i] = silu(g[i]) * u[i] = g u / (1 + e^-g), i in [0, n)
static void silu_mul(float *g, const float *u, int64_t n) {
  const int64_t nv = n / W * W;
  const F one = fset1(1.0f), minus = fset1(-1.0f);
  for (int64_t i = 0; i < nv; i += W) {
    const F x = fload(g + i);
    fstore(g + i, fdiv(fmul(x, fload(u + i)), fadd(one, fexp(fmul(x, minus)))));
  }
  for (int64_t i = nv; i < n; ++i) g[i] = g[i] * u[i] / (1.0f + std::exp(-g[i]));
}

// ---- attention of one query over the visible keys of one head's cache (the cached-stack op's inner loop):
// out = softmax(q k_l / sqrt(D) + slope (pos_l - pos_q)) v_l over l in [0, last] with vis(l); p: scratch [last + 1].
static void attend_query(const float *q, const float *kc, const float *vc, int64_t D, int64_t last,
                         const uint8_t *real, const int64_t *pos, float slope, float scale, float *p, float *out) {
  const int64_t dv = D / W * W;
  const int64_t qp = pos[last];
  float top = -INFINITY;
  for (int64_t l = 0; l <= last; ++l) {
    if (!real[l] && l != last) continue;  // padding, or an empty slot; a query always sees itself
    const float *kl = kc + l * D;
    F acc = fzero();
    for (int64_t d = 0; d < dv; d += W) acc = ffma(fload(q + d), fload(kl + d), acc);
    float t = hsum(acc);
    for (int64_t d = dv; d < D; ++d) t += q[d] * kl[d];
    p[l] = t * scale + slope * static_cast<float>(pos[l] - qp);
    top = std::max(top, p[l]);
  }
  float sum = 0.f;
  for (int64_t l = 0; l <= last; ++l) sum += (!real[l] && l != last) ? (p[l] = 0.f) : (p[l] = std::exp(p[l] - top));
  const float inv = 1.f / sum;
  for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
  for (int64_t l = 0; l <= last; ++l) {
    if (p[l] == 0.f) continue;
    const float w = p[l] * inv;
    const float *vl = vc + l * D;
    const F wv = fset1(w);
    for (int64_t d = 0; d < dv; d += W) fstore(out + d, ffma(wv, fload(vl + d), fload(out + d)));
    for (int64_t d = dv; d < D; ++d) out[d] += w * vl[d];
  }
}

template <class Fm>
static int run_fmt(const Problem *ps, int nw, int nt) {
  switch (ps[0].M) {
    case 1: return decode<Fm, 1>(ps, nw, nt);
    case 2: return decode<Fm, 2>(ps, nw, nt);
    case 3: return decode<Fm, 3>(ps, nw, nt);
    case 4: return decode<Fm, 4>(ps, nw, nt);
  }
  if constexpr (Fm::quant) {
    return gemm_q<Fm>(ps, nw, nt);
  } else if constexpr (kBF16Dot && std::is_same<Fm, BF16>::value) {
    return gemm_bf16(ps, nw, nt);
  } else {
    for (int i = 0; i < nw; ++i)
      if (ps[i].N > 0) {
        const int err = gemm<Fm>(ps[i], nt);
        if (err) return err;
      }
    return 0;
  }
}

static int run(Fmt fmt, const Problem *ps, int nw, int nt) {
  switch (fmt) {
    case kF32: return run_fmt<F32>(ps, nw, nt);
    case kBF16: return run_fmt<BF16>(ps, nw, nt);
    case kI8: return run_fmt<I8>(ps, nw, nt);
    case kI4: return run_fmt<I4>(ps, nw, nt);
  }
  return 8;
}

#endif  // BAICHUAN_KERNEL_BODY
