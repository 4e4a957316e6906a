"""`qpack advise --plot`: KL divergence against file size and against decode speed, one point
per type. With matplotlib installed (an optional dependency) it draws the chart; without it a
small built-in PNG writer (zlib + a 3x5 pixel font) draws the same two panels, so the option
works in a bare environment too."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np

# 3x5 glyphs, rows top to bottom, 3 bits each (MSB = left column).
_FONT = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7),
    "3": (7, 1, 7, 1, 7), "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7),
    "7": (7, 1, 1, 1, 1), "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7), "A": (2, 5, 7, 5, 5),
    "B": (6, 5, 6, 5, 6), "C": (3, 4, 4, 4, 3), "D": (6, 5, 5, 5, 6), "E": (7, 4, 6, 4, 7),
    "F": (7, 4, 6, 4, 4), "G": (3, 4, 5, 5, 3), "H": (5, 5, 7, 5, 5), "I": (7, 2, 2, 2, 7),
    "K": (5, 5, 6, 5, 5), "L": (4, 4, 4, 4, 7), "M": (5, 7, 7, 5, 5), "N": (6, 5, 5, 5, 5),
    "O": (2, 5, 5, 5, 2), "P": (6, 5, 6, 4, 4), "Q": (2, 5, 5, 6, 3), "R": (6, 5, 6, 5, 5),
    "S": (3, 4, 2, 1, 6), "T": (7, 2, 2, 2, 2), "U": (5, 5, 5, 5, 7), "V": (5, 5, 5, 5, 2),
    "W": (5, 5, 7, 7, 5), "X": (5, 5, 2, 5, 5), "Y": (5, 5, 2, 2, 2), "Z": (7, 1, 2, 4, 7),
    "_": (0, 0, 0, 0, 7), ".": (0, 0, 0, 0, 2), "/": (1, 1, 2, 4, 4), " ": (0, 0, 0, 0, 0),
    "-": (0, 0, 7, 0, 0), ":": (0, 2, 0, 2, 0), "(": (1, 2, 2, 2, 1), ")": (4, 2, 2, 2, 4), "*": (0, 5, 2, 5, 0),
}  # fmt: skip
W, H, PANEL, MARGIN, SCALE = 900, 420, 400, 50, 2


def plot_advice(results, path: Path, best=None) -> str:
    """Write the chart; returns which renderer drew it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_png(results, path, best)
        return "built-in PNG writer; install matplotlib for a nicer chart"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in (
        (axes[0], lambda m: m.file_bytes / 2**20, "file size (MiB)"),
        (axes[1], lambda m: m.decode_tps, "decode speed (tokens/s)"),
    ):
        for m in results[1:]:
            ax.scatter(key(m), max(m.kld, 1e-6), color="red" if m is best else "tab:blue")
            ax.annotate(m.type, (key(m), max(m.kld, 1e-6)), fontsize=8)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("KL divergence vs " + results[0].type)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return "matplotlib"


def _plot_png(results, path: Path, best) -> None:
    img = np.full((H, W, 3), 255, np.uint8)
    pts = list(results[1:])
    klds = [math.log10(max(m.kld, 1e-6)) for m in pts]
    lo, hi = min(klds, default=-3) - 0.2, max(klds, default=0) + 0.2
    for panel, (key, title) in enumerate(
        (
            (lambda m: m.file_bytes / 2**20, "KLD VS SIZE MIB"),
            (lambda m: m.decode_tps, "KLD VS DECODE T/S"),
        )  # fmt: skip
    ):
        x0 = MARGIN + panel * (PANEL + MARGIN)
        y0, y1 = 30, H - 40
        img[y1, x0 : x0 + PANEL] = 0  # axes
        img[y0:y1, x0] = 0
        _text(img, x0, 10, title)
        xs = [key(m) for m in pts]
        xlo, xhi = min(xs, default=0), max(xs, default=1)
        pad = (xhi - xlo) * 0.1 or 1
        xlo, xhi = xlo - pad, xhi + pad
        _text(img, x0, y1 + 8, f"{xlo:.0f}")
        _text(img, x0 + PANEL - 40, y1 + 8, f"{xhi:.0f}")
        _text(img, x0 + 4, y0, f"{hi:.1f}")
        _text(img, x0 + 4, y1 - 14, f"{lo:.1f}")
        for m, x, k in zip(pts, xs, klds, strict=True):
            px = x0 + int((x - xlo) / (xhi - xlo) * (PANEL - 1))
            py = y1 - int((k - lo) / (hi - lo) * (y1 - y0))
            color = (220, 30, 30) if m is best else (30, 80, 200)
            img[max(py - 3, 0) : py + 4, max(px - 3, 0) : px + 4] = color
            _text(img, px + 6, py - 5, m.type + ("*" if m is best else ""))
    _text(img, MARGIN, H - 14, "Y: LOG10 KLD VS " + results[0].type + "   * RECOMMENDED")
    _write_png(path, img)


def _text(img: np.ndarray, x: int, y: int, s: str) -> None:
    for i, ch in enumerate(s.upper()):
        rows = _FONT.get(ch, _FONT[" "])
        for r, bits in enumerate(rows):
            for c in range(3):
                if bits >> (2 - c) & 1:
                    yy, xx = y + r * SCALE, x + (i * 4 + c) * SCALE
                    if yy >= 0 and xx >= 0:  # (numpy slices past the far edge just clip)
                        img[yy : yy + SCALE, xx : xx + SCALE] = 0


def _write_png(path: Path, img: np.ndarray) -> None:
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)
