"""Pick the compiled kernel variant the running CPU supports, before importing it.

Importing a module built for AVX-512 on a CPU without it dies with an illegal instruction
during module init, so the check runs in the generic module (safe everywhere) first.
"""

from __future__ import annotations

import platform
import struct
from types import ModuleType

from .errors import QpackError

# Best first. Literal imports (not importlib on a computed name) keep PyInstaller's analysis
# finding every variant. The x86 modules are compiled for whole micro-architecture levels
# (-march=x86-64-v3 / -v4), so gcc may use any of a level's instructions (BMI2, LZCNT, MOVBE
# besides AVX2): require the whole level, not only the features the kernels name.
_REQUIREMENTS = {
    "avx512": ("x86-64-v4", "avx512vnni"),
    "avx2": ("x86-64-v3",),
    "dotprod": (),
    "generic": (),
}


def _import(name: str) -> ModuleType:
    if name == "avx512":
        from . import _native_avx512 as mod
    elif name == "avx2":
        from . import _native_avx2 as mod
    elif name == "dotprod":
        from . import _native_dotprod as mod
    else:
        from . import _native_generic as mod
    return mod


# Linux arm64 AT_HWCAP bits: the dotprod module is built with -march=armv8.2-a+dotprod+fp16, so
# gcc may use half-precision arithmetic as well as sdot.
_AT_HWCAP = 16
_HWCAP_DOTPROD = (1 << 20) | (1 << 10) | (1 << 9)  # asimddp, asimdhp, fphp


def _arm_has_dotprod() -> bool:
    if platform.system() == "Darwin":
        return True  # every Apple Silicon core has it
    # The kernel's hwcaps (what getauxval reads); /proc/cpuinfo says the same on real hardware
    # but under qemu-user it shows the host's CPU.
    try:
        with open("/proc/self/auxv", "rb") as f:
            auxv = dict(struct.iter_unpack("QQ", f.read()))
        return auxv.get(_AT_HWCAP, 0) & _HWCAP_DOTPROD == _HWCAP_DOTPROD
    except (OSError, struct.error):
        pass
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return any(
                line.startswith("Features") and {"asimddp", "asimdhp"} <= set(line.split())
                for line in f
            )
    except OSError:
        return False


def supported_variants() -> list[str]:
    """The variants this CPU can run, best first."""
    generic = _import("generic")
    out = []
    for name, needs in _REQUIREMENTS.items():
        if name == "generic":
            out.append(name)
        elif name == "dotprod":
            if platform.machine().lower() in ("arm64", "aarch64") and _arm_has_dotprod():
                out.append(name)
        elif platform.machine().lower() in ("x86_64", "amd64") and all(
            generic.cpu_supports(f) for f in needs
        ):
            out.append(name)
    return [v for v in out if _built(v)]


def _built(name: str) -> bool:
    try:
        from importlib.util import find_spec

        return find_spec(f"{__package__}._native_{name}") is not None
    except (ImportError, ValueError):
        return False


_loaded: ModuleType | None = None


def load(choice: str = "auto") -> ModuleType:
    """Import and return the kernel module: the best supported one, or the one forced by
    `--cpu` (an error naming what this CPU supports when it cannot run it)."""
    global _loaded
    supported = supported_variants()
    if choice in ("auto", None):
        name = supported[0]
    elif choice in ("baseline", "generic"):
        name = "generic"
    elif choice in supported:
        name = choice
    else:
        raise QpackError(
            f"--cpu {choice}: this CPU (or this build) cannot run it; "
            f"choose one of: auto, {', '.join(supported)}"
        )
    _loaded = _import(name)
    return _loaded


def current() -> ModuleType:
    """The kernel module in use (loading the best one on first use)."""
    return _loaded if _loaded is not None else load("auto")
