// The projection entry points: y = x W^T for each weight format and group size, 1 to 3 weights sharing x.
#pragma once
#include "aot.h"
#include "model_paths.h"

namespace {

// x float32 [M, K]; nw weights of one format (weight; qweight + scales; int4 asymmetric: qweight + scales + mins),
// each [N_i, ...]; then the nw outputs float32 [M, N_i].
struct LinearArgs {
  Arg x;
  WeightArgs w[3];
  Arg y[3];

  bool bind(const AotCall &call, int nw, Fmt fmt) {
    const int tensors = !quantised(fmt) ? 1 : (fmt == kI4 && call.count == 1 + 4 * nw) ? 3 : 2;
    if (call.count != 1 + tensors * nw + nw) return false;
    x = call[0];
    int at = 1;
    for (int i = 0; i < nw; ++i) at = w[i].bind(call, at, tensors);
    for (int i = 0; i < nw; ++i) y[i] = call[at++];
    return true;
  }
};

Status linear(Fmt fmt, int64_t group, int nw, const AotCall &call) {
  LinearArgs a;
  if (!a.bind(call, nw, fmt)) return kArgCount;
  for (int i = 0; i < call.count; ++i)
    if (call[i].ndim != 2) return kRank;
  if (!a.x.is("float32")) return kDtype;
  Problem ps[3];
  for (int i = 0; i < nw; ++i) {
    Problem &p = ps[i];
    if (Status err = bind_weight(fmt, group, a.w[i], -1, a.x.dim(1), &p)) return err;
    if (!a.y[i].is("float32")) return kDtype;
    p.x = a.x.as<const float>();
    p.y = a.y[i].as<float>();
    p.M = a.x.dim(0);
    if (a.y[i].dim(0) != p.M || a.y[i].dim(1) != p.N) return kShape;
  }
  if (ps[0].M == 0) return kOk;
  if (ps[0].K == 0) {
    for (int i = 0; i < nw; ++i) memset(ps[i].y, 0, sizeof(float) * ps[i].M * ps[i].N);
    return kOk;
  }
  return project(fmt, ps, nw);
}

}  // namespace

extern "C" {
// One symbol per format, group size (tables.h's BAICHUAN_GROUP_SIZES) and number of weights sharing x (1; 2:
// gate/up; 3: q/k/v; suffix x2 / x3): the aot interface passes no attributes.
#define ENTRIES(name, fmt, g)                                            \
  int name(AOT_PARAMS) { return linear(fmt, g, 1, AOT_CALL); }          \
  int name##x2(AOT_PARAMS) { return linear(fmt, g, 2, AOT_CALL); }      \
  int name##x3(AOT_PARAMS) { return linear(fmt, g, 3, AOT_CALL); }
ENTRIES(LinearF32, kF32, 0)
ENTRIES(LinearBF16, kBF16, 0)
#define QUANT_ENTRIES(g)          \
  ENTRIES(LinearInt8G##g, kI8, g) \
  ENTRIES(LinearInt4G##g, kI4, g)
BAICHUAN_GROUP_SIZES(QUANT_ENTRIES)
#undef QUANT_ENTRIES
#undef ENTRIES
}  // extern "C"
