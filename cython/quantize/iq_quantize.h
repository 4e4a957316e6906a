/* Quantizers for the grid ("importance") types: IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S,
 * IQ1_M. The algorithms are ggml's (ggml-quants.c's quantize_row_iq*_impl: the facts, written
 * anew): per group of 8 (IQ2, IQ1) or 4 (IQ3) elements, quantize |x| to levels 0..kMaxQ-1 of
 * the lattice and, when that point is not a grid row, take the grid row nearest in the weighted
 * sense among precomputed neighbours of the point; a scale search around max/(2 kMaxQ - 1); the
 * IQ1 types search the two thresholds that split a block into -1, 0, +1 exhaustively. Weights
 * are imatrix * sqrt(sigma2 + x^2), as llama.cpp's imatrix quantization.
 *
 * Block layouts: cython/types/iq1.h, iq2.h, iq3.h. Grids: cython/types/iq_tables.h (values as
 * stored); here each grid row is re-expressed as lattice levels l (position 2 l + 1), and
 * `map` sends a point of the lattice (levels packed 2 or 3 bits each) to its grid row, or to its
 * neighbour list: the grid rows at the nwant smallest squared distances, ordered by (distance,
 * row), as ggml's iq2xs_init_impl / iq3xs_init_impl build them.
 *
 * Only plain C: this module is compiled once (setup.py's generic flags), not per CPU level.
 */
#ifndef QPACK_IQ_QUANTIZE_H
#define QPACK_IQ_QUANTIZE_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "quants_common.h"
#include "types/iq_tables.h"

enum { QQ_IQ2_XXS, QQ_IQ2_XS, QQ_IQ2_S, QQ_IQ3_XXS, QQ_IQ3_S, QQ_IQ1_S, QQ_IQ1_M, QQ_N_TYPES };
enum { QQ_GRID_IQ2XXS, QQ_GRID_IQ2XS, QQ_GRID_IQ2S, QQ_GRID_IQ1S, QQ_GRID_IQ3XXS, QQ_GRID_IQ3S, QQ_N_GRIDS };

#define QQ_QK 256
#define QQ_IQ1_DELTA 0.125f

typedef struct {
    int size;            /* grid rows */
    int dims;            /* 8 or 4 elements per row */
    int bits;            /* bits per level in a lattice index: 2 or 3 */
    int8_t *pos;         /* size * dims: 2 l + 1 */
    int *map;            /* lattice index -> row (>= 0) or -(offset + 1) into neighbours */
    uint16_t *neighbours;/* at offset: count, then that many rows */
} qq_grid;

static qq_grid qq_grids[QQ_N_GRIDS];

static inline int qq_nearest_int(float f) {
    /* round half to even for |f| < 2^22, as ggml's nearest_int */
    float v = f + 12582912.f;
    int32_t i;
    memcpy(&i, &v, 4);
    return (i & 0x007fffff) - 0x00400000;
}

