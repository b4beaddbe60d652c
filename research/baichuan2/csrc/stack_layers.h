// What the whole-stack ops share: the per-layer weights as a call passes them, their projection problems, and the
// layer body. CachedStack (stack.h: contiguous caches, positions from a mask) and PagedStack (paged_stack.h: a
// block pool, positions given per token) differ only in their inputs and in where attention's keys live, which
// each hands to run_layers as its `attend` step. Per layer, on the hidden state x [M, H]:
//   h = x + o_proj(attention(q, k, v));  x = h + down(silu(gate(n2)) * up(n2))
//   where q, k, v = q/k/v_proj(n1), n1 = RMSNorm(x) * ln1, n2 = RMSNorm(h) * ln2.
#pragma once
#include "aot.h"
#include "model_paths.h"
#include "norm_rope.h"

namespace {

constexpr int kLayerWeights = 7;  // q, k, v, o, gate, up, down

struct LayerArgs {
  Arg ln1, ln2;                    // float32 [H]: the RMSNorm weights before attention and before the MLP
  WeightArgs proj[kLayerWeights];  // q, k, v, o [H, H]; gate, up [I, H]; down [H, I]
};

// A stack op's weights: after its `fixed` leading inputs, each layer's ln1, ln2 and 7 projections, then (with_head)
// the lm_head's, then the one output; all layers in one format, read from the first layer's q weight's dtype (int4
// asymmetric: a float16 tensor, the mins, follows the q weight's scales).
struct StackWeights {
  std::vector<LayerArgs> layers;
  WeightArgs head;  // with_head: the lm_head's (any format; the layers' group size)
  Fmt fmt, head_fmt;

  // kArgCount or kDtype when the call's tensors cannot be split so.
  Status bind(const AotCall &call, int fixed, bool with_head) {
    if (call.count < fixed + 2 + kLayerWeights + 1 + with_head) return kArgCount;
    const bool head_scaled = with_head && call[call.count - 2].is("float16");
    const bool head_mins = head_scaled && call[call.count - 3].is("float16");
    const int head_tensors = with_head ? (head_mins ? 3 : head_scaled ? 2 : 1) : 0;
    const int head_at = call.count - 1 - head_tensors;
    const int f = format_of(call[fixed + 2]), hf = with_head ? format_of(call[head_at]) : -1;
    if (f < 0 || (with_head && (hf < 0 || head_scaled != quantised(hf)))) return kDtype;
    fmt = static_cast<Fmt>(f);
    head_fmt = with_head ? static_cast<Fmt>(hf) : fmt;
    const bool mins = fmt == kI4 && call[fixed + 4].is("float16");
    const int tensors = !quantised(fmt) ? 1 : mins ? 3 : 2, per_layer = 2 + tensors * kLayerWeights;
    if ((head_at - fixed) % per_layer != 0) return kArgCount;
    int at = fixed;
    layers.resize((head_at - fixed) / per_layer);
    for (LayerArgs &layer : layers) {
      layer.ln1 = call[at++];
      layer.ln2 = call[at++];
      for (WeightArgs &w : layer.proj) at = w.bind(call, at, tensors);
    }
    if (with_head) head.bind(call, head_at, head_tensors);
    return kOk;
  }

  static int format_of(const Arg &weight) {
    for (int f = 0; f < kFormatCount; ++f)
      if (weight.is(kWeightDtype[f])) return f;
    return -1;
  }
};

// The layers' projections over M rows of hidden width H, checked against the weights' layouts: ps[l * 7 + w] is
// weight w (q k v o gate up down) of layer l; I = the MLP's width (gate rows).
struct StackProblems {
  std::vector<Problem> ps;
  int64_t M = 0, H = 0, I = 0;

