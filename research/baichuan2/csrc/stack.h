// CachedStack / CachedStackLogits: a cached step through the whole decoder stack and the final RMSNorm in one op,
// the key/value caches written in place: Ly layers over S new tokens of each of B sequences (prefill: S = the
// prompt, from slot 0; decode: S = 1), float32 activations, all weights in one format. Per layer (stack_layers.h's
// body, shared with PagedStack in paged_stack.h), on the hidden state x:
//   h = x + o_proj(attention(rope(q), rope(k), v));  x = h + down(silu(gate(n2)) * up(n2))
//   where q, k, v = q/k/v_proj(n1), n1 = RMSNorm(x) * ln1, n2 = RMSNorm(h) * ln2;  then y = RMSNorm(x) * norm.
// Why one op: op by op, a decode step launches ~18 MindSpore ops a layer plus ~25 for the positions and the
// attention mask, each 15-50 us on these 2-core machines, several times the projections' own time at small shapes;
// and every stock op of a compiled graph keeps memory for the graph's life (the prefill graph of a 7B holds ~21 MB a
// layer). Why one op for all layers rather than one a layer: MindSpore's time between our kernels grows with how
// long they ran (measured on a shared 2-core EPYC: a shape-S step of 10 launches took 0.5 ms back to back with
// instant kernels, 1.6-2.3 ms with 6 ms of other work between steps; its launch bookkeeping is evicted from the
// caches meanwhile), so a step costs in proportion to how much of that bookkeeping it touches: one launch and one
// set of shared inputs for the whole stack, not one a layer.
// Why in place: an op output is fresh memory, so returning the caches would copy all of them every step; the op
// writes the new rows into the cache tensors it is given, which on CPU are the caller's own buffers
// (tests/test_kernels.py checks that the caller sees them).
// Positions and visibility come from the attention mask, as the model computes them for its other backends: key
// positions p_l = max(cumsum(mask)_l - 1, 0); the query in slot j has position p_j and sees key l when l <= j and
// (mask_l or l == j); RoPE (half rotation) at the token's position, or ALiBi adds slope_n (p_l - p_j).
#pragma once
#include "stack_layers.h"

namespace {

// The inputs in the order the Python op lists them, then the output y.
struct StackArgs {
  Arg x;         // float32 [B * S, H], sequence-major
  Arg norm;      // float32 [H]: the final RMSNorm's weight
  Arg eps;       // float32 [1]
  Arg spec;      // int32 [2]: (group size, 1 = RoPE / 0 = ALiBi)
  Arg mask;      // int32 [B, L]: 1 = a real token, the new ones included
  Arg slot;      // int32, 0-d or [1]: the first new token's cache slot; they fill [slot, slot + S)
  Arg cos, sin;  // float32 [P, D]: RoPE tables, a row per position (any float32 tensor with ALiBi)
  Arg slopes;    // float32 [N]: ALiBi's slopes (any float32 tensor with RoPE)
  Arg k_caches, v_caches;  // float32 [Ly, B, N, L, D], written in place
  StackWeights w;  // each layer's (the format is read from the weights' dtypes); CachedStackLogits: the lm_head's
  Arg y;           // CachedStack: float32 [B * S, H]; CachedStackLogits: the logits [B, V] of each sequence's
                   // last new token (the lm_head, the strided slice before it and their launches leave the graph)