static inline int qq_clamp(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

static inline void qq_put_u16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static inline void qq_put_u32(uint8_t *p, uint32_t v) {
    for (int k = 0; k < 4; k++) p[k] = (uint8_t)(v >> (8 * k));
}

/* The level l of each stored grid value, per grid (-1: not a level). */
static void qq_levels_of(int g, int8_t lv[256]) {
    static const int iq2[3] = {8, 25, 43}, iq3xxs[8] = {4, 12, 20, 28, 36, 44, 52, 62};
    memset(lv, -1, 256);
    switch (g) {
    case QQ_GRID_IQ2XXS: case QQ_GRID_IQ2XS: case QQ_GRID_IQ2S:
        for (int l = 0; l < 3; l++) lv[iq2[l]] = (int8_t)l;
        break;
    case QQ_GRID_IQ1S:
        for (int l = 0; l < 3; l++) lv[l] = (int8_t)l; /* stored g + 1 */
        break;
    case QQ_GRID_IQ3XXS:
        for (int l = 0; l < 8; l++) lv[iq3xxs[l]] = (int8_t)l;
        break;
    default: /* IQ3S: odd values 1..15 */
        for (int l = 0; l < 8; l++) lv[2 * l + 1] = (int8_t)l;
    }
}

static uint64_t qq_stored_row(int g, int j) {
    switch (g) {
    case QQ_GRID_IQ2XXS: return qk_iq2xxs_grid[j];
    case QQ_GRID_IQ2XS: return qk_iq2xs_grid[j];
    case QQ_GRID_IQ2S: return qk_iq2s_grid[j];
    case QQ_GRID_IQ1S: return qk_iq1s_grid_p1[j];
    case QQ_GRID_IQ3XXS: return qk_iq3xxs_grid[j];
    default: return qk_iq3s_grid[j];
    }
}

/* Builds grid g's levels, map and neighbour lists (once; the caller serialises calls).
 * Returns 0, or -1 when out of memory or a grid value is not a level (a corrupt table). */
static int qq_prepare_grid(int g) {
    static const int sizes[QQ_N_GRIDS] = {256, 512, 1024, 2048, 256, 512};
    static const int nwants[QQ_N_GRIDS] = {2, 2, 1, 3, 2, 3};
    qq_grid *G = &qq_grids[g];
    if (G->map) return 0;
    const int size = sizes[g], dims = g >= QQ_GRID_IQ3XXS ? 4 : 8, bits = dims == 8 ? 2 : 3;
    const int kmap_size = dims == 8 ? 43692 : 4096, nwant = nwants[g];
    const int max_level = bits == 2 ? 2 : 7; /* the quantizers never produce a level of 3 in 2 bits */
    int8_t lv[256];
    qq_levels_of(g, lv);
    int8_t *pos = malloc((size_t)size * dims);
    int *map = malloc(sizeof(int) * kmap_size);
    int *d2 = malloc(sizeof(int) * size);
    size_t cap = 1 << 16, used = 0;
    uint16_t *nb = malloc(cap * sizeof(uint16_t));
    if (!pos || !map || !d2 || !nb) goto fail;
    for (int i = 0; i < kmap_size; i++) map[i] = -1;
    for (int j = 0; j < size; j++) {
        const uint64_t row = qq_stored_row(g, j);
        int index = 0;
        for (int k = 0; k < dims; k++) {
            const int l = lv[(row >> (8 * k)) & 0xff];
            if (l < 0) goto fail;
            pos[j * dims + k] = (int8_t)(2 * l + 1);
            index |= l << (bits * k);
        }
        map[index] = j;
    }
    for (int i = 0; i < kmap_size; i++) {
        if (map[i] >= 0) continue;
        int8_t p[8];
        int valid = 1;
        for (int k = 0; k < dims; k++) {
            const int l = (i >> (bits * k)) & ((1 << bits) - 1);
            valid &= l <= max_level;
            p[k] = (int8_t)(2 * l + 1);
        }
        if (!valid) continue; /* stays -1: never looked up */
        int best[3] = {INT32_MAX, INT32_MAX, INT32_MAX}; /* the nwant smallest distinct d2 */
        for (int j = 0; j < size; j++) {
            int s = 0;
            for (int k = 0; k < dims; k++) {
                const int t = pos[j * dims + k] - p[k];
                s += t * t;
            }
            d2[j] = s;
            for (int w = 0; w < nwant; w++) {
                if (s == best[w]) break;
                if (s < best[w]) {
                    for (int v = nwant - 1; v > w; v--) best[v] = best[v - 1];
                    best[w] = s;
                    break;
                }
            }
        }
        int n = 0;
        for (int w = 0; w < nwant && best[w] != INT32_MAX; w++)
            for (int j = 0; j < size; j++) n += d2[j] == best[w];
        if (used + n + 1 > cap) {
            while (used + n + 1 > cap) cap *= 2;
            uint16_t *bigger = realloc(nb, cap * sizeof(uint16_t));
            if (!bigger) goto fail;
            nb = bigger;
        }
        map[i] = -(int)(used + 1);
        nb[used++] = (uint16_t)n;
        for (int w = 0; w < nwant && best[w] != INT32_MAX; w++)
            for (int j = 0; j < size; j++)
                if (d2[j] == best[w]) nb[used++] = (uint16_t)j;
    }
    free(d2);
    G->size = size;
    G->dims = dims;
    G->bits = bits;
    G->pos = pos;
    G->neighbours = nb;
    G->map = map; /* last: a non-NULL map means ready */
    return 0;
fail:
    free(pos);
    free(map);
    free(d2);
    free(nb);
    return -1;
}

static inline int qq_index(const qq_grid *G, const int8_t *L) {
    int u = 0;
    for (int k = 0; k < G->dims; k++) u |= L[k] << (G->bits * k);
    return u;
}

static inline const uint16_t *qq_neighbours(const qq_grid *G, int u) {
    return G->neighbours + (-G->map[u] - 1);
}

/* The neighbour row nearest to xval (weighted squared error at `scale`); its levels into L. */
static int qq_best_neighbour(const qq_grid *G, const uint16_t *nb, const float *xval, const float *w,
                             float scale, int8_t *L) {
    float best = FLT_MAX;
    int row = nb[1];
    for (int j = 1; j <= nb[0]; j++) {
        const int8_t *pg = G->pos + nb[j] * G->dims;
        float d2 = 0;
        for (int i = 0; i < G->dims; i++) {
            const float diff = scale * pg[i] - xval[i];
            d2 += w[i] * diff * diff;
        }
        if (d2 < best) {
            best = d2;
            row = nb[j];
        }
    }
    const int8_t *pg = G->pos + row * G->dims;
    for (int i = 0; i < G->dims; i++) L[i] = (int8_t)((pg[i] - 1) / 2);
    return row;
}

/* The grid row of levels L, replacing L by the nearest neighbour row when L is off the grid. */
static inline int qq_snap(const qq_grid *G, const float *xval, const float *waux, float scale, int8_t *L,
                          int *on_grid) {
    const int u = qq_index(G, L);
    int row = G->map[u];
    *on_grid = row >= 0;
    if (row < 0) row = qq_best_neighbour(G, qq_neighbours(G, u), xval, waux, scale, L);
    return row;
}

/* ggml's make_qp_quants: non-negative levels 0..nmax for x >= 0, weighted; returns the scale. */
static float qq_make_qp_quants(int n, int nmax, const float *x, uint8_t *L, const float *w) {
    float max = 0;
    for (int i = 0; i < n; i++) max = x[i] > max ? x[i] : max;
    if (max < 1e-15f) {
        memset(L, 0, n);
        return 0.f;
    }
    float iscale = nmax / max;
    for (int i = 0; i < n; i++) L[i] = (uint8_t)qq_nearest_int(iscale * x[i]);
    float scale = 1 / iscale, best_mse = 0;
    for (int i = 0; i < n; i++) {
        const float diff = x[i] - scale * L[i];
        best_mse += w[i] * diff * diff;
    }
    for (int is = -4; is <= 4; is++) {
        if (is == 0) continue;
        const float iscale_is = (0.1f * is + nmax) / max, scale_is = 1 / iscale_is;
        float mse = 0;
        for (int i = 0; i < n; i++) {
            int l = qq_nearest_int(iscale_is * x[i]);
            l = l < nmax ? l : nmax;
            const float diff = x[i] - scale_is * l;
            mse += w[i] * diff * diff;
        }
        if (mse < best_mse) {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; i++) {
        int l = qq_nearest_int(iscale * x[i]);
        l = l < nmax ? l : nmax;
        L[i] = (uint8_t)l;
        sumlx += w[i] * x[i] * l;
        suml2 += w[i] * l * l;
    }
    for (int itry = 0; itry < 5; itry++) {
        int changed = 0;
        for (int i = 0; i < n; i++) {
            float slx = sumlx - w[i] * x[i] * L[i], sl2 = suml2 - w[i] * L[i] * L[i];
            if (slx > 0 && sl2 > 0) {
                int nl = qq_nearest_int(x[i] * sl2 / slx);
                nl = nl < nmax ? nl : nmax;
                if (nl != L[i]) {
                    slx += w[i] * x[i] * nl;
                    sl2 += w[i] * nl * nl;
                    if (slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (uint8_t)nl;
                        sumlx = slx;
                        suml2 = sl2;
                        changed++;
                    }
                }
            }
        }
        if (!changed) break;
    }
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* |x| into xval and the sign bits of each group of 8; with `parity`, an odd count of negatives
 * is made even by flipping the sign of the element that costs least (the stored 7 sign bits
 * imply the eighth). */
static void qq_signs(int n, const float *xb, const float *weight, int parity, float *xval, uint8_t *signs) {
    for (int k = 0; k < n / 8; k++) {
        int nflip = 0;
        uint8_t s = 0;
        for (int i = 0; i < 8; i++) {
            const float v = xb[8 * k + i];
            xval[8 * k + i] = v >= 0 ? v : -v;
            if (v < 0) {
                nflip++;
                s |= (uint8_t)(1 << i);
            }
        }
        if (parity && nflip % 2) {
            int imin = 0;
            float min = weight[8 * k] * xb[8 * k] * xb[8 * k];
            for (int i = 1; i < 8; i++) {
                const float ax = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i];
                if (ax < min) {
                    min = ax;
                    imin = i;
                }
            }
            xval[8 * k + imin] = -xval[8 * k + imin];
            s ^= (uint8_t)(1 << imin);
        }
        signs[k] = parity ? (uint8_t)(s & 127) : s;
    }
}

static void qq_weights(int n, const float *xb, const float *qw, float sigma2, float *weight) {
    for (int i = 0; i < n; i++) weight[i] = qw[i] * sqrtf(sigma2 + xb[i] * xb[i]);
}

static void qq_fit(int n, const float *weight, const float *xval, const int8_t *L, float *sumqx, float *sumq2) {
    float a = 0, b = 0;
    for (int i = 0; i < n; i++) {
        const float q = 2 * L[i] + 1;
        a += weight[i] * xval[i] * q;
        b += weight[i] * q * q;
    }
    *sumqx = a;
    *sumq2 = b;
}

/* The shared scale search of IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S over one block of n elements:
 * candidate inverse scales (2 kMaxQ - 1 + is * step) / max for is in -nsteps..nsteps, each
 * snapped to the grid; then groups left off the grid by the best candidate are snapped again at
 * the final scale (all groups with `resnap_all`). Returns the scale, levels in L. */
static float qq_grid_search(const qq_grid *G, int n, int kmaxq, int nsteps, float step, int resnap_all,
                            const float *xval, const float *weight, const float *waux, int8_t *L) {
    int8_t Laux[32];
    int on[8], on_aux[8];
    const int dims = G->dims, ng = n / dims;
    float max = xval[0];
    for (int i = 1; i < n; i++) max = xval[i] > max ? xval[i] : max;
    float best = 0, scale = max / (2 * kmaxq - 1);
    for (int k = 0; k < ng; k++) on[k] = !resnap_all;
    for (int is = -nsteps; is <= nsteps; is++) {
        const float id = (2 * kmaxq - 1 + is * step) / max, this_scale = 1 / id;
        for (int k = 0; k < ng; k++) {
            for (int i = 0; i < dims; i++)
                Laux[dims * k + i] = (int8_t)qq_clamp(qq_nearest_int(0.5f * (id * xval[dims * k + i] - 1)), 0, kmaxq - 1);
            qq_snap(G, xval + dims * k, waux + dims * k, this_scale, Laux + dims * k, &on_aux[k]);
        }
        float sumqx, sumq2;
        qq_fit(n, weight, xval, Laux, &sumqx, &sumq2);
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
            scale = sumqx / sumq2;
            best = scale * sumqx;
            memcpy(L, Laux, n);
            memcpy(on, on_aux, sizeof(int) * ng);
        }
    }
    int off = 0;
    for (int k = 0; k < ng; k++) off += !on[k];
    if (off > 0 && scale > 0) {
        const float id = 1 / scale;
        for (int k = 0; k < ng; k++) {
            if (on[k] && !resnap_all) continue;
            for (int i = 0; i < dims; i++)
                L[dims * k + i] = (int8_t)qq_clamp(qq_nearest_int(0.5f * (id * xval[dims * k + i] - 1)), 0, kmaxq - 1);
            int ignored;
            qq_snap(G, xval + dims * k, waux + dims * k, scale, L + dims * k, &ignored);
        }
        float sumqx, sumq2;
        qq_fit(n, weight, xval, L, &sumqx, &sumq2);
        if (sumq2 > 0) scale = sumqx / sumq2;
    }
    return scale;
}

/* ---------------------------------------------------------------- IQ2_XXS (66 bytes / 256) */

static void qq_iq2_xxs_row(const float *x, uint8_t *y, int64_t n, const float *qw) {
    const qq_grid *G = &qq_grids[QQ_GRID_IQ2XXS];
    const int kmaxq = 3;
    float scales[8], weight[32], xval[32], waux[32];
    int8_t L[32], Laux[32];
    uint8_t signs[4];
    for (int64_t ibl = 0; ibl < n / QQ_QK; ibl++, y += 66) {
        const float *xbl = x + QQ_QK * ibl;
        uint32_t q2[16] = {0};
        float max_scale = 0, sumx2 = 0;
        for (int i = 0; i < QQ_QK; i++) sumx2 += xbl[i] * xbl[i];
        const float sigma2 = sumx2 / QQ_QK;
        for (int ib = 0; ib < 8; ib++) {
            const float *xb = xbl + 32 * ib;
            qq_weights(32, xb, qw + QQ_QK * ibl + 32 * ib, sigma2, weight);
            for (int i = 0; i < 32; i++) waux[i] = sqrtf(weight[i]);
            qq_signs(32, xb, weight, 1, xval, signs);
            float max = xval[0];
            for (int i = 1; i < 32; i++) max = xval[i] > max ? xval[i] : max;
            scales[ib] = 0;
            if (max < 1e-15f) continue;
            float scale = qq_make_qp_quants(32, kmaxq + 1, xval, (uint8_t *)L, weight);
            const float eff_max = scale * kmaxq;
            if (eff_max <= 0) continue;
            float best = 0;
            int on;
            for (int is = -6; is <= 6; is++) {
                const float id = (2 * kmaxq - 1 + is * 0.1f) / eff_max, this_scale = 1 / id;
                for (int k = 0; k < 4; k++) {
                    for (int i = 0; i < 8; i++)
                        Laux[8 * k + i] = (int8_t)qq_clamp(qq_nearest_int(0.5f * (id * xval[8 * k + i] - 1)), 0, kmaxq - 1);
                    qq_snap(G, xval + 8 * k, waux + 8 * k, this_scale, Laux + 8 * k, &on);
                }
                float sumqx, sumq2;
                qq_fit(32, weight, xval, Laux, &sumqx, &sumq2);
                if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
                    scale = sumqx / sumq2;
                    best = scale * sumqx;
                    memcpy(L, Laux, 32);
                }
            }
            if (scale > 0) {
                const float id = 1 / scale;
                for (int k = 0; k < 4; k++) {
                    for (int i = 0; i < 8; i++)
                        L[8 * k + i] = (int8_t)qq_clamp(qq_nearest_int(0.5f * (id * xval[8 * k + i] - 1)), 0, kmaxq - 1);
                    qq_snap(G, xval + 8 * k, waux + 8 * k, scale, L + 8 * k, &on);
                }
                float sumqx, sumq2;
                qq_fit(32, weight, xval, L, &sumqx, &sumq2);
                if (sumq2 > 0) scale = sumqx / sumq2;
            }
            if (scale < 0) { /* never expected: the scale is stored unsigned, so flip the signs */
                scale = -scale;
                for (int k = 0; k < 4; k++) signs[k] = (uint8_t)(~signs[k] & 127);
            }
            for (int k = 0; k < 4; k++) {
                q2[2 * ib] |= (uint32_t)G->map[qq_index(G, L + 8 * k)] << (8 * k);
                q2[2 * ib + 1] |= (uint32_t)signs[k] << (7 * k);
            }
            scales[ib] = scale;
            max_scale = scale > max_scale ? scale : max_scale;
        }
        memset(y, 0, 66);
        if (max_scale == 0) continue;
        const float d = max_scale / 31, id = 1 / d;
        qq_put_u16(y, qk_fp32_to_fp16(d));
        for (int ib = 0; ib < 8; ib++) {
            const int l = qq_clamp(qq_nearest_int(0.5f * (id * scales[ib] - 1)), 0, 15);
            q2[2 * ib + 1] |= (uint32_t)l << 28;
        }
        for (int j = 0; j < 16; j++) qq_put_u32(y + 2 + 4 * j, q2[j]);
    }
}

