// PagedStackLogits: CachedStackLogits' step (stack_layers.h: every decoder layer, the final RMSNorm, the lm_head in
// one op) for a serving engine's batch: T new tokens of B sequences at different depths, their keys and values in a
// pool of fixed-size blocks that each sequence reaches through its block table, written in place. Inputs in this
// order, then the output:
//   x         float32 [T, H]: the embeddings of the step's new tokens, sequences one after another
//   norm      float32 [H]; eps float32 [1]; spec int32 [2] = (group size, 1 RoPE / 0 ALiBi)   (as CachedStack)
//   tokens    int32 [T, 2]: per new token (sequence index b in [0, B), position p). A sequence's tokens are
//             contiguous rows in increasing consecutive positions. Its key / value rows are written at position p
//             of sequence b; it attends to positions [0, p] of sequence b (earlier ones already in the pool or
//             written by this step)
//   out_rows  int32 [R]: the rows of x whose logits are returned (each sequence's last new token; all rows for
//             prompt logprobs)
//   block_tables  int32 [B, MB]: position p of sequence b lives in pool block block_tables[b, p / bs], row p % bs
//   cos, sin  float32 [P, D]; slopes float32 [N]                                       (as CachedStack)
//   k_pool, v_pool  [Ly, NB, N, bs, D], float32, bfloat16 or int8 (both the same), written in place
//   k_scales, v_scales  float32 [Ly, NB, N, bs]: an int8 pool's scale per (token, head) row, scale = absmax / 127,
//             q = round(x / scale) to nearest even (scale 0: q 0); any float32 tensor for the other pool dtypes
//   per layer: ln1, ln2, q, k, v, o, gate, up, down, each (weight,) or (qweight, scales); then the lm_head's
//             (weight,) or (qweight, scales)                                           (as CachedStackLogits)
//   y         float32 [R, V]: the logits of the out_rows tokens
// bfloat16 rows are rounded to nearest even when written. Attention reads the rows in their stored format where
// they are (PoolRows, attention.h; attention.inc's paged attend_query: widened in registers 8 keys at a time, never
// a copy of a sequence's cache), so a new token's own key is the stored one too. RoPE at the token's position; ALiBi
// adds slope_n (p_key - p_query). Threads: the projections over the T rows, attention over (sequence, head).
// Bad shapes, a sequence index, position or block id out of range, a sequence's tokens not one run of consecutive
// positions, a position past the RoPE tables: a Status, before anything is written.
#pragma once
#include "stack_layers.h"

namespace {

// The inputs in the order the Python op lists them, then the output y.
struct PagedArgs {
  Arg x, norm, eps, spec, tokens, out_rows, block_tables, cos, sin, slopes, k_pool, v_pool, k_scales, v_scales;
  StackWeights w;
  Arg y;

  // kArgCount or kDtype when the call's tensors cannot be split so.
  Status bind(const AotCall &call) {
    constexpr int kFixed = 14;  // x .. v_scales
    if (Status err = w.bind(call, kFixed, true)) return err;
    int at = 0;
    for (Arg *a : {&x, &norm, &eps, &spec, &tokens, &out_rows, &block_tables, &cos, &sin, &slopes, &k_pool, &v_pool,
                   &k_scales, &v_scales})
      *a = call[at++];
    y = call[call.count - 1];
    return kOk;
  }
};

// One sequence's new tokens: rows [first, first + count) of x, at positions [pos, pos + count); its positions'
// pool rows from at[0] on (row_at below).
struct Segment {
  int64_t b, first, count, pos;
  const int64_t *at;
};

// A key / value row of D floats into row `at` of a pool of T (float, bfloat16 bits, int8; int8: its scale too).
template <class T>
void store_row(const float *x, int64_t D, int64_t at, T *pool, float *scales) {
  T *r = pool + at * D;
  if constexpr (std::is_same<T, float>::value) {
    memcpy(r, x, sizeof(float) * D);
  } else if constexpr (std::is_same<T, uint16_t>::value) {  // round to nearest even; NaN stays a quiet NaN
    for (int64_t d = 0; d < D; ++d) {
      uint32_t bits;
      memcpy(&bits, x + d, 4);
      r[d] = std::isnan(x[d]) ? 0x7FC0 : static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
    }
  } else {
    float amax = 0.f;
    for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(x[d]));
    const float s = amax / 127.f;
    for (int64_t d = 0; d < D; ++d)
      r[d] = s > 0.f ? static_cast<T>(std::min(127.f, std::max(-127.f, std::nearbyint(x[d] / s)))) : T(0);
    scales[at] = s;
  }
}

