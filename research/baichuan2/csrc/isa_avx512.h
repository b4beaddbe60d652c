// Instruction-set shim, AVX-512 (F, BW, VL, DQ): 16 floats per vector.
// See isa_common.h for how the paths are compiled.
#pragma once
#include "isa_common.h"

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
KI F ld_i8(const int8_t *p) {  // W int8 to float32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))));
}
KI void ld_bf16_pairs(const uint16_t *p, F *even, F *odd) {  // as AVX2's
  const __m512i v = _mm512_loadu_si512(p);
  *even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  *odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
KI __m256 half_sum(F v) { return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)); }
KI void hsum8(const F *a, float *out) {  // as AVX2's, each vector folded to 8 lanes first
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(half_sum(a[0]), half_sum(a[1])),
                                   _mm256_hadd_ps(half_sum(a[2]), half_sum(a[3])));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(half_sum(a[4]), half_sum(a[5])),
                                   _mm256_hadd_ps(half_sum(a[6]), half_sum(a[7])));
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
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
constexpr bool kHadd = false;  // no 512-bit phadd: small-batch decode takes its steps one at a time
KI I hadd16(I a, I) { return a; }
KI I hadd32(I a, I) { return a; }
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
#include BAICHUAN_ISA_BODY
#undef KI
}  // namespace isa_avx512
#pragma GCC pop_options