/* ---------------------------------------------------------------- IQ2_XS (74) and IQ2_S (82) */

static void qq_iq2_xs_s_row(int is_s, const float *x, uint8_t *y, int64_t n, const float *qw) {
    const qq_grid *G = &qq_grids[is_s ? QQ_GRID_IQ2S : QQ_GRID_IQ2XS];
    const int bytes = is_s ? 82 : 74;
    float scales[16], weight[16], xval[16], waux[16];
    int8_t L[16];
    uint8_t signs[2];
    for (int64_t ibl = 0; ibl < n / QQ_QK; ibl++, y += bytes) {
        const float *xbl = x + QQ_QK * ibl;
        memset(y, 0, bytes);
        float max_scale = 0, sumx2 = 0;
        for (int i = 0; i < QQ_QK; i++) sumx2 += xbl[i] * xbl[i];
        const float sigma2 = (is_s ? 2 * sumx2 : sumx2) / QQ_QK;
        for (int ib = 0; ib < 16; ib++) {
            const float *xb = xbl + 16 * ib;
            if (qw) qq_weights(16, xb, qw + QQ_QK * ibl + 16 * ib, sigma2, weight);
            else
                for (int i = 0; i < 16; i++) weight[i] = 0.25f * sigma2 + xb[i] * xb[i];
            for (int i = 0; i < 16; i++) waux[i] = sqrtf(weight[i]);
            qq_signs(16, xb, weight, !is_s, xval, signs);
            float max = xval[0];
            for (int i = 1; i < 16; i++) max = xval[i] > max ? xval[i] : max;
            scales[ib] = 0;
            memset(L, 0, 16);
            if (max < (is_s ? 1e-8f : 1e-15f)) continue;
            float scale = qq_grid_search(G, 16, 3, 9, 0.1f, 0, xval, weight, waux, L);
            if (scale < 0) {
                scale = -scale;
                for (int k = 0; k < 2; k++) signs[k] = (uint8_t)(is_s ? ~signs[k] : ~signs[k] & 127);
            }
            for (int k = 0; k < 2; k++) {
                const int row = G->map[qq_index(G, L + 8 * k)], i8 = 2 * ib + k;
                if (is_s) {
                    y[2 + i8] = (uint8_t)(row & 255);
                    y[2 + 32 + i8] = signs[k];
                    y[2 + 64 + i8 / 4] |= (uint8_t)((row >> 8) << (2 * (i8 % 4)));
                } else {
                    qq_put_u16(y + 2 + 2 * i8, (uint16_t)(row | (signs[k] << 9)));
                }
            }
            scales[ib] = scale;
            max_scale = scale > max_scale ? scale : max_scale;
        }
        if (max_scale == 0) continue;
        const float d = max_scale / 31, id = 1 / d;
        qq_put_u16(y, qk_fp32_to_fp16(is_s ? d * 0.9875f : d));
        uint8_t *sc = y + bytes - 8;
        for (int ib = 0; ib < 16; ib++) {
            const int l = qq_clamp(qq_nearest_int(0.5f * (id * scales[ib] - 1)), 0, 15);
            sc[ib / 2] |= (uint8_t)(l << (4 * (ib % 2)));
        }
    }
}

