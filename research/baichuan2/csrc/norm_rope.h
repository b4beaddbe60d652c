// RMSNorm and RoPE: their one definition, used by the per-op entries (RmsNormF32, RopeSwapAxes12) and the
// whole-stack op. Scalar: next to the projections they cost little.
#pragma once
#include "common.h"

namespace {

// y = w * x / sqrt(mean(x^2) + eps) per row of H; x, y [M, H], w [H].
void rms_norm_rows(const float *x, const float *w, float eps, int64_t M, int64_t H, float *y) {
  for (int64_t m = 0; m < M; ++m) {
    const float *xr = x + m * H;
    float ss = 0.f;
    for (int64_t i = 0; i < H; ++i) ss += xr[i] * xr[i];
    const float r = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
    for (int64_t i = 0; i < H; ++i) y[m * H + i] = w[i] * (xr[i] * r);
  }
}

// RoPE, half rotation (as Hugging Face Llama), of one head's D values at one position: y may be x.
void rope_half(const float *x, const float *cs, const float *sn, int64_t D, float *y) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    y[i] = a * cs[i] - b * sn[i];
    y[i + h] = b * cs[i + h] + a * sn[i + h];
  }
}

}  // namespace
