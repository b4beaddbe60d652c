// What a query of attention sees and what is added to its scores: the two descriptions attend_query
// (attention.inc, the one definition of attention) takes, one per caller.
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

}  // namespace
