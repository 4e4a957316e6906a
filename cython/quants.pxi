# Python-facing wrappers of quants.h (owned by the kernels work).
