# Python-facing wrappers of quants.h (owned by the kernels work).
# quants.h's C API (qk_traits, qk_get_traits, qk_act_row_bytes, qk_quantize_act) is declared
# once in native.pxi, shared with model.pxi: use those declarations, do not redeclare them.