/* ---------------------------------------------------------------- IQ3_XXS (98) and IQ3_S (110) */

static void qq_iq3_row(int is_s, const float *x, uint8_t *y, int64_t n, const float *qw) {
    const qq_grid *G = &qq_grids[is_s ? QQ_GRID_IQ3S : QQ_GRID_IQ3XXS];
    const int bytes = is_s ? 110 : 98;
    float scales[8], weight[32], xval[32], waux[32];
    int8_t L[32];
    uint8_t signs[4];
    for (int64_t ibl = 0; ibl < n / QQ_QK; ibl++, y += bytes) {
        const float *xbl = x + QQ_QK * ibl;
        memset(y, 0, bytes);
        float max_scale = 0, sumx2 = 0;
        for (int i = 0; i < QQ_QK; i++) sumx2 += xbl[i] * xbl[i];
        const float sigma2 = 2 * sumx2 / QQ_QK;
        uint32_t sas[8] = {0};
        for (int ib = 0; ib < 8; ib++) {
            const float *xb = xbl + 32 * ib;
            if (qw) qq_weights(32, xb, qw + QQ_QK * ibl + 32 * ib, sigma2, weight);
            else
                for (int i = 0; i < 32; i++) weight[i] = xb[i] * xb[i];
            for (int i = 0; i < 32; i++) waux[i] = sqrtf(weight[i]);
            qq_signs(32, xb, weight, !is_s, xval, signs);
            float max = xval[0];
            for (int i = 1; i < 32; i++) max = xval[i] > max ? xval[i] : max;
            scales[ib] = 0;
            memset(L, 0, 32);
            if (is_s ? max == 0 : max < 1e-8f) continue;
            float scale = is_s ? qq_grid_search(G, 32, 8, 9, 0.2f, 1, xval, weight, waux, L)
                               : qq_grid_search(G, 32, 8, 15, 0.2f, 0, xval, weight, waux, L);
            if (scale < 0) {
                scale = -scale;
                for (int k = 0; k < 4; k++) signs[k] = (uint8_t)(is_s ? ~signs[k] : ~signs[k] & 127);
            }
            for (int k = 0; k < 8; k++) {
                const int row = G->map[qq_index(G, L + 4 * k)];
                y[2 + 8 * ib + k] = (uint8_t)(row & 255);
                if (is_s) y[2 + 64 + ib] |= (uint8_t)((row >> 8) << k);
            }
            if (is_s) memcpy(y + 2 + 64 + 8 + 4 * ib, signs, 4);
            else sas[ib] = signs[0] | (signs[1] << 7) | (signs[2] << 14) | ((uint32_t)signs[3] << 21);
            scales[ib] = scale;
            max_scale = scale > max_scale ? scale : max_scale;
        }
        if (max_scale == 0) continue;
        const float d = max_scale / 31, id = 1 / d;
        qq_put_u16(y, qk_fp32_to_fp16(d * (is_s ? 1.033f : 1.0125f)));
        for (int ib = 0; ib < 8; ib++) {
            const int l = qq_clamp(qq_nearest_int(0.5f * (id * scales[ib] - 1)), 0, 15);
            if (is_s) y[2 + 64 + 8 + 32 + ib / 2] |= (uint8_t)(l << (4 * (ib % 2)));
            else sas[ib] |= (uint32_t)l << 28;
        }
        if (!is_s)
            for (int ib = 0; ib < 8; ib++) qq_put_u32(y + 2 + 64 + 4 * ib, sas[ib]);
    }
}