  Status bind(const StackWeights &w, int64_t group, int64_t rows_m, int64_t hidden) {
    M = rows_m;
    H = hidden;
    I = w.layers[0].proj[4].weight.dim(0);
    const int64_t layers = static_cast<int64_t>(w.layers.size());
    ps.assign(static_cast<size_t>(layers * kLayerWeights), Problem{});
    const int64_t rows[kLayerWeights] = {H, H, H, H, I, I, H}, cols[kLayerWeights] = {H, H, H, H, H, H, I};
    for (int64_t l = 0; l < layers; ++l) {
      const LayerArgs &layer = w.layers[l];
      for (const Arg *t : {&layer.ln1, &layer.ln2})
        if (!t->is("float32") || t->ndim != 1 || t->dim(0) != H) return kShape;
      for (int k = 0; k < kLayerWeights; ++k) {
        Problem *p = &ps[l * kLayerWeights + k];
        p->M = M;
        if (Status err = bind_weight(w.fmt, group, layer.proj[k], rows[k], cols[k], p)) return err;
      }
    }
    return kOk;
  }
};

// The layer body's buffers: the hidden state x, n, q, k, v, att, h [M, H] each; gate, up [M, I] each.
struct LayerScratch {
  std::vector<float> buf;
  float *x, *n, *q, *k, *v, *att, *h, *gate, *up;
  LayerScratch(int64_t M, int64_t H, int64_t I) : buf(static_cast<size_t>(M * (7 * H + 2 * I))) {
    x = buf.data();
    n = x + M * H;
    q = n + M * H;
    k = q + M * H;
    v = k + M * H;
    att = v + M * H;
    h = att + M * H;
    gate = h + M * H;
    up = gate + M * I;
  }
};

// The position encoding both stack ops take: spec int32 [2] = (group size, 1 RoPE / 0 ALiBi) and its tables,
// checked against N heads of D: RoPE's cos / sin [P, D] (D even), ALiBi's slopes [N]; kShape when they disagree.
struct PositionSpec {
  int64_t group = 0, P = 0;  // P: rows of the RoPE tables (0 with ALiBi)
  bool rope = false;

  Status read(const Arg &spec, const Arg &cos, const Arg &sin, const Arg &slopes, int64_t N, int64_t D) {
    const int32_t *values = spec.as<const int32_t>();
    group = values[0];
    rope = values[1] != 0;
    P = rope ? cos.dim(0) : 0;
    if (rope && (cos.ndim != 2 || sin.ndim != 2 || cos.dim(1) != D || sin.dim(0) != P || sin.dim(1) != D ||
                 D % 2 != 0))
      return kShape;
    if (!rope && (slopes.ndim != 1 || slopes.dim(0) != N)) return kShape;
    return kOk;
  }
};

// Every layer on s.x [M, H] (in place). attend(layer, q, k, v, att) is the op's attention step: RoPE of q and k
// where the op uses it, the key / value rows written to its cache, att [M, H] the attention output per head.
template <class Attend>
Status run_layers(const StackWeights &w, StackProblems &sp, float eps, LayerScratch &s, Attend &&attend) {
  const int64_t M = sp.M, H = sp.H, I = sp.I;
  float *x = s.x, *n = s.n, *q = s.q, *k = s.k, *v = s.v, *att = s.att, *h = s.h, *gate = s.gate, *up = s.up;
  for (int64_t layer = 0; layer < static_cast<int64_t>(w.layers.size()); ++layer) {
    const float *ln1 = w.layers[layer].ln1.as<const float>(), *ln2 = w.layers[layer].ln2.as<const float>();
    Problem *lp = &sp.ps[layer * kLayerWeights];
    auto run = [&](int first, int count, const float *in, std::initializer_list<float *> outs) {
      int i = 0;
      for (float *out : outs) {
        lp[first + i].x = in;
        lp[first + i].y = out;
        ++i;
      }
      return project(w.fmt, lp + first, count);
    };
    rms_norm_rows(x, ln1, eps, M, H, n);
    if (Status err = run(0, 3, n, {q, k, v})) return err;
    attend(layer, q, k, v, att);
    if (Status err = run(3, 1, att, {h})) return err;
    for (int64_t i = 0; i < M * H; ++i) h[i] += x[i];
    rms_norm_rows(h, ln2, eps, M, H, n);
    if (Status err = run(4, 2, n, {gate, up})) return err;
    parallel(kernel_threads(), [&](int t, int nt) {
      int64_t i0, i1;
      thread_range(M * I, 64, t, nt, &i0, &i1);
      silu_mul(gate + i0, up + i0, i1 - i0);
    });
    if (Status err = run(6, 1, gate, {x})) return err;  // x is last read by h += x above: the new x replaces it
    for (int64_t i = 0; i < M * H; ++i) x[i] += h[i];
  }
  return kOk;
}

}  // namespace
