"""Where the zip members go inside a runtime stub: the plan each OS's layout module returns.

builder/elf.py, builder/pe.py and builder/macho.py each read one executable format and say
where the model can be inserted before PyInstaller's archive, and which header fields move.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

# The stub tail moves by a multiple of this, so every shifted ELF offset keeps its alignment.
SHIFT_ALIGNMENT = 64


@dataclass
class StubLayout:
    """Where the zip members are inserted into the stub, and how to fix its headers."""

    kind: str  # "elf", "pe", "macho" or "append"
    insert_at: int
    # Called with the number of bytes inserted; returns the header fields to rewrite, as
    # (offset in the stub, new bytes). Each lies wholly before or wholly after `insert_at`.
    edits: Callable[[int], list[tuple[int, bytes]]] = field(repr=False, default=lambda shift: [])
    warning: str | None = None
    checksum_at: int | None = None  # PE: where the image checksum lives (recomputed at the end)
    # Mach-O: zero bytes left after `insert_at` (for the new signature), the stub's byte range
    # that follows the members (default: from `insert_at` to its end), and what completes the
    # file (fd, size) once written, returning a warning or None.
    reserve: int = 0
    tail: tuple[int, int] | None = None
    finish: Callable[[int, int], str | None] | None = field(repr=False, default=None)