  // The call's tensors split into those above; kArgCount or kDtype when they cannot be.
  Status bind(const AotCall &call, bool with_head) {
    constexpr int kFixed = 11;  // x .. v_caches
    if (Status err = w.bind(call, kFixed, with_head)) return err;
    int at = 0;
    for (Arg *a : {&x, &norm, &eps, &spec, &mask, &slot, &cos, &sin, &slopes, &k_caches, &v_caches}) *a = call[at++];
    y = call[call.count - 1];
    return kOk;
  }
};

Status cached_stack(bool with_head, const AotCall &call) {
  StackArgs a;
  if (Status err = a.bind(call, with_head)) return err;
  for (const Arg *t : {&a.x, &a.norm, &a.eps, &a.cos, &a.sin, &a.slopes, &a.k_caches, &a.v_caches, &a.y})
    if (!t->is("float32")) return kDtype;
  for (const Arg *t : {&a.spec, &a.mask, &a.slot})
    if (!t->is("int32")) return kDtype;
  if (a.x.ndim != 2 || a.norm.ndim != 1 || a.k_caches.ndim != 5 || a.v_caches.ndim != 5 || a.mask.ndim != 2 ||
      a.spec.ndim != 1 || a.spec.dim(0) != 2)
    return kRank;
  const int64_t layers = static_cast<int64_t>(a.w.layers.size());
  const int64_t M = a.x.dim(0), H = a.x.dim(1);
  const int64_t B = a.k_caches.dim(1), N = a.k_caches.dim(2), L = a.k_caches.dim(3), D = a.k_caches.dim(4);
  for (const Arg *c : {&a.k_caches, &a.v_caches})
    if (!c->dims({layers, B, N, L, D})) return kShape;
  if (B <= 0 || M % B != 0 || N * D != H || a.norm.dim(0) != H || a.mask.dim(0) != B || a.mask.dim(1) != L)
    return kShape;
  const int64_t S = M / B;
  PositionSpec position;
  if (Status err = position.read(a.spec, a.cos, a.sin, a.slopes, N, D)) return err;
  const int64_t group = position.group, P = position.P;
  const bool rope = position.rope;
  const int64_t slot = *a.slot.as<const int32_t>();
  if (slot < 0 || slot + S > L) return kBadValue;
  StackProblems sp;
  if (Status err = sp.bind(a.w, group, M, H)) return err;
  Problem head;  // the lm_head over the last new token of each sequence: B rows
  if (with_head) {
    head.M = B;
    if (Status err = bind_weight(a.w.head_fmt, group, a.w.head, -1, H, &head)) return err;
    if (a.y.dim(0) != B || a.y.dim(1) != head.N) return kShape;
  } else if (a.y.dim(0) != M || a.y.dim(1) != H) {
    return kShape;
  }
  const float *cos_table = a.cos.as<const float>(), *sin_table = a.sin.as<const float>(),
              *slopes = a.slopes.as<const float>();
  const int32_t *mask = a.mask.as<const int32_t>();
  const float eps = *a.eps.as<const float>();
  float *y = a.y.as<float>();
  const int64_t keys = slot + S;  // slots a query can see: [0, slot + S)
  // per sequence and slot: whether it holds a real token, and its key position
  std::vector<uint8_t> real(static_cast<size_t>(B * keys));
  std::vector<int64_t> pos(static_cast<size_t>(B * keys));
  for (int64_t b = 0; b < B; ++b) {
    int64_t seen = 0;
    for (int64_t l = 0; l < keys; ++l) {
      real[b * keys + l] = mask[b * L + l] > 0;
      seen += real[b * keys + l];
      pos[b * keys + l] = std::max<int64_t>(seen - 1, 0);
    }
    if (rope && pos[b * keys + keys - 1] >= P) return kBadValue;  // past the RoPE tables: the caller's context check
  }
  LayerScratch s(M, H, sp.I);
  memcpy(s.x, a.x.as<const float>(), sizeof(float) * M * H);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  auto attend = [&](int64_t layer, float *q, float *k, const float *v, float *att) {
    float *kc = a.k_caches.as<float>() + layer * B * N * L * D, *vc = a.v_caches.as<float>() + layer * B * N * L * D;
    parallel(kernel_threads(), [&](int t, int nt) {
      int64_t h0, h1;
      thread_range(B * N, 1, t, nt, &h0, &h1);
      std::vector<float> p(static_cast<size_t>(keys));
      for (int64_t bh = h0; bh < h1; ++bh) {  // bh = b * N + head: the caches' layout; rows of q / k / v: b * S + s
        const int64_t b = bh / N, head = bh % N;
        float *kcache = kc + bh * L * D, *vcache = vc + bh * L * D;
        for (int64_t s = 0; s < S; ++s) {  // RoPE, then the cache rows of every new token first: later ones see them
          const int64_t row = (b * S + s) * H + head * D, j = slot + s;
          if (rope) {
            const int64_t at = pos[b * keys + j] * D;
            rope_half(q + row, cos_table + at, sin_table + at, D, q + row);
            rope_half(k + row, cos_table + at, sin_table + at, D, k + row);
          }
          memcpy(kcache + j * D, k + row, sizeof(float) * D);
          memcpy(vcache + j * D, v + row, sizeof(float) * D);
        }
        const MaskedKeys seen{real.data() + b * keys, pos.data() + b * keys, rope ? 0.f : slopes[head]};
        const CacheRows rows{kcache, vcache, D};
        for (int64_t s = 0; s < S; ++s) {
          const int64_t row = (b * S + s) * H + head * D;
          attend_query(q + row, rows, D, slot + s, seen, scale, p.data(), att + row);
        }
      }
    });
  };
  if (Status err = run_layers(a.w, sp, eps, s, attend)) return err;
  const float *norm = a.norm.as<const float>();
  if (!with_head) {
    rms_norm_rows(s.x, norm, eps, M, H, y);
    return kOk;
  }
  for (int64_t b = 0; b < B; ++b) rms_norm_rows(s.x + (b * S + S - 1) * H, norm, eps, 1, H, s.n + b * H);
  head.x = s.n;
  head.y = y;
  return project(a.w.head_fmt, &head, 1);
}

}  // namespace

extern "C" {
int CachedStack(AOT_PARAMS) { return cached_stack(false, AOT_CALL); }
int CachedStackLogits(AOT_PARAMS) { return cached_stack(true, AOT_CALL); }
}  // extern "C"
