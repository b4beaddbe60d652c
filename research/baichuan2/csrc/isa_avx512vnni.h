// Instruction-set shim, AVX-512 + VNNI + BF16: as AVX-512, the byte and bfloat16 dot products in one
// instruction.
// See isa_common.h for how the paths are compiled.
#pragma once
#include "isa_avx512.h"

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
#include BAICHUAN_ISA_BODY
#undef KI
}  // namespace isa_avx512vnni
#pragma GCC pop_options