/* ---------------------------------------------------------------- IQ1_S (50) and IQ1_M (56) */

/* Elements of a block sorted by value (ties by position): insertion sort, n <= 32. */
static void qq_sort_by_value(int n, const float *xb, int *idx) {
    for (int j = 0; j < n; j++) {
        int i = j;
        while (i > 0 && xb[idx[i - 1]] > xb[j]) {
            idx[i] = idx[i - 1];
            i--;
        }
        idx[i] = j;
    }
}

/* The neighbour row nearest to xb at `scale` with the row's levels valued xx[l]. */
static int qq_iq1_best_neighbour(const qq_grid *G, const uint16_t *nb, const float *xb, const float *w,
                                 float scale, const float *xx, int8_t *L) {
    float best = FLT_MAX;
    int row = nb[1];
    for (int j = 1; j <= nb[0]; j++) {
        const int8_t *pg = G->pos + nb[j] * 8;
        float d2 = 0;
        for (int i = 0; i < 8; i++) {
            const float diff = scale * xx[(pg[i] - 1) / 2] - xb[i];
            d2 += w[i] * diff * diff;
        }
        if (d2 < best) {
            best = d2;
            row = nb[j];
        }
    }
    const int8_t *pg = G->pos + row * 8;
    for (int i = 0; i < 8; i++) L[i] = (int8_t)((pg[i] - 1) / 2);
    return row;
}

