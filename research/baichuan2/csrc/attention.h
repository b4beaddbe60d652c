// What attend_query (attention.inc, the one definition of attention) takes besides the query: what a query sees and
// what is added to its scores (MaskedKeys, BiasedKeys, PagedKeys), and where the key / value rows live (CacheRows,
// PoolRows).
#pragma once
#include "common.h"

namespace {

// The whole-stack op's: from the attention mask, and ALiBi's distances (slope 0 with RoPE). Padding and empty slots
// are not seen; the query (in slot `last`) always sees itself; bias_l = slope (pos_l - pos_query).
struct MaskedKeys {
  const uint8_t *real;  // per slot: 1 = holds a real token
  const int64_t *pos;   // per slot: the key's position
  float slope;
  __attribute__((always_inline)) bool sees(int64_t l, int64_t last) const { return real[l] || l == last; }
  __attribute__((always_inline)) float bias(int64_t l, int64_t last) const {
    return slope * static_cast<float>(pos[l] - pos[last]);
  }
};

// DecodeAttention's: every slot seen, an additive bias per slot (masked ones very negative).
struct BiasedKeys {
  const float *add;
  __attribute__((always_inline)) bool sees(int64_t, int64_t) const { return true; }
  __attribute__((always_inline)) float bias(int64_t l, int64_t) const { return add[l]; }
};

// PagedStack's: keys are positions, the query (at position `last`) sees every one up to its own; ALiBi's
// bias_l = slope (l - last) (slope 0 with RoPE).
struct PagedKeys {
  float slope;
  __attribute__((always_inline)) bool sees(int64_t, int64_t) const { return true; }
  __attribute__((always_inline)) float bias(int64_t l, int64_t last) const {
    return slope * static_cast<float>(l - last);
  }
};

// Contiguous float32 rows of one head: key l at k + l D.
struct CacheRows {
  const float *k, *v;
  int64_t D;
  __attribute__((always_inline)) const float *key(int64_t l) const { return k + l * D; }
  __attribute__((always_inline)) const float *value(int64_t l) const { return v + l * D; }
};

// One head's rows of one sequence in a block pool of element type T (float, bfloat16 bits, int8): position l is
// pool row at[l] (block * N * bs + row in the block; paged_stack.h computes them once a call), at element at[l] D
// of k / v, which point at this head's rows of the layer's block 0; int8 rows have a scale each (ks / vs, at at[l]
// the same way). attend_query's paged overload (attention.inc) reads every format where it is and keeps q and its
// output in kbuf / vbuf (D floats each, the caller's per thread); key() / value() below serve the generic loop
// (D not a multiple of 2W): float rows where they are, the others widened into kbuf / vbuf.
template <class T>
struct PoolRows {
  const T *k, *v;
  const float *ks, *vs;  // int8: the scales (else unused)
  const int64_t *at;     // per position: its pool row
  int64_t D;
  float *kbuf, *vbuf;

  __attribute__((always_inline)) const float *key(int64_t l) const { return row(k, ks, at[l], kbuf); }
  __attribute__((always_inline)) const float *value(int64_t l) const { return row(v, vs, at[l], vbuf); }
  __attribute__((always_inline)) const float *row(const T *pool, const float *scales, int64_t at, float *buf) const {
    const T *r = pool + at * D;
    if constexpr (std::is_same<T, float>::value) {
      return r;
    } else if constexpr (std::is_same<T, uint16_t>::value) {  // bfloat16: the high half of a float32
      typedef uint32_t bits32 __attribute__((may_alias));      // written as bits, read as floats: one vector loop
      bits32 *out = reinterpret_cast<bits32 *>(buf);
      const int64_t n = D;  // a local: stores through bits32 may alias the member
      for (int64_t d = 0; d < n; ++d) out[d] = static_cast<uint32_t>(r[d]) << 16;
      return buf;
    } else {
      const float s = scales[at];
      for (int64_t d = 0; d < D; ++d) buf[d] = s * static_cast<float>(r[d]);
      return buf;
    }
  }
};

}  // namespace
