/* Compiled quantizers for the hot types of the common mixes, without an importance matrix:
 * Q8_0, Q4_K and Q6_K (Q4_K_M is mostly Q4_K and Q6_K). ggml's reference quantizers
 * (quantize_row_q8_0_ref, quantize_row_q4_K_ref with make_qkx2_quants, quantize_row_q6_K_ref
 * with make_qx_quants: the facts, written anew) in ggml's float order, one row at a time.
 * With an importance matrix, builder/quant_blocks.py's numpy versions still run.
 */
#ifndef QPACK_K_QUANTIZE_H
#define QPACK_K_QUANTIZE_H

#include "iq_quantize.h" /* qq_nearest_int, qq_put_u16, fp16 */

static void qq_q8_0_row(const float *x, uint8_t *y, int64_t n) {
    for (int64_t b = 0; b < n / 32; b++, x += 32, y += 34) {
        float amax = 0;
        for (int j = 0; j < 32; j++) amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;
        const float d = amax / 127, id = d ? 1.0f / d : 0.0f;
        qq_put_u16(y, qk_fp32_to_fp16(d));
        for (int j = 0; j < 32; j++) y[2 + j] = (uint8_t)(int8_t)roundf(x[j] * id);
    }
}

/* ggml's make_qkx2_quants: levels 0..nmax with a min, weighted; returns scale, -min in *the_min. */
static float qq_make_qkx2(int n, int nmax, const float *x, const float *w, uint8_t *L, float *the_min,
                          uint8_t *Laux, float rmin, float rdelta, int nstep) {
    float min = x[0], max = x[0], sum_w = w[0], sum_x = sum_w * x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        memset(L, 0, n);
        *the_min = -min;
        return 0.f;
    }
    float iscale = nmax / (max - min), scale = 1 / iscale, best_error = 0;
    for (int i = 0; i < n; i++) {
        const int l = qq_clamp(qq_nearest_int(iscale * (x[i] - min)), 0, nmax);
        L[i] = (uint8_t)l;
        const float diff = scale * L[i] + min - x[i];
        best_error += w[i] * diff * diff;
    }
    for (int is = 0; is <= nstep; is++) {
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; i++) {
            const int l = qq_clamp(qq_nearest_int(iscale * (x[i] - min)), 0, nmax);
            Laux[i] = (uint8_t)l;
            sum_l += w[i] * l;
            sum_l2 += w[i] * l * l;
            sum_xl += w[i] * l * x[i];
        }
        const float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float cur_error = 0;
            for (int i = 0; i < n; i++) {
                const float diff = this_scale * Laux[i] + this_min - x[i];
                cur_error += w[i] * diff * diff;
            }
            if (cur_error < best_error) {
                memcpy(L, Laux, n);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

static void qq_q4_k_row(const float *x, uint8_t *y, int64_t n) {
    uint8_t L[256], Laux[32];
    float weights[32], mins[8], scales[8];
    for (int64_t b = 0; b < n / 256; b++, x += 256, y += 144) {
        uint8_t *sc = y + 4, *q = y + 16;
        memset(sc, 0, 12);
        float max_scale = 0, max_min = 0;
        for (int j = 0; j < 8; j++) {
            float sum_x2 = 0;
            for (int l = 0; l < 32; l++) sum_x2 += x[32 * j + l] * x[32 * j + l];
            const float av_x = sqrtf(sum_x2 / 32);
            for (int l = 0; l < 32; l++) weights[l] = av_x + fabsf(x[32 * j + l]);
            scales[j] = qq_make_qkx2(32, 15, x + 32 * j, weights, L + 32 * j, &mins[j], Laux, -1.f, 0.1f, 20);
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
        const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
        uint8_t ls_of[8], lm_of[8];
        for (int j = 0; j < 8; j++) {
            uint8_t ls = (uint8_t)qq_nearest_int(inv_scale * scales[j]);
            uint8_t lm = (uint8_t)qq_nearest_int(inv_min * mins[j]);
            ls = ls < 63 ? ls : 63;
            lm = lm < 63 ? lm : 63;
            ls_of[j] = ls;
            lm_of[j] = lm;
            if (j < 4) {
                sc[j] = ls;
                sc[j + 4] = lm;
            } else {
                sc[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
                sc[j - 4] |= (uint8_t)((ls >> 4) << 6);
                sc[j] |= (uint8_t)((lm >> 4) << 6);
            }
        }
        const uint16_t dh = qk_fp32_to_fp16(max_scale / 63.f), mh = qk_fp32_to_fp16(max_min / 63.f);
        qq_put_u16(y, dh);
        qq_put_u16(y + 2, mh);
        const float dd = qk_fp16_to_fp32(dh), dm_all = qk_fp16_to_fp32(mh);
        for (int j = 0; j < 8; j++) {
            const float d = dd * ls_of[j];
            if (!d) continue;
            const float dm = dm_all * lm_of[j];
            for (int i = 0; i < 32; i++) L[32 * j + i] = (uint8_t)qq_clamp(qq_nearest_int((x[32 * j + i] + dm) / d), 0, 15);
        }
        for (int j = 0; j < 256; j += 64, q += 32)
            for (int l = 0; l < 32; l++) q[l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
    }
}

/* ggml's make_qx_quants with rmse_type 1 (weights x^2): levels -nmax..nmax-1, stored + nmax. */
static float qq_make_qx(int n, int nmax, const float *x, int8_t *L) {
    float max = 0, amax = 0;
    for (int i = 0; i < n; i++) {
        const float ax = fabsf(x[i]);
        if (ax > amax) {
            amax = ax;
            max = x[i];
        }
    }
    if (amax < 1e-15f) {
        memset(L, 0, n);
        return 0.f;
    }
    float iscale = -nmax / max, sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; i++) {
        const int l = qq_clamp(qq_nearest_int(iscale * x[i]), -nmax, nmax - 1);
        L[i] = (int8_t)(l + nmax);
        const float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    float scale = suml2 ? sumlx / suml2 : 0.0f, best = scale * sumlx;
    for (int is = -9; is <= 9; is++) {
        if (is == 0) continue;
        iscale = -(nmax + 0.1f * is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; i++) {
            const int l = qq_clamp(qq_nearest_int(iscale * x[i]), -nmax, nmax - 1);
            const float w = x[i] * x[i];
            sumlx += w * x[i] * l;
            suml2 += w * l * l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; i++) L[i] = (int8_t)(nmax + qq_clamp(qq_nearest_int(iscale * x[i]), -nmax, nmax - 1));
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

static void qq_q6_k_row(const float *x, uint8_t *y, int64_t n) {
    int8_t L[256];
    float scales[16];
    for (int64_t b = 0; b < n / 256; b++, x += 256, y += 210) {
        uint8_t *ql = y, *qh = y + 128;
        int8_t *sc = (int8_t *)(y + 192);
        float max_scale = 0, max_abs_scale = 0;
        for (int ib = 0; ib < 16; ib++) {
            const float scale = qq_make_qx(16, 32, x + 16 * ib, L + 16 * ib);
            scales[ib] = scale;
            if (fabsf(scale) > max_abs_scale) {
                max_abs_scale = fabsf(scale);
                max_scale = scale;
            }
        }
        memset(y, 0, 210);
        if (max_abs_scale < 1e-15f) continue;
        const float iscale = -128.f / max_scale;
        const uint16_t dh = qk_fp32_to_fp16(1 / iscale);
        qq_put_u16(y + 208, dh);
        for (int ib = 0; ib < 16; ib++) {
            const int v = qq_nearest_int(iscale * scales[ib]);
            sc[ib] = (int8_t)(v < 127 ? v : 127);
        }
        const float dd = qk_fp16_to_fp32(dh);
        for (int j = 0; j < 16; j++) {
            const float d = dd * sc[j];
            if (!d) continue;
            for (int i = 0; i < 16; i++) L[16 * j + i] = (int8_t)(qq_clamp(qq_nearest_int(x[16 * j + i] / d), -32, 31) + 32);
        }
        for (int j = 0; j < 256; j += 128, ql += 64, qh += 32) {
            for (int l = 0; l < 32; l++) {
                const uint8_t q1 = L[j + l] & 0xF, q2 = L[j + l + 32] & 0xF;
                const uint8_t q3 = L[j + l + 64] & 0xF, q4 = L[j + l + 96] & 0xF;
                ql[l] = (uint8_t)(q1 | (q3 << 4));
                ql[l + 32] = (uint8_t)(q2 | (q4 << 4));
                qh[l] = (uint8_t)((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) |
                                  ((L[j + l + 96] >> 4) << 6));
            }
        }
    }
}

enum { QQ_Q8_0, QQ_Q4_K, QQ_Q6_K };

static void qq_quantize_k_rows(int type, const float *x, uint8_t *y, int64_t nrows, int64_t n_per_row) {
    const int64_t row_bytes = type == QQ_Q8_0 ? n_per_row / 32 * 34 : n_per_row / 256 * (type == QQ_Q4_K ? 144 : 210);
    for (int64_t r = 0; r < nrows; r++, x += n_per_row, y += row_bytes) {
        if (type == QQ_Q8_0) qq_q8_0_row(x, y, n_per_row);
        else if (type == QQ_Q4_K) qq_q4_k_row(x, y, n_per_row);
        else qq_q6_k_row(x, y, n_per_row);
    }
}

#endif