/* Rows of a block of n = 8 ng after the threshold search: snap each group of levels L to the
 * grid (values xx_of[k][l]) and refit the scale when one was off it. */
static float qq_iq1_snap(const qq_grid *G, int ng, const float *xb, const float *weight, float scale,
                         const float *const *xx_of, int8_t *L, int *rows) {
    int all_on = 1;
    for (int k = 0; k < ng; k++) {
        const int u = qq_index(G, L + 8 * k);
        int row = G->map[u];
        if (row < 0) {
            all_on = 0;
            row = qq_iq1_best_neighbour(G, qq_neighbours(G, u), xb + 8 * k, weight + 8 * k, scale, xx_of[k], L + 8 * k);
        }
        rows[k] = row;
    }
    if (!all_on) {
        float sumqx = 0, sumq2 = 0;
        for (int k = 0; k < ng; k++) {
            const int8_t *pg = G->pos + rows[k] * 8;
            for (int j = 0; j < 8; j++) {
                const float w = weight[8 * k + j], q = xx_of[k][(pg[j] - 1) / 2];
                sumqx += w * q * xb[8 * k + j];
                sumq2 += w * q * q;
            }
        }
        if (sumqx > 0 && sumq2 > 0) scale = sumqx / sumq2;
    }
    return scale;
}

static void qq_iq1_s_row(const float *x, uint8_t *y, int64_t n, const float *qw) {
    const qq_grid *G = &qq_grids[QQ_GRID_IQ1S];
    static const float x_p[3] = {-1 + QQ_IQ1_DELTA, QQ_IQ1_DELTA, 1 + QQ_IQ1_DELTA};
    static const float x_m[3] = {-1 - QQ_IQ1_DELTA, -QQ_IQ1_DELTA, 1 - QQ_IQ1_DELTA};
    float scales[8], weight[32], sumx[33], sumw[33];
    int idx[32], rows[4], shifts[8];
    int8_t L[32];
    for (int64_t ibl = 0; ibl < n / QQ_QK; ibl++, y += 50) {
        const float *xbl = x + QQ_QK * ibl;
        memset(y, 0, 50);
        uint16_t qh[8] = {0};
        float max_scale = 0, sumx2 = 0;
        for (int i = 0; i < QQ_QK; i++) sumx2 += xbl[i] * xbl[i];
        const float sigma2 = 2 * sumx2 / QQ_QK;
        for (int ib = 0; ib < 8; ib++) {
            const float *xb = xbl + 32 * ib;
            qq_weights(32, xb, qw + QQ_QK * ibl + 32 * ib, sigma2, weight);
            float max = fabsf(xb[0]);
            for (int i = 1; i < 32; i++) max = fabsf(xb[i]) > max ? fabsf(xb[i]) : max;
            scales[ib] = 0;
            shifts[ib] = 1;
            if (max < 1e-12f) continue;
            qq_sort_by_value(32, xb, idx);
            sumx[0] = sumw[0] = 0;
            for (int j = 0; j < 32; j++) {
                sumx[j + 1] = sumx[j] + weight[idx[j]] * xb[idx[j]];
                sumw[j + 1] = sumw[j] + weight[idx[j]];
            }
            /* levels -1, 0, +1 (shifted by +-delta) split the sorted block at i1 <= i2 */
            float best = -FLT_MAX, scale = max;
            int b1 = -1, b2 = -1, shift = 0;
            for (int i1 = 0; i1 <= 32; i1++) {
                for (int i2 = i1; i2 <= 32; i2++) {
                    for (int s = 0; s < 2; s++) {
                        const float *v = s == 0 ? x_p : x_m;
                        const float sqx = sumx[i1] * v[0] + (sumx[i2] - sumx[i1]) * v[1] + (sumx[32] - sumx[i2]) * v[2];
                        const float sq2 = sumw[i1] * v[0] * v[0] + (sumw[i2] - sumw[i1]) * v[1] * v[1] +
                                          (sumw[32] - sumw[i2]) * v[2] * v[2];
                        if (sq2 > 0 && sqx * sqx > best * sq2) {
                            scale = sqx / sq2;
                            best = scale * sqx;
                            b1 = i1;
                            b2 = i2;
                            shift = s == 0 ? 1 : -1;
                        }
                    }
                }
            }
            if (b1 < 0 || shift == 0) continue;
            for (int j = 0; j < 32; j++) L[idx[j]] = (int8_t)(j < b1 ? 0 : j < b2 ? 1 : 2);
            if (scale < 0) {
                for (int j = 0; j < 32; j++) L[j] = (int8_t)(2 - L[j]);
                scale = -scale;
                shift = -shift;
            }
            const float *xx = shift == 1 ? x_p : x_m;
            const float *xx_of[4] = {xx, xx, xx, xx};
            scale = qq_iq1_snap(G, 4, xb, weight, scale, xx_of, L, rows);
            for (int k = 0; k < 4; k++) {
                y[2 + 4 * ib + k] = (uint8_t)(rows[k] & 255);
                qh[ib] |= (uint16_t)((rows[k] >> 8) << (3 * k));
            }
            scales[ib] = scale;
            shifts[ib] = shift;
            max_scale = scale > max_scale ? scale : max_scale;
        }
        if (max_scale > 0) {
            const float d = max_scale / 15, id = 1 / d;
            qq_put_u16(y, qk_fp32_to_fp16(d * 1.125f));
            for (int ib = 0; ib < 8; ib++) {
                int l = qq_clamp(qq_nearest_int(0.5f * (id * scales[ib] - 1)), 0, 7);
                if (shifts[ib] == -1) l |= 8;
                qh[ib] |= (uint16_t)(l << 12);
            }
        }
        for (int ib = 0; ib < 8; ib++) qq_put_u16(y + 34 + 2 * ib, qh[ib]);
    }
}

