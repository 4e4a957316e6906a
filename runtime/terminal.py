"""Text from a model file, made safe to print on a terminal.

A GGUF's strings (name, tensor names, metadata values, token pieces) are untrusted: an ESC in
them starts sequences that retitle the window, move the cursor, rewrite earlier lines or, on
some terminals, answer back into the input. Before such text reaches a terminal, every control
character (C0 except the allowed whitespace, DEL, C1) and every bidirectional override is shown
as a visible escape instead.
"""

from __future__ import annotations

import re

# C0 controls, DEL, C1 controls, and the bidi controls that reorder what is displayed
# (U+202A-U+202E, U+2066-U+2069), the Trojan Source characters.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str, keep: str = "") -> str:
    """`text` with each unsafe character as \\xNN or \\uNNNN; characters in `keep` (e.g.
    "\\n\\t" for generated text) stay as they are."""

    def escape(m: re.Match) -> str:
        ch = m.group()
        if ch in keep:
            return ch
        code = ord(ch)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _UNSAFE.sub(escape, text)
