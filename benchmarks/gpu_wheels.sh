#!/usr/bin/env bash
# Fills .whl/ (or the folder given) with the wheels benchmarks/gpu_check.sh installs on the device machines' GPU image
# (Python 3.12, x86-64, no package index there): the pinned packages of benchmarks/gpu_wheels.txt. Run it here, where
# pip reaches PyPI; the device tool then carries the folder with carry=[".whl"] (.whl/ is git-ignored).
# deepspeed is published as a source distribution only: it is built here into a pure-Python wheel (DS_BUILD_OPS=0, no
# compiled op; DeepSpeed JIT-builds what it needs, and our optimizer step is torch's).
#
#   bash benchmarks/gpu_wheels.sh            # -> .whl/
#   bash benchmarks/gpu_wheels.sh /tmp/whl
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/.whl}"
PY="${GPU_WHEELS_PYTHON:-$ROOT/.venv/bin/python}"  # builds deepspeed's wheel: needs torch (make install)
mkdir -p "$OUT"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
grep -v '^\s*#' "$ROOT/benchmarks/gpu_wheels.txt" | grep -v '^\s*$' | while read -r req; do
    if [[ "$req" == deepspeed* ]]; then
        DS_BUILD_OPS=0 "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$OUT" "$req"
    else
        "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp "${PLATFORMS[@]}" -d "$OUT" "$req"
    fi
done
ls -1 "$OUT"
du -sh "$OUT"
