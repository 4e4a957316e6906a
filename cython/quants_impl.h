/* Implementation of quants.h (to be written). */
