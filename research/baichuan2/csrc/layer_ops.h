// The per-op entry points of one layer's attention and norms at inference (the per-op path; the whole-stack op
// runs the same RMSNorm, RoPE and attention: norm_rope.h, attention.inc).
#pragma once
#include "aot.h"
#include "model_paths.h"
#include "norm_rope.h"

namespace {

// x [A, B, C, D] -> y [A, C, B, D], float32.
struct SwapAxes12Args {
  Arg x, y;
  bool bind(const AotCall &call) { return call.bind({&x, &y}); }
};

// x [A, B, C, D]; cos, sin and y [A, C, B, D]; float32.
struct RopeSwapAxes12Args {
  Arg x, cos, sin, y;
  bool bind(const AotCall &call) { return call.bind({&x, &cos, &sin, &y}); }
};

// x and y [M, H], weight [H], eps [1]; float32.
struct RmsNormArgs {
  Arg x, weight, eps, y;
  bool bind(const AotCall &call) { return call.bind({&x, &weight, &eps, &y}); }
};

// q, k, v [B, N, 1, D] (the new token); caches k_cache, v_cache [B, N, L, D]; slot int32, 0-d or [1] (the new
// token's cache slot); bias [B, N, 1, L] -> out [B, 1, N, D], k_out, v_out [B, N, L, D]; float32 but slot.
struct DecodeAttentionArgs {
  Arg q, k, v, k_cache, v_cache, slot, bias, out, k_out, v_out;
  bool bind(const AotCall &call) {
    return call.bind({&q, &k, &v, &k_cache, &v_cache, &slot, &bias, &out, &k_out, &v_out});
  }
};

}  // namespace

extern "C" {
// y = x.swapaxes(1, 2): attention's head transposes at inference ([B, S, N, D] <-> [B, N, S, D]). MindSpore's CPU
// Transpose keeps one 64-bit source offset per element for the life of the compiled graph (~2x the tensor per op
// instance, 4 per layer); this copies rows of D floats and keeps nothing.
int SwapAxes12(AOT_PARAMS) {
  SwapAxes12Args a;
  if (!a.bind(AOT_CALL) || a.x.ndim != 4 || a.y.ndim != 4) return kArgCount;
  if (!a.x.is("float32") || !a.y.is("float32")) return kDtype;
  const int64_t A = a.x.dim(0), B = a.x.dim(1), C = a.x.dim(2), D = a.x.dim(3);
  if (!a.y.dims({A, C, B, D})) return kShape;
  const float *x = a.x.as<const float>();
  float *y = a.y.as<float>();
  for (int64_t i = 0; i < A; ++i)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c)
        memcpy(y + ((i * C + c) * B + b) * D, x + ((i * B + b) * C + c) * D, sizeof(float) * D);
  return kOk;
}

// y = x.swapaxes(1, 2) with RoPE (half rotation, as Hugging Face Llama) applied: one op for what takes seven
// stock ones (slices, negation, concatenation, products) plus a transpose.
int RopeSwapAxes12(AOT_PARAMS) {
  RopeSwapAxes12Args a;
  if (!a.bind(AOT_CALL)) return kArgCount;
  for (const Arg *t : {&a.x, &a.cos, &a.sin, &a.y})
    if (t->ndim != 4 || !t->is("float32")) return kDtype;
  const int64_t A = a.x.dim(0), B = a.x.dim(1), C = a.x.dim(2), D = a.x.dim(3);
  for (const Arg *t : {&a.cos, &a.sin, &a.y})
    if (!t->dims({A, C, B, D})) return kShape;
  if (D % 2) return kShape;
  const float *x = a.x.as<const float>(), *cs = a.cos.as<const float>(), *sn = a.sin.as<const float>();
  float *y = a.y.as<float>();
  for (int64_t i = 0; i < A; ++i)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c) {
        const float *xr = x + ((i * B + b) * C + c) * D;
        const int64_t o = ((i * C + c) * B + b) * D;
        rope_half(xr, cs + o, sn + o, D, y + o);
      }
  return kOk;
}

// RMSNorm over the last axis: y = weight * x / sqrt(mean(x^2) + eps).
int RmsNormF32(AOT_PARAMS) {
  RmsNormArgs a;
  if (!a.bind(AOT_CALL) || a.x.ndim != 2 || a.weight.ndim != 1 || a.eps.ndim != 1 || a.y.ndim != 2) return kArgCount;
  for (const Arg *t : {&a.x, &a.weight, &a.eps, &a.y})
    if (!t->is("float32")) return kDtype;
  const int64_t M = a.x.dim(0), H = a.x.dim(1);
  if (a.weight.dim(0) != H || a.eps.dim(0) != 1 || !a.y.dims({M, H})) return kShape;
  rms_norm_rows(a.x.as<const float>(), a.weight.as<const float>(), *a.eps.as<const float>(), M, H, a.y.as<float>());
  return kOk;
}

// One decode step of attention with its cache writes: k_out, v_out = the caches with the new token's row at
// `slot`, out = softmax(q k_out^T / sqrt(D) + bias) v_out in the layout o_proj reads. One op for ~14 stock ones a
// layer (gather + select per cache, the score and value products, softmax, casts, the output transpose), each of
// which costs a launch in every step.
int DecodeAttention(AOT_PARAMS) {
  DecodeAttentionArgs a;
  if (!a.bind(AOT_CALL)) return kArgCount;
  for (const Arg *t : {&a.q, &a.k, &a.v, &a.k_cache, &a.v_cache, &a.bias, &a.out, &a.k_out, &a.v_out})
    if (t->ndim != 4 || !t->is("float32")) return kDtype;
  if (a.slot.ndim > 1 || !a.slot.is("int32")) return kDtype;
  const int64_t B = a.k_cache.dim(0), N = a.k_cache.dim(1), L = a.k_cache.dim(2), D = a.k_cache.dim(3);
  for (const Arg *t : {&a.q, &a.k, &a.v})
    if (!t->dims({B, N, 1, D})) return kShape;
  for (const Arg *t : {&a.v_cache, &a.k_out, &a.v_out})
    if (!t->dims({B, N, L, D})) return kShape;
  if (!a.bias.dims({B, N, 1, L}) || !a.out.dims({B, 1, N, D})) return kShape;
  const int64_t slot = *a.slot.as<const int32_t>();
  if (slot < 0 || slot >= L) return kBadValue;
  if (chosen_isa() == kNone) return kNoPath;
  const float *q = a.q.as<const float>(), *k = a.k.as<const float>(), *v = a.v.as<const float>(),
              *kc = a.k_cache.as<const float>(), *vc = a.v_cache.as<const float>(), *bias = a.bias.as<const float>();
  float *out = a.out.as<float>(), *ko = a.k_out.as<float>(), *vo = a.v_out.as<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<float> p(L);
  for (int64_t h = 0; h < B * N; ++h) {  // h = b * N + n: the caches' and q's layout
    float *kh = ko + h * L * D, *vh = vo + h * L * D;
    memcpy(kh, kc + h * L * D, sizeof(float) * L * D);
    memcpy(vh, vc + h * L * D, sizeof(float) * L * D);
    memcpy(kh + slot * D, k + h * D, sizeof(float) * D);
    memcpy(vh + slot * D, v + h * D, sizeof(float) * D);
    const BiasedKeys keys{bias + h * L};
    const CacheRows rows{kh, vh, D};
    attend_query(q + h * D, rows, D, L - 1, keys, scale, p.data(), out + h * D);  // [B, 1, N, D]: offset h D
  }
  return kOk;
}
}  // extern "C"
