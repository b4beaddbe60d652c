// The model library: custom CPU ops for mindspore.ops.Custom(func_type="aot") on x86-64, built by kernels.py from
// this file (one translation unit; the headers and .inc files beside it are its parts).
//
// Projections y = x W^T (linear.h): x float32 [M, K], y float32 [M, N]; W one of (layouts in
// docs/WEIGHT_FORMATS.md; the formats, paths and group sizes are listed once, in tables.h):
//   float32 [N, K] | bfloat16 [N, K] | int8 [N, K] + float16 scales [N, ceil(K/group)]
//   | int4 uint8 [N, ceil(K/32)*16] (q4_0-style blocks of 32, stored q + 8) + float16 scales [N, ceil(K/group)]
// M <= 4, int8 / int4 M <= 6 (decode.inc): matrix-vector, R rows of W at a time against all M rows of x, so each weight
//   byte is read once and the loop streams W at memory speed. int8 / int4: x is quantised once per call to int8 per
//   32-element chunk (scale absmax / 127, so |x - x_q| <= scale / 2) and each chunk is an integer dot product (VNNI
//   vpdpbusd, else maddubs + madd: unsigned x signed bytes, so int8 weights go in as |w| against x_q with w's sign,
//   int4 as their stored q + 8 with 8 s sum(x_q) taken off at the end), scaled by weight scale x activation scale in
//   float32. bfloat16 with AVX512-BF16: x rounded to bfloat16 once per call and vdpbf16ps (|x - x_bf16| <= 2^-8 |x|).
// Larger M (prefill.inc): float32 / bfloat16: a tile of W converted to float32 once and reused by every row of x (x
//   repacked so that an 8 (6 on AVX2) x 2-vector register block of y is updated per k); int8 / int4: x quantised
//   as for decode and integer dots against tiles of W rows interleaved 4 bytes at a time (see gemm_q).
// Besides the projections: CachedStack (stack.h), a whole cached step (prefill or decode) through every decoder
// layer in one op with the caches written in place, its paged sibling PagedStackLogits (paged_stack.h: a serving
// batch over a block pool; both run stack_layers.h's layer body), and the per-op path's layout / attention / norm
// ops (layer_ops.h). RMSNorm and RoPE (norm_rope.h) and attention (attention.inc) are each defined once for both.
// Accumulation is float32 throughout. The per-path code (model_isa.inc) is compiled once per instruction-set path
// (avx2: AVX2+FMA+F16C; avxvnni: + AVX-VNNI; avx512: F/BW/VL/DQ; avx512vnni: + AVX512-VNNI + AVX512-BF16; see
// isa_common.h) and the best path is picked at run time from cpuid; BAICHUAN_KERNEL_ISA=<path> forces one the CPU
// has (for tests). Threads: thread_pool.h. The benchmark probes (memory bandwidth, compute peaks) are another
// library, probes.cc.
#include "common.h"
#include "thread_pool.h"
#include "attention.h"

#define BAICHUAN_ISA_BODY "model_isa.inc"
#include "isa_select.h"

#include "model_paths.h"
#include "linear.h"
#include "layer_ops.h"
#include "stack.h"
#include "paged_stack.h"

extern "C" {
const char *KernelIsa() { return isa_name(chosen_isa()); }
// Whether this CPU can run the path `name` (tables.h's BAICHUAN_ISA_PATHS).
int KernelHasIsa(const char *name) {
  const Isa isa = isa_named(name);
  return isa != kNone && cpu_has(isa);
}
int KernelThreads() { return kernel_threads(); }
}  // extern "C"
