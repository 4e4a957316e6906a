"""Quantizers for ggml block types, vectorised with numpy over every block of a chunk of rows.

Each function takes float32 rows (n_rows, n_per_row) and returns the packed blocks as uint8
(n_rows, row_bytes), laid out as ggml-common.h defines them. The algorithms are ggml's (the
facts of ggml-quants.c: the scale searches, their constants and the rounding), rewritten so that
one numpy operation handles a whole tensor's blocks at once instead of a C loop per block:
- without an importance matrix, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 reproduce llama.cpp's reference
  quantizers bit for bit (checked against llama-quantize by tests/test_quantize.py);
- the K and IQ4 types run ggml's searches in float32 too, but sums are reduced in numpy's order,
  so an occasional block differs in its last bit of scale from llama.cpp's (same quality);
- with an importance matrix (`imatrix`: one weight per column) the weighted searches that
  llama.cpp uses for imatrix quantization are applied.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from qpack.runtime.errors import QpackError

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)
IQ4_VALUES = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8
)
# best_index_int8: x picks level i once 2x reaches val[i-1] + val[i]. Those sums are integers,
# so the level depends only on floor(2x): a table over floor(2x) in [-256, 256] gives it.
_IQ4_MIDPOINTS = IQ4_VALUES[1:].astype(np.int32) + IQ4_VALUES[:-1].astype(np.int32)
_IQ4_LEVEL_OF_FLOOR = np.searchsorted(_IQ4_MIDPOINTS, np.arange(-256, 257), side="right").astype(
    np.uint8
)


def _f16(v: np.ndarray) -> np.ndarray:
    """float32 -> float16 (round to nearest even, as GGML_FP32_TO_FP16)."""
    return np.asarray(v, dtype=F32).astype(np.float16)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return _f16(v).view(np.uint8).reshape(*np.shape(v), 2)


def _recip(d: np.ndarray) -> np.ndarray:
    """1/d, 0 where d is 0 (ggml's `d ? 1.0f/d : 0.0f`)."""
    out = np.zeros_like(d, dtype=F32)
    np.divide(F32(1), d, out=out, where=d != 0)
    return out


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros(np.broadcast(a, b).shape, dtype=F32)
    np.divide(a, b, out=out, where=b != 0)
    return out


def _round_away(v: np.ndarray) -> np.ndarray:
    """C roundf: halves away from zero (np.rint rounds them to even)."""
    r = np.trunc(v)
    return r + np.copysign((np.abs(v - r) >= F32(0.5)).astype(F32), v)


def _signed_absmax(x: np.ndarray) -> np.ndarray:
    """Per row of the last axis, the value whose |value| is largest (the first such)."""
    i = np.abs(x).argmax(axis=-1)
    return np.take_along_axis(x, i[..., None], axis=-1)[..., 0]


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(..., 32) levels 0..15 -> (..., 16) bytes: element j low nibble, element j+16 high."""
    return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def _qh_bits(q: np.ndarray) -> np.ndarray:
    """(..., 32) levels 0..31 -> (..., 4) bytes: bit j = 5th bit of element j."""
    bits = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return bits.sum(axis=-1, dtype=np.uint32)[..., None].view(np.uint8)


# --- the legacy 32-element types -------------------------------------------------------------


def _blocks32(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1, 32)


def _row_sigma2(x: np.ndarray) -> np.ndarray:
    """sum(x^2)/n_per_row of each row, broadcast over its 32-blocks: the weight offset that
    llama.cpp's imatrix quantizers of the 32-element types use."""
    return ((x * x).sum(axis=1, dtype=F32) / F32(x.shape[1]))[:, None, None]


def _imatrix_weights(xb: np.ndarray, imatrix: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    qw = imatrix.astype(F32).reshape(1, *xb.shape[1:])
    return qw * np.sqrt(sigma2 + xb * xb)


def quantize_q4_0(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    xb = _blocks32(x)
    if imatrix is None:
        d = _signed_absmax(xb) / F32(-8)
        q = np.minimum(15, np.trunc(xb * _recip(d)[..., None] + F32(8.5))).astype(np.uint8)
    else:
        w = _imatrix_weights(xb, imatrix, _row_sigma2(x))
        d, q = make_qx_quants(xb, 8, w)
    return np.concatenate([_f16_bytes(d), _pack_nibbles(q)], axis=-1).reshape(x.shape[0], -1)


def quantize_q4_1(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    xb = _blocks32(x)
    if imatrix is None:
        lo, hi = xb.min(axis=-1), xb.max(axis=-1)
        d = (hi - lo) / F32(15)
        q = np.trunc((xb - lo[..., None]) * _recip(d)[..., None] + F32(0.5))
        q = np.minimum(15, q).astype(np.uint8)
    else:
        w = _imatrix_weights(xb, imatrix, _row_sigma2(x))
        d, neg_lo, q = make_qkx3_quants(xb, 15, w, F32(-0.9), F32(0.05), 36)
        lo = -neg_lo
    parts = [_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)]
    return np.concatenate(parts, axis=-1).reshape(x.shape[0], -1)


def quantize_q5_0(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    xb = _blocks32(x)
    if imatrix is None:
        d = _signed_absmax(xb) / F32(-16)
        q = np.minimum(31, np.trunc(xb * _recip(d)[..., None] + F32(16.5))).astype(np.uint8)
    else:
        w = _imatrix_weights(xb, imatrix, _row_sigma2(x))
        d, q = make_qx_quants(xb, 16, w)
    parts = [_f16_bytes(d), _qh_bits(q), _pack_nibbles(q & 15)]
    return np.concatenate(parts, axis=-1).reshape(x.shape[0], -1)


def quantize_q5_1(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    xb = _blocks32(x)
    if imatrix is None:
        lo, hi = xb.min(axis=-1), xb.max(axis=-1)
        d = (hi - lo) / F32(31)
        q = np.trunc((xb - lo[..., None]) * _recip(d)[..., None] + F32(0.5)).astype(np.uint8)
    else:
        w = _imatrix_weights(xb, imatrix, _row_sigma2(x))
        d, neg_lo, q = make_qkx3_quants(xb, 31, w, F32(-0.9), F32(0.05), 36)
        lo = -neg_lo
    parts = [_f16_bytes(d), _f16_bytes(lo), _qh_bits(q), _pack_nibbles(q & 15)]
    return np.concatenate(parts, axis=-1).reshape(x.shape[0], -1)


def quantize_q8_0(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    xb = _blocks32(x)  # llama.cpp ignores the importance matrix for Q8_0
    d = np.abs(xb).max(axis=-1) / F32(127)
    q = _round_away(xb * _recip(d)[..., None]).astype(np.int8).view(np.uint8)
    return np.concatenate([_f16_bytes(d), q], axis=-1).reshape(x.shape[0], -1)


# --- ggml's scale searches, vectorised over groups (last axis = the group's elements) ---------


def make_qx_quants(
    x: np.ndarray, nmax: int, w: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric levels -nmax..nmax-1 with the scale that maximises the weighted fit among
    19 candidates (rmse_type 1: weights x^2 unless given). Returns (scale, levels + nmax)."""
    if w is None:
        w = x * x
    mx = _signed_absmax(x)
    zero = np.abs(mx) < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)

    def levels(iscale):
        return np.clip(np.rint(iscale[..., None] * x), -nmax, nmax - 1)

    def sums(lv):
        return (w * x * lv).sum(axis=-1, dtype=F32), (w * lv * lv).sum(axis=-1, dtype=F32)

    lv = levels(F32(-nmax) / mx)
    sumlx, suml2 = sums(lv)
    scale = _safe_div(sumlx, suml2)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        cand = levels(-(F32(nmax) + F32(0.1) * F32(step)) / mx)
        slx, sl2 = sums(cand)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        lv = np.where(better[..., None], cand, lv)
        scale = np.where(better, _safe_div(slx, sl2), scale)
        best = np.where(better, scale * slx, best)
    scale = np.where(zero, F32(0), scale)
    lv = np.where(zero[..., None], F32(-nmax), lv)
    return scale.astype(F32), (lv + nmax).astype(np.uint8)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Q3_K's search: levels -nmax..nmax-1, weights x^2, then up to 5 passes of one-level
    changes that improve the fit. Returns (scale, levels + nmax)."""
    mx = _signed_absmax(x)
    zero = np.abs(mx) < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    lv = np.clip(np.rint((F32(-nmax) / mx)[..., None] * x), -nmax, nmax - 1)
    w = x * x
    sumlx = (w * x * lv).sum(axis=-1, dtype=F32)
    suml2 = (w * lv * lv).sum(axis=-1, dtype=F32)
    _improve_levels(x, w, lv, sumlx, suml2, -nmax, nmax - 1)
    scale = np.where(zero, F32(0), _safe_div(sumlx, suml2))
    lv = np.where(zero[..., None], F32(-nmax), lv)
    return scale.astype(F32), (lv + nmax).astype(np.uint8)


def _improve_levels(x, w, lv, sumlx, suml2, lo, hi, need_positive_sl2=False) -> None:
    """ggml's coordinate descent (make_q3_quants / make_qp_quants): each element in turn
    moves to the level its leave-one-out scale suggests when that improves sumlx^2/suml2.
    Updates lv, sumlx and suml2 in place."""
    with np.errstate(all="ignore"):
        for _ in range(5):
            changed = False
            for i in range(x.shape[-1]):
                xi, wi, li = x[..., i], w[..., i], lv[..., i]
                slx = sumlx - wi * xi * li
                sl2 = suml2 - wi * li * li
                ok = slx > 0
                if need_positive_sl2:
                    ok &= sl2 > 0
                new = np.clip(np.rint(xi * _safe_div(sl2, slx)), lo, hi)
                slx2 = slx + wi * xi * new
                sl22 = sl2 + wi * new * new
                upd = ok & (new != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
                if upd.any():
                    changed = True
                    lv[..., i] = np.where(upd, new, li)
                    sumlx[...] = np.where(upd, slx2, sumlx)
                    suml2[...] = np.where(upd, sl22, suml2)
            if not changed:
                return


def make_qkx2_quants(
    x: np.ndarray, nmax: int, w: np.ndarray, rmin, rdelta, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric levels 0..nmax with a min: nstep+1 candidate scales, each refined by a
    weighted least-squares fit of (scale, min). Returns (scale, -min, levels)."""
    return _make_qkx(x, nmax, w, F32(rmin), F32(rdelta), nstep, use_mad, clamp_min_first=False)


def make_qkx3_quants(
    x: np.ndarray, nmax: int, w: np.ndarray | None, rmin, rdelta, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The imatrix variant of make_qkx2_quants (weights x^2 unless given, squared error)."""
    if w is None:
        w = x * x
    return _make_qkx(x, nmax, w, F32(rmin), F32(rdelta), nstep, False, clamp_min_first=True)


def _make_qkx(x, nmax, w, rmin, rdelta, nstep, use_mad, clamp_min_first):
    lo = np.minimum(x.min(axis=-1), F32(0))
    hi = x.max(axis=-1)
    flat = hi <= lo
    sum_w = w.sum(axis=-1, dtype=F32)
    sum_x = (w * x).sum(axis=-1, dtype=F32)
    sum_wx2 = (w * x * x).sum(axis=-1, dtype=np.float64)

    def err(scale, mn, lv):
        diff = scale[..., None] * lv + mn[..., None] - x
        diff = np.abs(diff) if use_mad else diff * diff
        return (w * diff).sum(axis=-1, dtype=F32)

    with np.errstate(all="ignore"):
        span = np.where(flat, F32(1), hi - lo)
        iscale = F32(nmax) / span
        scale = F32(1) / iscale
        lv = np.clip(np.rint(iscale[..., None] * (x - lo[..., None])), 0, nmax)
        best = err(scale, lo, lv)
        for step in range(nstep + 1):
            iscale = (rmin + rdelta * F32(step) + F32(nmax)) / np.where(flat, F32(1), hi - lo)
            v = iscale[..., None] * (x - lo[..., None])
            if clamp_min_first:  # min may have moved near max: v can be inf or nan
                cand = np.where(v > 0, np.rint(np.minimum(v, F32(nmax))), F32(0))
            else:
                cand = np.clip(np.rint(v), 0, nmax)
            sum_l = (w * cand).sum(axis=-1, dtype=F32)
            sum_l2 = (w * cand * cand).sum(axis=-1, dtype=F32)
            sum_xl = (w * cand * x).sum(axis=-1, dtype=F32)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            pos = this_min > 0
            this_min = np.where(pos, F32(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            if use_mad:
                cur = err(this_scale, this_min, cand)
            else:  # sum w (s*l + m - x)^2 expanded over the sums already at hand
                s64, m64 = this_scale.astype(np.float64), this_min.astype(np.float64)
                cur = (
                    s64 * s64 * sum_l2 + 2 * s64 * m64 * sum_l - 2 * s64 * sum_xl
                    + m64 * m64 * sum_w - 2 * m64 * sum_x + sum_wx2
                )  # fmt: skip
            better = (det > 0) & (cur < best) & ~flat
            lv = np.where(better[..., None], cand, lv)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            lo = np.where(better, this_min, lo)
    scale = np.where(flat, F32(0), scale).astype(F32)
    lv = np.where(flat[..., None], F32(0), lv).astype(np.uint8)
    return scale, (-lo).astype(F32), lv


def make_qp_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive levels 0..nmax for the sub-block scales of the imatrix K quantizers."""
    mx = x.max(axis=-1)
    zero = mx < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    with np.errstate(all="ignore"):
        iscale = F32(nmax) / mx
        lv = np.rint(iscale[..., None] * x)
        scale = F32(1) / iscale
        diff = x - scale[..., None] * lv
        best = (w * diff * diff).sum(axis=-1, dtype=F32)
        for step in range(-4, 5):
            if step == 0:
                continue
            cand_iscale = (F32(0.1) * F32(step) + F32(nmax)) / mx
            cand = np.minimum(np.rint(cand_iscale[..., None] * x), nmax)
            diff = x - (F32(1) / cand_iscale)[..., None] * cand
            mse = (w * diff * diff).sum(axis=-1, dtype=F32)
            better = mse < best
            best = np.where(better, mse, best)
            iscale = np.where(better, cand_iscale, iscale)
        lv = np.minimum(np.rint(iscale[..., None] * x), nmax)
        sumlx = (w * x * lv).sum(axis=-1, dtype=F32)
        suml2 = (w * lv * lv).sum(axis=-1, dtype=F32)
        _improve_levels(x, w, lv, sumlx, suml2, -(1 << 30), nmax, need_positive_sl2=True)
        scale = _safe_div(sumlx, suml2)
    scale = np.where(zero, F32(0), scale)
    lv = np.where(zero[..., None], F32(0), lv)
    return scale.astype(F32), np.clip(lv, 0, 255).astype(np.uint8)


# --- K types: 256-element super-blocks -------------------------------------------------------


def _superblocks(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, 256)


def _imatrix_superblocks(imatrix: np.ndarray | None, n_per_row: int, n_rows: int):
    if imatrix is None:
        return None
    return np.broadcast_to(imatrix.astype(F32).reshape(1, -1, 256), (n_rows, n_per_row // 256, 256)).reshape(-1, 256)  # fmt: skip


def _pack_2bit(q: np.ndarray) -> np.ndarray:
    """(nb, 256) levels 0..3 -> (nb, 64): per 128 half, byte l = q[l] | q[l+32]<<2 | ..."""
    h = q.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)).reshape(-1, 64)


def _pack_k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins -> the 12 bytes of Q4_K/Q5_K (get_scale_min_k4's inverse)."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    out = np.empty((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def _nearest_u8(v: np.ndarray) -> np.ndarray:
    """nearest_int stored in a uint8 (wraps like the C cast)."""
    return (np.rint(v).astype(np.int64) & 0xFF).astype(np.int64)


def _requantize(x, d_sub, m_sub, lv, lo, hi):
    """Levels against the final (f16-rounded) sub-block scales, where the scale is non-zero;
    elsewhere the search's levels stay (ggml's `if (!d) continue;`)."""
    with np.errstate(all="ignore"):
        new = np.clip(np.rint((x + m_sub[..., None]) / d_sub[..., None]), lo, hi)
    return np.where((d_sub != 0)[..., None], new, lv)


def _quantize_k_asym(x, imatrix, nmax, rmin, rdelta, nstep):
    """Q4_K / Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins."""
    n_rows, n_per_row = x.shape
    sb = _superblocks(x)
    xs = sb.reshape(-1, 8, 32)
    if imatrix is None:
        av_x = np.sqrt((xs * xs).sum(axis=-1, dtype=F32) / F32(32))
        w = av_x[..., None] + np.abs(xs)
        scales, mins, lv = make_qkx2_quants(xs, nmax, w, rmin, rdelta, nstep, False)
        max_scale = np.maximum(scales.max(axis=-1), F32(0))
        max_min = np.maximum(mins.max(axis=-1), F32(0))
        inv_scale = np.where(max_scale > 0, _safe_div(F32(63), max_scale), F32(0))
        inv_min = np.where(max_min > 0, _safe_div(F32(63), max_min), F32(0))
        ls = np.minimum(63, _nearest_u8(inv_scale[:, None] * scales))
        lm = np.minimum(63, _nearest_u8(inv_min[:, None] * mins))
        d = _f16(max_scale / F32(63))
        dmin = _f16(max_min / F32(63))
    else:
        qw = _imatrix_superblocks(imatrix, n_per_row, n_rows).reshape(-1, 8, 32)
        sigma2 = F32(2) * (sb * sb).sum(axis=-1, dtype=F32) / F32(256)
        w = qw * np.sqrt(sigma2[:, None, None] + xs * xs)
        scales, mins, lv = make_qkx3_quants(xs, nmax, w, -0.9, 0.05, 36)
        sw = w.sum(axis=-1, dtype=F32)
        d_block, ls = make_qp_quants(scales, 63, sw)
        m_block, lm = make_qp_quants(mins, 63, sw)
        ls, lm = np.minimum(ls, 63).astype(np.int64), np.minimum(lm, 63).astype(np.int64)
        d, dmin = _f16(d_block), _f16(m_block)
    d_sub = d.astype(F32)[:, None] * ls.astype(F32)
    m_sub = dmin.astype(F32)[:, None] * lm.astype(F32)
    lv = _requantize(xs, d_sub, m_sub, lv, 0, nmax).astype(np.uint8).reshape(-1, 256)
    head = [d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2)]
    head.append(_pack_k_scales(ls, lm))
    return head, lv


def quantize_q4_k(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    head, lv = _quantize_k_asym(x, imatrix, 15, -1.0, 0.1, 20)
    h = lv.reshape(-1, 4, 2, 32)
    qs = (h[:, :, 0] | (h[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([*head, qs], axis=1).reshape(x.shape[0], -1)


def quantize_q5_k(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    head, lv = _quantize_k_asym(x, imatrix, 31, -0.5, 0.1, 15)
    h = lv.reshape(-1, 4, 2, 32)
    qs = ((h[:, :, 0] & 15) | ((h[:, :, 1] & 15) << 4)).reshape(-1, 128)
    high = (h >> 4).astype(np.uint8)  # (nb, 4 chunks, 2 halves, 32)
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)
    qh = (high << shifts[None, :, :, None]).sum(axis=(1, 2), dtype=np.uint32).astype(np.uint8)
    return np.concatenate([*head, qh, qs], axis=1).reshape(x.shape[0], -1)


def quantize_q6_k(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    n_rows, n_per_row = x.shape
    sb = _superblocks(x)
    xs = sb.reshape(-1, 16, 16)
    qw = None
    if imatrix is not None:
        qw = _imatrix_superblocks(imatrix, n_per_row, n_rows).reshape(-1, 16, 16)
    scales, lv = make_qx_quants(xs, 32, qw)
    max_scale = _signed_absmax(scales)
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    iscale = F32(-128) / np.where(zero, F32(1), max_scale)
    d = _f16(F32(1) / iscale)
    sc = np.minimum(127, np.rint(iscale[:, None] * scales)).astype(np.int64)
    d_sub = d.astype(F32)[:, None] * sc.astype(F32)
    with np.errstate(all="ignore"):
        new = np.clip(np.rint(xs / d_sub[..., None]), -32, 31) + 32
    lv = np.where((d_sub != 0)[..., None], new, lv).astype(np.uint8).reshape(-1, 2, 4, 32)
    ql = np.concatenate(
        [(lv[:, :, 0] & 15) | ((lv[:, :, 2] & 15) << 4), (lv[:, :, 1] & 15) | ((lv[:, :, 3] & 15) << 4)],
        axis=2,
    ).reshape(-1, 128)  # fmt: skip
    hb = lv >> 4
    qh = (hb[:, :, 0] | (hb[:, :, 1] << 2) | (hb[:, :, 2] << 4) | (hb[:, :, 3] << 6)).reshape(
        -1, 64
    )
    sc8 = sc.astype(np.int8).view(np.uint8)
    dd = d.view(np.uint8).reshape(-1, 2)
    out = np.concatenate([ql, qh, sc8, dd], axis=1)
    out[zero] = 0
    return out.reshape(x.shape[0], -1)


def quantize_q3_k(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    n_rows, n_per_row = x.shape
    sb = _superblocks(x)
    xs = sb.reshape(-1, 16, 16)
    if imatrix is None:
        scales, lv = make_q3_quants(xs, 4)
        max_scale = _signed_absmax(scales)
        has = max_scale != 0
        iscale = F32(-32) / np.where(has, max_scale, F32(1))
        ls = np.clip(np.rint(iscale[:, None] * scales), -32, 31).astype(np.int64) + 32
        ls = np.where(has[:, None], ls, 0)
        d = np.where(has, _f16(F32(1) / iscale), np.float16(0))
    else:
        qw = _imatrix_superblocks(imatrix, n_per_row, n_rows).reshape(-1, 16, 16)
        sigma2 = F32(2) * (sb * sb).sum(axis=-1, dtype=F32) / F32(256)
        w = qw * np.sqrt(sigma2[:, None, None] + xs * xs)
        scales, lv = make_qx_quants(xs, 4, w)
        d_block, ls = make_qx_quants(scales, 32, w.sum(axis=-1, dtype=F32))
        ls = ls.astype(np.int64)
        d = _f16(d_block)
    d_sub = d.astype(F32)[:, None] * (ls - 32).astype(F32)
    with np.errstate(all="ignore"):
        new = np.clip(np.rint(xs / d_sub[..., None]), -4, 3) + 4
    lv = np.where((d_sub != 0)[..., None], new, lv).astype(np.uint8).reshape(-1, 256)
    hmask = ((lv > 3).reshape(-1, 8, 32).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint32).astype(np.uint8)  # fmt: skip
    qs = _pack_2bit(lv & 3)
    scb = np.zeros((ls.shape[0], 12), np.uint8)
    low = (ls & 0xF).astype(np.uint8)
    scb[:, :8] = low[:, :8] | (low[:, 8:] << 4)
    high = (ls >> 4).astype(np.uint8).reshape(-1, 4, 4)  # [j//4][j%4]
    scb[:, 8:] = (high << (2 * np.arange(4, dtype=np.uint8))[None, :, None]).sum(axis=1, dtype=np.uint32).astype(np.uint8)  # fmt: skip
    dd = np.asarray(d, np.float16).view(np.uint8).reshape(-1, 2)
    return np.concatenate([hmask, qs, scb, dd], axis=1).reshape(x.shape[0], -1)


def quantize_q2_k(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    n_rows, n_per_row = x.shape
    sb = _superblocks(x)
    xs = sb.reshape(-1, 16, 16)
    if imatrix is None:
        scales, mins, lv = make_qkx2_quants(xs, 3, np.abs(xs), -0.5, 0.1, 15, True)
        max_scale = np.maximum(scales.max(axis=-1), F32(0))
        max_min = np.maximum(mins.max(axis=-1), F32(0))
        ls = np.where(max_scale[:, None] > 0, _nearest_u8(_safe_div(F32(15), max_scale)[:, None] * scales), 0)  # fmt: skip
        lm = np.where(max_min[:, None] > 0, _nearest_u8(_safe_div(F32(15), max_min)[:, None] * mins), 0)  # fmt: skip
        d = _f16(max_scale / F32(15))
        dmin = _f16(max_min / F32(15))
    else:
        qw = _imatrix_superblocks(imatrix, n_per_row, n_rows).reshape(-1, 16, 16)
        sigma2 = (sb * sb).sum(axis=-1, dtype=F32) / F32(256)
        w = qw * np.sqrt(sigma2[:, None, None] + xs * xs)
        scales, mins, lv = make_qkx3_quants(xs, 3, w, -0.9, 0.05, 36)
        sw = w.sum(axis=-1, dtype=F32)
        d_block, ls = make_qp_quants(scales, 15, sw)
        m_block, lm = make_qp_quants(mins, 15, sw)
        ls, lm = ls.astype(np.int64), lm.astype(np.int64)
        d, dmin = _f16(d_block), _f16(m_block)
    sc = ((ls & 0xF) | (lm << 4)) & 0xFF
    d_sub = d.astype(F32)[:, None] * (sc & 0xF).astype(F32)
    m_sub = dmin.astype(F32)[:, None] * (sc >> 4).astype(F32)
    lv = _requantize(xs, d_sub, m_sub, lv, 0, 3).astype(np.uint8).reshape(-1, 256)
    parts = [sc.astype(np.uint8), _pack_2bit(lv), d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2)]  # fmt: skip
    return np.concatenate(parts, axis=1).reshape(x.shape[0], -1)


# --- IQ4_NL / IQ4_XS: the non-linear 16-value grid -------------------------------------------


_IQ4_VALUE_OF_FLOOR = IQ4_VALUES.astype(F32)[_IQ4_LEVEL_OF_FLOOR]


def _iq4_floor_index(v: np.ndarray) -> np.ndarray:
    """Index into the floor(2x) tables (inputs are finite: quantize_rows checks)."""
    return np.floor(np.clip(v + v, F32(-256), F32(256))).astype(np.int32) + 256


def _iq4_index(v: np.ndarray) -> np.ndarray:
    return _IQ4_LEVEL_OF_FLOOR[_iq4_floor_index(v)]


def _iq4_scales(xb: np.ndarray, w: np.ndarray, ntry: int = 7):
    """Per 32-block the scale of the best weighted fit on the grid, and the first levels."""
    values = IQ4_VALUES.astype(F32)
    mx = _signed_absmax(xb)
    zero = np.abs(mx) < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    wx = w * xb
    with np.errstate(all="ignore"):
        d = -mx / values[0]
        lv = _iq4_index(_recip(d)[..., None] * xb)
        q = values[lv]
        sumqx = (wx * q).sum(axis=-1, dtype=F32)
        sumq2 = (w * q * q).sum(axis=-1, dtype=F32)
        d = _safe_div(sumqx, sumq2)
        best = d * sumqx
        for itry in range(-ntry, ntry + 1):
            iscale = (F32(itry) + values[0]) / mx
            q = _IQ4_VALUE_OF_FLOOR[_iq4_floor_index(iscale[..., None] * xb)]
            sqx = (wx * q).sum(axis=-1, dtype=F32)
            sq2 = (w * q * q).sum(axis=-1, dtype=F32)
            better = (sq2 > 0) & (sqx * sqx > best * sq2)
            d = np.where(better, _safe_div(sqx, sq2), d)
            best = np.where(better, d * sqx, best)
    return np.where(zero, F32(0), d).astype(F32), lv


def _iq4_weights(xsb: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """xsb: (n_superblocks, n_blocks, 32)."""
    if qw is None:
        return xsb * xsb
    n = xsb.shape[1] * 32
    sigma2 = (xsb * xsb).sum(axis=(1, 2), dtype=F32) * (F32(2) / F32(n))
    return qw * np.sqrt(sigma2[:, None, None] + xsb * xsb)


def _iq4_pack(lv: np.ndarray) -> np.ndarray:
    return _pack_nibbles(lv.reshape(*lv.shape[:-1], -1, 32)).reshape(lv.shape[0], -1)


def quantize_iq4_nl(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    xb = x.reshape(-1, 1, 32)
    qw = None
    if imatrix is not None:
        qw = np.broadcast_to(imatrix.astype(F32).reshape(1, -1, 32), (x.shape[0], x.shape[1] // 32, 32)).reshape(-1, 1, 32)  # fmt: skip
    d, _ = _iq4_scales(xb, _iq4_weights(xb, qw))
    d = d[:, 0]
    lv = _iq4_index(_recip(d)[:, None] * xb[:, 0])
    out = np.concatenate([_f16_bytes(d), _pack_nibbles(lv)], axis=1)
    return out.reshape(x.shape[0], -1)


def quantize_iq4_xs(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    n_rows, n_per_row = x.shape
    xs = x.reshape(-1, 8, 32)
    qw = None
    if imatrix is not None:
        qw = _imatrix_superblocks(imatrix, n_per_row, n_rows).reshape(-1, 8, 32)
    scales, _ = _iq4_scales(xs, _iq4_weights(xs, qw))
    max_scale = _signed_absmax(scales)
    d = -max_scale / F32(32)
    ls = np.clip(np.rint(_recip(d)[:, None] * scales), -32, 31)
    dl = d[:, None] * ls
    lv = _iq4_index(_recip(dl)[..., None] * xs).reshape(-1, 256)
    ls = (ls + 32).astype(np.uint16)
    scales_l = ((ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)).astype(np.uint8)
    scales_h = ((ls >> 4) << (2 * np.arange(8, dtype=np.uint16))).sum(axis=1, dtype=np.uint32)
    parts = [_f16_bytes(d), scales_h.astype("<u2").view(np.uint8).reshape(-1, 2), scales_l, _iq4_pack(lv)]  # fmt: skip
    return np.concatenate(parts, axis=1).reshape(n_rows, -1)


GRID_TYPES = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M")


def _grid_quantizer(type_name: str) -> Callable[[np.ndarray, np.ndarray | None], np.ndarray]:
    """The IQ1/IQ2/IQ3 grid searches are too branchy for numpy: compiled C (qpack.builder._quantize)."""

    def quantize(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        try:
            from qpack.builder import _quantize
        except ImportError as e:  # a source checkout without `setup.py build_ext`
            raise QpackError(f"{type_name} needs the compiled quantizer module ({e})") from None
        try:
            return _quantize.quantize_rows(type_name, x, imatrix)
        except ValueError as e:
            raise QpackError(str(e)) from None

    quantize.__name__ = f"quantize_{type_name.lower()}"
    return quantize


def _compiled_when_plain(
    type_name: str, numpy_version: Callable[[np.ndarray, np.ndarray | None], np.ndarray]
) -> Callable[[np.ndarray, np.ndarray | None], np.ndarray]:
    """ggml's reference quantizer compiled (qpack.builder._quantize: bit-identical to
    llama.cpp's, and faster) when there is no importance matrix (Q8_0 ignores it); the numpy
    version otherwise, or when the module is not built."""

    def quantize(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        if imatrix is None or type_name == "Q8_0":
            try:
                from qpack.builder import _quantize
            except ImportError:
                return numpy_version(x, imatrix)
            return _quantize.quantize_k_rows(type_name, x)
        return numpy_version(x, imatrix)

    quantize.__name__ = numpy_version.__name__
    return quantize


QUANTIZERS: dict[str, Callable[[np.ndarray, np.ndarray | None], np.ndarray]] = {
    "Q4_0": quantize_q4_0,
    "Q4_1": quantize_q4_1,
    "Q5_0": quantize_q5_0,
    "Q5_1": quantize_q5_1,
    "Q8_0": _compiled_when_plain("Q8_0", quantize_q8_0),
    "Q2_K": quantize_q2_k,
    "Q3_K": quantize_q3_k,
    "Q4_K": _compiled_when_plain("Q4_K", quantize_q4_k),
    "Q5_K": quantize_q5_k,
    "Q6_K": _compiled_when_plain("Q6_K", quantize_q6_k),
    "IQ4_NL": quantize_iq4_nl,
    "IQ4_XS": quantize_iq4_xs,
    **{t: _grid_quantizer(t) for t in GRID_TYPES},
}


def quantize_rows(type_name: str, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """float32 rows (n_rows, n_per_row) -> uint8 (n_rows, row_bytes) of `type_name`
    (also F32, F16 and BF16, as plain conversions)."""
    x = np.ascontiguousarray(x, dtype=F32)
    if not np.isfinite(x).all():
        bad = int(np.argmin(np.isfinite(x).all(axis=1)))
        raise QpackError(f"row {bad} holds NaN or infinite values: nothing to quantize")
    if type_name == "F32":
        return x.view(np.uint8)
    if type_name == "F16":
        return x.astype(np.float16).view(np.uint8)
    if type_name == "BF16":
        return _to_bf16(x).view(np.uint8)
    return QUANTIZERS[type_name](x, imatrix)


def _to_bf16(x: np.ndarray) -> np.ndarray:
    """ggml's fp32 -> bf16: round to nearest even, NaN kept quiet."""
    u = x.view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    return np.where(nan, ((u >> 16) | 64).astype(np.uint16), r)
