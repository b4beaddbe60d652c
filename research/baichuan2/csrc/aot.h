// The glue between MindSpore's `ops.Custom(func_type="aot")` calls and the kernels. MindSpore calls an exported
//   int Name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream, void *extra)
// with the op's inputs, then its outputs, each as data pointer, rank, shape and dtype name; a non-zero return
// (a Status) makes it raise. Each entry binds those to a struct of named Args (in the order the Python op lists
// them) before it checks and uses them.
#pragma once
#include "common.h"

// An entry point's parameter list, and the call those parameters make.
#define AOT_PARAMS int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *
#define AOT_CALL (AotCall{nparam, params, ndims, shapes, dtypes})

namespace {

// One tensor of a call.
struct Arg {
  void *data = nullptr;
  int ndim = 0;
  const int64_t *shape = nullptr;
  const char *dtype = "";

  bool is(const char *name) const { return strcmp(dtype, name) == 0; }
  int64_t dim(int i) const { return shape[i]; }
  // rank len(dims) and exactly these dims
  bool dims(std::initializer_list<int64_t> want) const {
    if (ndim != static_cast<int>(want.size())) return false;
    int i = 0;
    for (int64_t d : want)
      if (shape[i++] != d) return false;
    return true;
  }
  template <class T>
  T *as() const { return static_cast<T *>(data); }
};

// The tensors of one call, inputs then outputs.
struct AotCall {
  int count;
  void **params;
  int *ndims;
  int64_t **shapes;
  const char **dtypes;

  Arg operator[](int i) const { return Arg{params[i], ndims[i], shapes[i], dtypes[i]}; }
  // Binds the call's tensors to `fields`, in order; false when the counts differ.
  bool bind(std::initializer_list<Arg *> fields) const {
    if (count != static_cast<int>(fields.size())) return false;
    int i = 0;
    for (Arg *f : fields) *f = (*this)[i++];
    return true;
  }
};

// A projection's weight: `weight` alone (float32, bfloat16), with its float16 `scales` (int8, int4), or with
// scales and float16 `mins` (int4 asymmetric).
struct WeightArgs {
  Arg weight, scales, mins;
  bool has_mins = false;
  // The call's `tensors` (1, 2 or 3) from `at` on; returns the index after them.
  int bind(const AotCall &call, int at, int tensors) {
    weight = call[at];
    if (tensors > 1) scales = call[at + 1];
    has_mins = tensors > 2;
    if (has_mins) mins = call[at + 2];
    return at + tensors;
  }
};

// Binds weight `w` of a projection with K inputs to p (w, s, N, K, G, group, row_units), checking it against the
// format's layout (docs/WEIGHT_FORMATS.md); N < 0 takes the row count from the weight.
Status bind_weight(Fmt fmt, int64_t group, const WeightArgs &w, int64_t N, int64_t K, Problem *p) {
  const bool quant = quantised(fmt);
  if (!w.weight.is(kWeightDtype[fmt]) || w.weight.ndim != 2) return kDtype;
  if (quant && (group <= 0 || group % kChunk != 0)) return kBadValue;
  p->w = w.weight.data;
  p->s = quant ? w.scales.as<const uint16_t>() : nullptr;
  p->mn = w.has_mins ? w.mins.as<const uint16_t>() : nullptr;
  p->N = N < 0 ? w.weight.dim(0) : N;
  p->K = K;
  p->group = group;
  p->row_units = w.weight.dim(1);
  p->G = quant ? ceil_div(K, group) : 0;
  if (w.weight.dim(0) != p->N || p->row_units != (fmt == kI4 ? ceil_div(K, kChunk) * 16 : K)) return kShape;
  if (quant && (!w.scales.is("float16") || !w.scales.dims({p->N, p->G}))) return kBadValue;
  if (w.has_mins && (fmt != kI4 || !w.mins.is("float16") || !w.mins.dims({p->N, p->G}))) return kBadValue;
  return kOk;
}

}  // namespace
