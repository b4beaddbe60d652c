// The run-time choice of instruction-set path: the best this CPU has (cpuid), or the one BAICHUAN_KERNEL_ISA names.
#pragma once
// the paths, least to most
#include "isa_avx2.h"
#include "isa_avxvnni.h"
#include "isa_avx512.h"
#include "isa_avx512vnni.h"

namespace {

#define BAICHUAN_ISA_ENUM(e, name) e,
enum Isa { kNone = 0, BAICHUAN_ISA_PATHS(BAICHUAN_ISA_ENUM) kIsaEnd };
#undef BAICHUAN_ISA_ENUM
#define BAICHUAN_ISA_NAME(e, name) #name,
const char *const kIsaNames[] = {"none", BAICHUAN_ISA_PATHS(BAICHUAN_ISA_NAME)};
#undef BAICHUAN_ISA_NAME
static_assert(kIsaEnd == 5, "a path added to tables.h needs its shim, its cpuid test and a case in ON_CHOSEN_ISA");

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
  for (int i = kIsaEnd - 1; i > kNone; --i)
    if (cpu_has(static_cast<Isa>(i))) return static_cast<Isa>(i);
  return kNone;
}

// Read on every call (a getenv is nothing next to a projection) so a test can switch paths inside one process.
// A forced path the CPU lacks falls back to the best one it has; KernelIsa() reports what actually runs.
Isa chosen_isa() {
  static const Isa best = best_isa();
  const char *force = getenv("BAICHUAN_KERNEL_ISA");
  if (force)
    for (int i = kNone + 1; i < kIsaEnd; ++i)
      if (strcmp(force, kIsaNames[i]) == 0 && cpu_has(static_cast<Isa>(i))) return static_cast<Isa>(i);
  return best;
}

const char *isa_name(Isa isa) { return kIsaNames[isa]; }

// The path named `name`, or kNone.
Isa isa_named(const char *name) {
  for (int i = kNone + 1; i < kIsaEnd; ++i)
    if (strcmp(name, kIsaNames[i]) == 0) return static_cast<Isa>(i);
  return kNone;
}

}  // namespace

// `return <path>::call` on the chosen path; `none` where the CPU has none (no AVX2).
#define ON_CHOSEN_ISA(call, none)                   \
  switch (chosen_isa()) {                           \
    case kAvx512Vnni: return isa_avx512vnni::call;  \
    case kAvx512: return isa_avx512::call;          \
    case kAvxVnni: return isa_avxvnni::call;        \
    case kAvx2: return isa_avx2::call;              \
    default: none;                                  \
  }
