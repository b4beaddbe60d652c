// How one library serves every x86-64 machine. Each instruction-set path has a shim header, isa_<path>.h (paths:
// tables.h's BAICHUAN_ISA_PATHS), that defines inside namespace isa_<path>, under `#pragma GCC target` for its
// instructions, the vector primitives: float vectors F of W lanes (loads, FMA, sums, conversions), byte vectors I
// (integer dot products of unsigned x signed bytes, nibbles, interleaves) and the flags kDotAcc / kBF16Dot saying
// which dots are one instruction. It then includes BAICHUAN_ISA_BODY, the per-path code of the library being built
// (model_isa.inc for the model library, probes_isa.inc for the benchmark probes), which is written once in those
// primitives and so compiled once per path. isa_select.h picks the path to run from cpuid at run time.
#pragma once
#include "common.h"

#ifndef BAICHUAN_ISA_BODY
#error "define BAICHUAN_ISA_BODY (the per-path source each ISA namespace compiles) before including a shim"
#endif
