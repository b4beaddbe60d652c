// The model library's calls into the chosen instruction-set path (model_isa.inc compiled in each ISA namespace).
#pragma once
#include "isa_select.h"
#include "thread_pool.h"

namespace {

// nw projections of one x (ps[i].x equal) on the chosen path and the kernels' threads.
Status project(Fmt fmt, const Problem *ps, int nw) { ON_CHOSEN_ISA(run(fmt, ps, nw, kernel_threads()), return kNoPath) }

// The callers below run only after a check that a path exists (a projection ran, or the entry checked).
void silu_mul(float *g, const float *u, int64_t n) { ON_CHOSEN_ISA(silu_mul(g, u, n), return) }

template <class Keys, class Rows>
void attend_query(const float *q, const Rows &rows, int64_t D, int64_t last, const Keys &keys, float scale, float *p,
                  float *out) {
  ON_CHOSEN_ISA(attend_query(q, rows, D, last, keys, scale, p, out), return)
}

}  // namespace
