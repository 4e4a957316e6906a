#!/usr/bin/env bash
# Cross-build the arm64 variants and run the kernel and model tests on them under qemu-aarch64.
#
#   tests/cross/run_arm64.sh [--slow]      (after tests/cross/setup_rootfs.sh)
#
# Two emulated CPUs: qemu's `max` (has dotprod + fp16: runtime/cpu.py must offer dotprod, and
# the tests run both variants) and cortex-a53 (plain armv8-a: generic only, dotprod refused).
# --slow adds the real-model tests (llama.cpp references, perplexity: long under emulation).
# Env: ROOTFS (/opt/arm64root), TREE (/tmp/arm64tree: the copy the .so files go into).
set -euo pipefail

ROOTFS=${ROOTFS:-/opt/arm64root}
TREE=${TREE:-/tmp/arm64tree}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
TESTS=(tests/test_quants.py tests/test_quants_k.py tests/test_quants_tiles.py tests/test_quants_iq.py
    tests/test_forward.py tests/test_model.py)

python "$REPO/tests/cross/build_arm64.py" --rootfs "$ROOTFS" --out "$TREE"
cd "$TREE"
export PYTHONPATH=$TREE/_pkg

py() { # py CPU args...: the arm64 python on that emulated CPU
    local cpu=$1
    shift
    qemu-aarch64 -cpu "$cpu" -L "$ROOTFS" "$ROOTFS/usr/bin/python3.11" "$@"
}

echo "== variant detection"
[ "$(py max -c 'from qpack.runtime import cpu; print(*cpu.supported_variants())')" = "dotprod generic" ]
[ "$(py cortex-a53 -c 'from qpack.runtime import cpu; print(*cpu.supported_variants())')" = "generic" ]
MODEL=$(py max -c "from qpack.builder.models import default_model_path; print(default_model_path())")
refused=$(py cortex-a53 -m qpack.runtime --cpu dotprod -m "$MODEL" -p x 2>&1 || true)
grep -q "cannot run it" <<<"$refused"
echo "max: dotprod generic; cortex-a53: generic (dotprod refused)"

echo "== fast tests, cpu max (dotprod + generic)"
py max -m pytest -q -p no:cacheprovider -m "not slow" "${TESTS[@]}"
echo "== fast tests, cpu cortex-a53 (generic)"
py cortex-a53 -m pytest -q -p no:cacheprovider -m "not slow" "${TESTS[@]}"

for variant in dotprod generic; do
    echo "== SmolLM2 on $variant"
    start=$(date +%s.%N)
    py max -m qpack.runtime -m "$MODEL" --cpu "$variant" -p "The capital of France is" --temp 0 -n 8
    echo "($(echo "$(date +%s.%N) - $start" | bc) s wall for load + prompt + 8 tokens, emulated)"
done

if [ "${1:-}" = "--slow" ]; then
    echo "== slow tests, cpu max (the best variant: dotprod)"
    py max -m pytest -q -p no:cacheprovider -m slow "${TESTS[@]}"
fi