static void qq_iq1_m_row(const float *x, uint8_t *y, int64_t n, const float *qw) {
    const qq_grid *G = &qq_grids[QQ_GRID_IQ1S];
    static const float x_p[3] = {-1 + QQ_IQ1_DELTA, QQ_IQ1_DELTA, 1 + QQ_IQ1_DELTA};
    static const float x_m[3] = {-1 - QQ_IQ1_DELTA, -QQ_IQ1_DELTA, 1 - QQ_IQ1_DELTA};
    static const uint8_t masks[4] = {0x00, 0x80, 0x08, 0x88};
    float scales[16], weight[16];
    int idx[16], rows[2], shifts[16];
    int8_t L[16];
    for (int64_t ibl = 0; ibl < n / QQ_QK; ibl++, y += 56) {
        const float *xbl = x + QQ_QK * ibl;
        uint8_t *qs = y, *qh = y + 32;
        memset(y, 0, 56);
        float max_scale = 0, sumx2 = 0;
        for (int i = 0; i < QQ_QK; i++) sumx2 += xbl[i] * xbl[i];
        const float sigma2 = 2 * sumx2 / QQ_QK;
        for (int ib = 0; ib < 16; ib++) {
            const float *xb = xbl + 16 * ib;
            if (qw) qq_weights(16, xb, qw + QQ_QK * ibl + 16 * ib, sigma2, weight);
            else
                for (int i = 0; i < 16; i++) weight[i] = xb[i] * xb[i];
            float max = fabsf(xb[0]);
            for (int i = 1; i < 16; i++) max = fabsf(xb[i]) > max ? fabsf(xb[i]) : max;
            scales[ib] = 0;
            shifts[ib] = 0;
            if (max < 1e-7f) continue;
            qq_sort_by_value(16, xb, idx);
            /* k = 0..3: the delta sign of the first and second group of 8 (+,+ +,- -,+ -,-).
             * Each element's terms per level are formed once, in ggml's product order
             * (w * v * x), and summed in the sorted order per k, so the sums are ggml's bit for
             * bit; the four k are added as one vector. */
            float tx[16][3][4], t2[16][3][4]; /* element j at level lev: its term for each k */
            for (int j = 0; j < 16; j++) {
                const int i = idx[j];
                for (int lev = 0; lev < 3; lev++) {
                    const float a = weight[i] * x_p[lev] * xb[i], b = weight[i] * x_m[lev] * xb[i];
                    const float c = weight[i] * x_p[lev] * x_p[lev], d = weight[i] * x_m[lev] * x_m[lev];
                    for (int k = 0; k < 4; k++) {
                        const int minus = i < 8 ? k >= 2 : k % 2; /* first group: k >= 2; second: odd k */
                        tx[j][lev][k] = minus ? b : a;
                        t2[j][lev][k] = minus ? d : c;
                    }
                }
            }
            float best = -FLT_MAX, scale = max;
            int b1 = -1, b2 = -1, best_k = -1;
            for (int i1 = 0; i1 <= 16; i1++) {
                for (int i2 = i1; i2 <= 16; i2++) {
                    float sqx[4] = {0}, sq2[4] = {0};
                    for (int j = 0; j < 16; j++) {
                        const int lev = (j >= i1) + (j >= i2);
                        for (int k = 0; k < 4; k++) { /* one vector add each */
                            sqx[k] += tx[j][lev][k];
                            sq2[k] += t2[j][lev][k];
                        }
                    }
                    for (int k = 0; k < 4; k++) {
                        if (sq2[k] > 0 && sqx[k] * sqx[k] > best * sq2[k]) {
                            scale = sqx[k] / sq2[k];
                            best = scale * sqx[k];
                            b1 = i1;
                            b2 = i2;
                            best_k = k;
                        }
                    }
                }
            }
            if (b1 < 0 || best_k < 0) continue;
            for (int j = 0; j < 16; j++) L[idx[j]] = (int8_t)(j < b1 ? 0 : j < b2 ? 1 : 2);
            if (scale < 0) {
                for (int j = 0; j < 16; j++) L[j] = (int8_t)(2 - L[j]);
                scale = -scale;
                best_k = 3 - best_k;
            }
            const float *xx_of[2] = {best_k < 2 ? x_p : x_m, best_k % 2 == 0 ? x_p : x_m};
            scale = qq_iq1_snap(G, 2, xb, weight, scale, xx_of, L, rows);
            qs[2 * ib] = (uint8_t)(rows[0] & 255);
            qs[2 * ib + 1] = (uint8_t)(rows[1] & 255);
            qh[ib] = (uint8_t)((rows[0] >> 8) | ((rows[1] >> 8) << 4));
            scales[ib] = scale;
            shifts[ib] = best_k;
            max_scale = scale > max_scale ? scale : max_scale;
        }
        if (max_scale == 0) continue;
        uint16_t sc[4] = {0};
        float d = max_scale / 15;
        const float id = 1 / d;
        float sumqx = 0, sumq2 = 0;
        for (int ib = 0; ib < 16; ib++) {
            const int l = qq_clamp(qq_nearest_int(0.5f * (id * scales[ib] - 1)), 0, 7);
            sc[ib / 4] |= (uint16_t)(l << (3 * (ib % 4)));
            qh[ib] |= masks[shifts[ib]];
            const float *xb = xbl + 16 * ib;
            if (qw) qq_weights(16, xb, qw + QQ_QK * ibl + 16 * ib, sigma2, weight);
            else
                for (int i = 0; i < 16; i++) weight[i] = xb[i] * xb[i];
            for (int k = 0; k < 2; k++) {
                const float *xx = (k == 0 ? shifts[ib] < 2 : shifts[ib] % 2 == 0) ? x_p : x_m;
                const int row = qs[2 * ib + k] | ((qh[ib] << (8 - 4 * k)) & 0x700);
                const int8_t *pg = G->pos + row * 8;
                for (int j = 0; j < 8; j++) {
                    const float w = weight[8 * k + j], q = xx[(pg[j] - 1) / 2] * (2 * l + 1);
                    sumqx += w * q * xb[8 * k + j];
                    sumq2 += w * q * q;
                }
            }
        }
        if (sumq2 > 0) d = sumqx / sumq2;
        const uint16_t h = qk_fp32_to_fp16(d * 1.1125f);
        sc[0] |= (uint16_t)((h & 0x000f) << 12);
        sc[1] |= (uint16_t)((h & 0x00f0) << 8);
        sc[2] |= (uint16_t)((h & 0x0f00) << 4);
        sc[3] |= (uint16_t)(h & 0xf000);
        for (int j = 0; j < 4; j++) qq_put_u16(y + 48 + 2 * j, sc[j]);
    }
}

