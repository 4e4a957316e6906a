/* K-quants (Q2_K..Q6_K), IQ4_NL, IQ4_XS and the Q8_256 activation: owned by the K-quant work.
 * Conventions: quants_common.h. Register each type in quants_impl.h's table by defining
 * QK_HAVE_<TYPE> (QK_HAVE_Q4_K, ..., QK_HAVE_IQ4_XS) here once its qk_dequant_<type> and
 * qk_dot_<type> exist, and QK_HAVE_Q8_256 once qk_quantize_q8_256 does. */
#ifndef QPACK_QUANTS_K_H
#define QPACK_QUANTS_K_H

#include "quants_common.h"

#endif
