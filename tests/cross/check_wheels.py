"""Does every runtime dependency of qpack install as a wheel on each platform the build
workflow covers, for CPython 3.11 and 3.12?

For each (platform, Python) it resolves pyproject.toml's `dependencies` by hand: the
environment markers are evaluated for the *target* (pip download's --platform does not change
sys_platform, so pip alone would follow this machine's markers), each requirement is fetched
with `pip download --only-binary=:all: --no-deps --platform ... --python-version ...`, and the
Requires-Dist of the wheel it got are followed the same way. Prints one line per platform and
Python, and each requirement that has no wheel there; exit status 1 if any.

    python tests/cross/check_wheels.py [--python 3.11 3.12]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]


def manylinux(arch: str) -> list[str]:
    return [f"manylinux_2_{m}_{arch}" for m in range(17, 40)] + [f"manylinux2014_{arch}"]


def macos(arch: str, first: int) -> list[str]:
    versions = [f"10_{m}" for m in range(9, 16)] + [f"{m}_0" for m in range(11, 16)]
    ok = [v for v in versions if int(v.split("_")[0]) >= first or first == 10]
    return [f"macosx_{v}_{a}" for v in ok for a in (arch, "universal2")]


# workflow job -> (wheel platform tags, marker environment)
PLATFORMS = {
    "ubuntu-latest (linux x86-64)": (manylinux("x86_64"), ("linux", "Linux", "x86_64")),
    "ubuntu-24.04-arm (linux arm64)": (manylinux("aarch64"), ("linux", "Linux", "aarch64")),
    "macos-15-intel (macOS x86-64)": (macos("x86_64", 10), ("darwin", "Darwin", "x86_64")),
    "macos-latest (macOS arm64)": (macos("arm64", 11), ("darwin", "Darwin", "arm64")),
    "windows-latest (Windows x86-64)": (["win_amd64"], ("win32", "Windows", "AMD64")),
}


def marker_env(python: str, target: tuple[str, str, str]) -> dict[str, str]:
    sys_platform, system, machine = target
    return {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "sys_platform": sys_platform,
        "platform_system": system,
        "platform_machine": machine,
        "os_name": "nt" if sys_platform == "win32" else "posix",
        "extra": "",
    }


def fetch(req: Requirement, tags: list[str], python: str, into: Path) -> Path | None:
    spec = f"{req.name}{req.specifier}"
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp", "-d", str(into), spec]  # fmt: skip
    for tag in tags:
        cmd += ["--platform", tag]
    before = set(into.glob("*.whl"))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return None
    new = set(into.glob("*.whl")) - before
    name = canonicalize_name(req.name).replace("-", "_")
    found = new or {w for w in into.glob("*.whl") if canonicalize_name(w.name.split("-")[0]).replace("-", "_") == name}  # fmt: skip
    return sorted(found)[0] if found else None


def requires(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    return [line[len("Requires-Dist: ") :] for line in text.splitlines() if line.startswith("Requires-Dist: ")]  # fmt: skip


def check(tags: list[str], target, python: str) -> tuple[list[str], list[str]]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    env = marker_env(python, target)
    todo = [Requirement(d) for d in deps]
    seen: set[str] = set()
    got, missing = [], []
    with tempfile.TemporaryDirectory() as tmp:
        while todo:
            req = todo.pop()
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            key = canonicalize_name(req.name)
            if key in seen:
                continue
            seen.add(key)
            wheel = fetch(req, tags, python, Path(tmp))
            if wheel is None:
                missing.append(str(req))
                continue
            got.append(wheel.name)
            todo += [Requirement(r) for r in requires(wheel)]
    return got, missing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", nargs="+", default=["3.11", "3.12"])
    args = parser.parse_args()
    bad = 0
    for job, (tags, target) in PLATFORMS.items():
        for python in args.python:
            got, missing = check(tags, target, python)
            status = "all wheels" if not missing else "NO WHEEL: " + ", ".join(missing)
            print(f"{job:34} cp{python.replace('.', '')}: {len(got):2} wheels, {status}")
            print(f"{'':34}   {' '.join(sorted(got))}")
            bad += bool(missing)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
