// Instruction-set shim, AVX2 + FMA + F16C, 8 floats per vector: the primitives every per-path body is written
// in (the other paths redefine those they do faster).
// See isa_common.h for how the paths are compiled.
#pragma once
#include "isa_common.h"

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
KI F ld_i8(const int8_t *p) {  // W int8 to float32
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(p))));
}
// 2W bfloat16 as two float vectors: lane i of *even = p[2i], of *odd = p[2i + 1] (one load, no widening shuffle)
KI void ld_bf16_pairs(const uint16_t *p, F *even, F *odd) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p));
  *even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  *odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
// The sums of 8 vectors a[0..7] to out[0..7]: one reduction for 8 keys' dot products (paged attention)
KI void hsum8(const F *a, float *out) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));  // [0-3 lo | 0-3 hi]
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));  // [4-7 lo | 4-7 hi]
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
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
// adjacent int16 / int32 pairs of a and b summed, per 128-bit lane [a's | b's]: small-batch decode packs two steps'
// dots into one vector with them, so that one conversion, permute and FMA serve both (gemv_qm_block)
constexpr bool kHadd = true;
KI I hadd16(I a, I b) { return _mm256_hadd_epi16(a, b); }
KI I hadd32(I a, I b) { return _mm256_hadd_epi32(a, b); }
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
#include BAICHUAN_ISA_BODY
#undef KI
}  // namespace isa_avx2
#pragma GCC pop_options