/* ---------------------------------------------------------------- entry points */

static const int qq_grid_of[QQ_N_TYPES] = {QQ_GRID_IQ2XXS, QQ_GRID_IQ2XS, QQ_GRID_IQ2S, QQ_GRID_IQ3XXS,
                                           QQ_GRID_IQ3S, QQ_GRID_IQ1S, QQ_GRID_IQ1S};
static const int qq_block_bytes[QQ_N_TYPES] = {66, 74, 82, 98, 110, 50, 56};

static int qq_prepare(int type) { return qq_prepare_grid(qq_grid_of[type]); }

/* nrows rows of n_per_row (a multiple of 256) floats into blocks of `type`; qw: n_per_row
 * column weights (NULL only for IQ2_S, IQ3_XXS, IQ3_S, IQ1_M). qq_prepare(type) first. */
static int qq_quantize_rows(int type, const float *x, uint8_t *y, int64_t nrows, int64_t n_per_row,
                            const float *qw) {
    if (!qw && (type == QQ_IQ2_XXS || type == QQ_IQ2_XS || type == QQ_IQ1_S)) return -1;
    if (!qq_grids[qq_grid_of[type]].map || n_per_row % QQ_QK) return -1;
    const int64_t row_bytes = n_per_row / QQ_QK * qq_block_bytes[type];
    for (int64_t r = 0; r < nrows; r++, x += n_per_row, y += row_bytes) {
        switch (type) {
        case QQ_IQ2_XXS: qq_iq2_xxs_row(x, y, n_per_row, qw); break;
        case QQ_IQ2_XS: qq_iq2_xs_s_row(0, x, y, n_per_row, qw); break;
        case QQ_IQ2_S: qq_iq2_xs_s_row(1, x, y, n_per_row, qw); break;
        case QQ_IQ3_XXS: qq_iq3_row(0, x, y, n_per_row, qw); break;
        case QQ_IQ3_S: qq_iq3_row(1, x, y, n_per_row, qw); break;
        case QQ_IQ1_S: qq_iq1_s_row(x, y, n_per_row, qw); break;
        default: qq_iq1_m_row(x, y, n_per_row, qw); break;
        }
    }
    return 0;
}

#endif
