/* What the 256-element files (k_q4q5.h, q6_k.h, q2q3_k.h, iq4.h's IQ4_XS) share: the
 * super-block size and the scalar building blocks of their reference dots. Their blocks are
 * structs of bytes only, so a block may sit at any address. */
#ifndef QPACK_TYPES_K_COMMON_H
#define QPACK_TYPES_K_COMMON_H

#include "../panel.h"

#define QK_SUPER 256 /* elements per super-block */

_Static_assert(sizeof(qk_act_q8_256) == 308, "Q8_256 activation block");

/* The portable code unpacks one super-block into int8 q[256] in element order, then works
 * per group with plain loops (which compilers vectorize even for baseline SSE2). */
static inline int32_t qk_k_dot_i8(const int8_t *restrict q, const int8_t *restrict a, int len) {
    int32_t s = 0;
    for (int l = 0; l < len; l++) s += q[l] * a[l];
    return s;
}

#endif