Status paged_stack(const AotCall &call) {
  PagedArgs a;
  if (Status err = a.bind(call)) return err;
  for (const Arg *t : {&a.x, &a.norm, &a.eps, &a.cos, &a.sin, &a.slopes, &a.k_scales, &a.v_scales, &a.y})
    if (!t->is("float32")) return kDtype;
  for (const Arg *t : {&a.spec, &a.tokens, &a.out_rows, &a.block_tables})
    if (!t->is("int32")) return kDtype;
  const bool pool_f32 = a.k_pool.is("float32"), pool_bf16 = a.k_pool.is("bfloat16"), pool_i8 = a.k_pool.is("int8");
  if (!(pool_f32 || pool_bf16 || pool_i8) || strcmp(a.k_pool.dtype, a.v_pool.dtype) != 0) return kDtype;
  if (a.x.ndim != 2 || a.norm.ndim != 1 || a.spec.ndim != 1 || a.spec.dim(0) != 2 || a.tokens.ndim != 2 ||
      a.out_rows.ndim != 1 || a.block_tables.ndim != 2 || a.k_pool.ndim != 5 || a.v_pool.ndim != 5 || a.y.ndim != 2)
    return kRank;
  const int64_t layers = static_cast<int64_t>(a.w.layers.size());
  const int64_t T = a.x.dim(0), H = a.x.dim(1), R = a.out_rows.dim(0);
  const int64_t NB = a.k_pool.dim(1), N = a.k_pool.dim(2), bs = a.k_pool.dim(3), D = a.k_pool.dim(4);
  const int64_t B = a.block_tables.dim(0), MB = a.block_tables.dim(1);
  if (!a.v_pool.dims({layers, NB, N, bs, D}) || !a.k_pool.dims({layers, NB, N, bs, D})) return kShape;
  if (pool_i8 && (!a.k_scales.dims({layers, NB, N, bs}) || !a.v_scales.dims({layers, NB, N, bs}))) return kShape;
  if (T <= 0 || bs <= 0 || N <= 0 || N * D != H || a.norm.dim(0) != H || !a.tokens.dims({T, 2})) return kShape;
  PositionSpec position;
  if (Status err = position.read(a.spec, a.cos, a.sin, a.slopes, N, D)) return err;
  const int64_t group = position.group, P = position.P;
  const bool rope = position.rope;
  StackProblems sp;
  if (Status err = sp.bind(a.w, group, T, H)) return err;
  Problem head;  // the lm_head over the out_rows: R rows
  head.M = R;
  if (Status err = bind_weight(a.w.head_fmt, group, a.w.head, -1, H, &head)) return err;
  if (a.y.dim(0) != R || a.y.dim(1) != head.N) return kShape;
  // The tokens as runs of one sequence each, checked: every position written or read has a block in the pool.
  const int32_t *tok = a.tokens.as<const int32_t>(), *tables = a.block_tables.as<const int32_t>();
  std::vector<Segment> segs;
  std::vector<uint8_t> started(static_cast<size_t>(std::max<int64_t>(B, 0)));
  for (int64_t t = 0; t < T; ++t) {
    const int64_t b = tok[2 * t], p = tok[2 * t + 1];
    if (b < 0 || b >= B || p < 0) return kBadValue;
    if (!segs.empty() && segs.back().b == b) {
      if (p != segs.back().pos + segs.back().count) return kBadValue;
      ++segs.back().count;
    } else {
      if (started[b]) return kBadValue;  // the sequence's tokens are not one run
      started[b] = 1;
      segs.push_back(Segment{b, t, 1, p, nullptr});
    }
  }
  int64_t keys = 0, positions = 0;  // the most positions a query sees; all the sequences' positions
  for (const Segment &g : segs) {
    const int64_t last = g.pos + g.count - 1;
    if (last / bs >= MB || (rope && last >= P)) return kBadValue;  // past the block table or the RoPE tables
    for (int64_t i = 0; i <= last / bs; ++i)
      if (tables[g.b * MB + i] < 0 || tables[g.b * MB + i] >= NB) return kBadValue;
    keys = std::max(keys, last + 1);
    positions += last + 1;
  }
  // Per sequence and position its pool row within a layer and head (block * N * bs + p % bs), for every layer and
  // head: the divisions once a call, not once per key read.
  std::vector<int64_t> row_at(static_cast<size_t>(positions));
  int64_t *next = row_at.data();
  for (Segment &g : segs) {
    g.at = next;
    for (int64_t p = 0; p < g.pos + g.count; ++p) *next++ = tables[g.b * MB + p / bs] * N * bs + p % bs;
  }
  const int32_t *out_rows = a.out_rows.as<const int32_t>();
  for (int64_t r = 0; r < R; ++r)
    if (out_rows[r] < 0 || out_rows[r] >= T) return kBadValue;

  const float *cos_table = a.cos.as<const float>(), *sin_table = a.sin.as<const float>(),
              *slopes = a.slopes.as<const float>();
  const float eps = *a.eps.as<const float>(), scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t layer_rows = NB * N * bs;  // pool rows of one layer
  // Attention of one layer with the pool's element type Elem: per (sequence, head), RoPE and the pool rows of every
  // new token first (later ones see them), then each token's query over positions [0, p].
  auto attend_in = [&](auto elem, int64_t layer, float *q, float *k, const float *v, float *att) {
    using Elem = decltype(elem);
    Elem *kp = a.k_pool.as<Elem>() + layer * layer_rows * D, *vp = a.v_pool.as<Elem>() + layer * layer_rows * D;
    float *ks = pool_i8 ? a.k_scales.as<float>() + layer * layer_rows : nullptr,
          *vs = pool_i8 ? a.v_scales.as<float>() + layer * layer_rows : nullptr;
    const int64_t tasks = static_cast<int64_t>(segs.size()) * N;
    parallel(kernel_threads(), [&](int t, int nt) {
      int64_t i0, i1;
      thread_range(tasks, 1, t, nt, &i0, &i1);
      std::vector<float> buf(static_cast<size_t>(keys + 2 * D));  // scores, then a widened key and value row
      float *p = buf.data(), *kbuf = p + keys, *vbuf = kbuf + D;
      for (int64_t i = i0; i < i1; ++i) {
        const Segment &g = segs[i / N];
        const int64_t hd = i % N;
        Elem *kh = kp + hd * bs * D, *vh = vp + hd * bs * D;  // head hd of block 0
        float *ksh = ks ? ks + hd * bs : nullptr, *vsh = vs ? vs + hd * bs : nullptr;
        for (int64_t j = 0; j < g.count; ++j) {
          const int64_t row = (g.first + j) * H + hd * D, pos = g.pos + j;
          if (rope) {
            rope_half(q + row, cos_table + pos * D, sin_table + pos * D, D, q + row);
            rope_half(k + row, cos_table + pos * D, sin_table + pos * D, D, k + row);
          }
          store_row(k + row, D, g.at[pos], kh, ksh);
          store_row(v + row, D, g.at[pos], vh, vsh);
        }
        const PoolRows<Elem> rows{kh, vh, ksh, vsh, g.at, D, kbuf, vbuf};
        const PagedKeys seen{rope ? 0.f : slopes[hd]};
        for (int64_t j = 0; j < g.count; ++j) {
          const int64_t row = (g.first + j) * H + hd * D;
          attend_query(q + row, rows, D, g.pos + j, seen, scale, p, att + row);
        }
      }
    });
  };
  auto attend = [&](int64_t layer, float *q, float *k, const float *v, float *att) {
    if (pool_f32) attend_in(float(0), layer, q, k, v, att);
    else if (pool_bf16) attend_in(uint16_t(0), layer, q, k, v, att);
    else attend_in(int8_t(0), layer, q, k, v, att);
  };
  LayerScratch s(T, H, sp.I);
  memcpy(s.x, a.x.as<const float>(), sizeof(float) * T * H);
  if (Status err = run_layers(a.w, sp, eps, s, attend)) return err;
  if (R == 0) return kOk;
  std::vector<float> normed(static_cast<size_t>(R * H));  // the final RMSNorm of the out_rows (any may repeat)
  for (int64_t r = 0; r < R; ++r) rms_norm_rows(s.x + out_rows[r] * H, a.norm.as<const float>(), eps, 1, H,
                                                normed.data() + r * H);
  head.x = normed.data();
  head.y = a.y.as<float>();
  return project(a.w.head_fmt, &head, 1);
}

}  // namespace

extern "C" {
int PagedStackLogits(AOT_PARAMS) { return paged_stack(AOT_CALL); }
}  // extern "C"
