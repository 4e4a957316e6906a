#!/usr/bin/env bash
# The system tools the portability tests use, installed where they can be (Debian/Ubuntu as
# root: CI and the dev machines); elsewhere those tests skip. Idempotent and quiet: nothing is
# fetched when everything is already installed.
#   mingw-w64, wine, wine64: the C runtime built for Windows and run (test_portability.py),
#                            PyInstaller's Windows bootloader run (test_pe_wine.py)
#   p7zip-full:              a second Deflate64 zip writer (test_pack.py)
#   unzip, binutils:         independent judges of the zip and ELF views
set -euo pipefail
packages=(mingw-w64 wine wine64 p7zip-full unzip binutils)
if ! command -v apt-get >/dev/null || ! command -v dpkg-query >/dev/null; then
    echo "setup_system: no apt here; the Windows/wine tests will skip" >&2
    exit 0
fi
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "setup_system: not root; missing ${missing[*]} (the Windows/wine tests will skip)" >&2
    exit 0
fi
echo "setup_system: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
