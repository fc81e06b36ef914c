#!/usr/bin/env bash
# The GPU check: bf16 training images/s, MFU and peak memory of sepvit_tiny and setformer_tiny at 224 (torch.compile
# off and on), the loader's images/s against that appetite, SeT vs SDPA at 1k-64k tokens, and a bf16 SIGKILL-and-resume
# on the GPU. One table, appended to benchmarks/RESULTS.md with the device name and date. At most ~8 minutes on one GPU
# machine: the install below is capped at 60 s (27 s measured on an H200 from carried wheels) and every stage of
# benchmarks/gpu_check.py has its own budget (420 s together) and is killed at it, its row saying so.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine, from anywhere
#   bash benchmarks/gpu_check.sh --dry-run   # every stage at tiny size on CPU (~1 min); table to a temp file
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh
#
# The Python environment: the machine's own torch (with CUDA) is used, never installed or replaced.
# - GPU_CHECK_VENV (default ~/.cache/vitpretrain/venv-gpu, outside the repository) is created once with
#   --system-site-packages, so it sees the machine's torch, and reused after that (~5 s to create).
# - The repository goes in with `pip install --no-deps -e .` (no download, ~5 s; --no-deps because pyproject pins
#   torch==2.13.0 and constraints.txt pins it too: resolving either would replace the machine's torch).
# - Whatever of the other dependencies is missing (deepspeed, webdataset, submitit, simplejpeg, ...) is installed
#   with pip under a constraint that pins torch to the version already there: deepspeed as the Makefile does it,
#   DS_BUILD_OPS=0 (no CUDA op is built; pure Python, ~20 s), --no-build-isolation so it builds against this torch.
#   GPU_CHECK_WHEELS=DIR installs from a folder of wheels/sdists instead (--no-index), for a machine without PyPI.
# - If pip cannot reach an index (no network), that step is skipped with a message, not a failure: the check goes on
#   with what is installed, and the stages that need a missing package fail alone, each in its own row.
# With --dry-run, GPU_CHECK_PYTHON or else the repository's .venv (make install) is used, and nothing is installed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY=${GPU_CHECK_DRY:-0}
for a in "$@"; do [ "$a" = "--dry-run" ] && DRY=1; done
say() { echo "[gpu_check.sh] $*" >&2; }

if [ "$DRY" = 1 ]; then
    if [ -x .venv/bin/python ]; then PY=${GPU_CHECK_PYTHON:-.venv/bin/python}; else PY=${GPU_CHECK_PYTHON:-python3}; fi
    say "dry run on CPU with $PY (nothing installed)"
else
    VENV=${GPU_CHECK_VENV:-$HOME/.cache/vitpretrain/venv-gpu}
    BASE_PY=${GPU_CHECK_PYTHON:-python3}
    if ! "$BASE_PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        say "warning: $BASE_PY's torch sees no CUDA device; the stages will fail (use --dry-run on CPU)"
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating $VENV (--system-site-packages: the machine's torch)"
        mkdir -p "$(dirname "$VENV")" && "$BASE_PY" -m venv --system-site-packages "$VENV" || { say "cannot create $VENV"; exit 2; }
    fi
    PY="$VENV/bin/python"
    # --system-site-packages reaches the base interpreter's packages only; where python3 is itself a venv (the torch
    # of a GPU image often is), a .pth file adds that venv's site-packages after ours
    "$BASE_PY" -c "import site; print('\n'.join(site.getsitepackages()))" \
        >"$("$PY" -c "import site; print(site.getsitepackages()[0])")/_gpu_check_base.pth"
    TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
    PIN="$(mktemp)"
    echo "torch==$TORCH_VERSION" >"$PIN"  # pip may never replace the machine's torch
    PIP=("$PY" -m pip install -q --disable-pip-version-check -c "$PIN" --timeout 15 --retries 1)
    if [ -n "${GPU_CHECK_WHEELS:-}" ]; then PIP+=(--no-index --find-links "$GPU_CHECK_WHEELS"); fi
    INSTALL_START=$SECONDS
    timeout 30 "$PY" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . \
        || say "pip install --no-deps -e . failed; going on with PYTHONPATH=$ROOT"
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    # import name -> requirement (pyproject.toml's dependencies, torch left out)
    MISSING=$("$PY" - <<'EOF'
import importlib.util
# ray (sweeps only, imported lazily, ~70 MB) is left out: `pretrain train` does not need it
reqs = {"deepspeed": "deepspeed>=0.16", "webdataset": "webdataset>=0.2.100", "submitit": "submitit>=1.5",
        "numpy": "numpy>=1.26", "yaml": "pyyaml>=6", "PIL": "pillow>=10", "sklearn": "scikit-learn>=1.4",
        "tqdm": "tqdm>=4.66", "safetensors": "safetensors>=0.4", "tensorboard": "tensorboard>=2.16",
        "matplotlib": "matplotlib>=3.8", "simplejpeg": "simplejpeg>=1.7"}
print(" ".join(r for m, r in reqs.items() if importlib.util.find_spec(m) is None))
EOF
)
    if [ -n "$MISSING" ]; then
        say "missing: $MISSING; installing (torch pinned to $TORCH_VERSION; pip's resolver complaints about" \
            "vitpretrain's own pins, torch==2.13.0 and ray, are expected: they are not installed on purpose)"
        for req in $MISSING; do
            left=$((60 - (SECONDS - INSTALL_START)))
            if [ "$left" -le 5 ]; then say "install budget (60 s) spent: $req skipped"; continue; fi
            if [[ "$req" == deepspeed* ]]; then
                # as in the Makefile, but for this GPU: no op prebuilt, DeepSpeed JIT-builds what it needs
                DS_BUILD_OPS=0 timeout "$left" "${PIP[@]}" --no-build-isolation "deepspeed==0.19.8" \
                    || say "could not install deepspeed (no index reachable?): the training and resume stages will fail"
            else
                timeout "$left" "${PIP[@]}" "$req" || say "could not install $req (no index reachable?): skipped"
            fi
        done
    fi
    rm -f "$PIN"
    say "environment ready in $((SECONDS - INSTALL_START)) s"
fi

export PYTHONUNBUFFERED=1
# the stages enforce their own budgets; this outer cap (8 min from the start, install included) guards against a hung
# driver
exec timeout $((480 - SECONDS)) "$PY" benchmarks/gpu_check.py "$@"
