// Instruction-set shim, AVX2 + AVX-VNNI: as AVX2, the byte dot in one instruction.
// See isa_common.h for how the paths are compiled.
#pragma once
#include "isa_avx2.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
namespace isa_avxvnni {
using namespace isa_avx2;  // every primitive but the dot (names defined here hide those)
#define KI static inline __attribute__((always_inline))
KI I dot_us(I a, I b) { return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b); }
KI I dot_us2(I a, I b, I c, I d) { return _mm256_dpbusd_avx_epi32(dot_us(a, b), c, d); }
constexpr bool kDotAcc = true;
KI I dot_acc(I acc, I a, I b) { return _mm256_dpbusd_avx_epi32(acc, a, b); }
#include BAICHUAN_ISA_BODY
#undef KI
}  // namespace isa_avxvnni
#pragma GCC pop_options
