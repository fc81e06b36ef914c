#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): sepvit_tiny, setformer_tiny and timm's Swin-T and ViT-S side by side in one
# process, eager and compiled, bf16, batch 256; inference latency; a CUDA profile; the loader; the augmentation before
# and after issue 22. Rows are appended to benchmarks/RESULTS.md as they are measured. At most 8 minutes on a bare GPU
# machine: the install below takes ~5-15 s from carried wheels (capped at 45 s), the stages have their own budgets and
# everything runs under an outer `timeout` that ends 8 minutes after this script started.
#
#   bash benchmarks/gpu_check.sh                                  # on the GPU machine, from anywhere
#   bash benchmarks/gpu_check.sh --stages compile --models setformer  # rerun part of it
#   bash benchmarks/gpu_check.sh --dry-run                        # every stage at tiny size on CPU; table to a temp file
#
# The Python environment: the machine's own python3 with its torch, timm and triton, never replaced.
# - The packages our code imports that the image lacks (deepspeed, webdataset, simplejpeg, submitit and their own
#   needs) are installed with `pip --no-index --no-deps --target` from a folder of wheels into a scratch folder on
#   PYTHONPATH: GPU_CHECK_WHEELS, default .whl/ in the repository, made beforehand on a machine with PyPI by
#   `bash benchmarks/gpu_wheels.sh` (a few MB; the device tool carries it with carry=[".whl"]).
# - Without a wheels folder, what is missing is installed from the package index into the same scratch folder (torch
#   pinned to the installed version; deepspeed without prebuilt ops), where an index is reachable.
# - The repository itself is used from PYTHONPATH (nothing is installed for it).
# With --dry-run, GPU_CHECK_PYTHON or else the repository's .venv (make install) is used, and nothing is installed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY=${GPU_CHECK_DRY:-0}
for a in "$@"; do [ "$a" = "--dry-run" ] && DRY=1; done
say() { echo "[gpu_check.sh $SECONDS s] $*" >&2; }

if [ "$DRY" = 1 ]; then
    if [ -x .venv/bin/python ]; then PY=${GPU_CHECK_PYTHON:-.venv/bin/python}; else PY=${GPU_CHECK_PYTHON:-python3}; fi
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
    say "dry run on CPU with $PY (nothing installed)"
else
    PY=${GPU_CHECK_PYTHON:-python3}
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        say "$PY's torch sees no CUDA device: use --dry-run on CPU"
        exit 2
    fi
    SITE=${GPU_CHECK_SITE:-/tmp/vitpretrain-gpu-check-site}
    WHEELS=${GPU_CHECK_WHEELS:-$ROOT/.whl}
    mkdir -p "$SITE"
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    # import name -> requirement: what `pretrain train` imports (ray, for sweeps only, is left out)
    MISSING=$("$PY" - <<'EOF'
import importlib.util
reqs = {"deepspeed": "deepspeed==0.19.8", "webdataset": "webdataset>=0.2.100", "submitit": "submitit>=1.5",
        "simplejpeg": "simplejpeg>=1.7", "yaml": "pyyaml>=6", "PIL": "pillow>=10", "sklearn": "scikit-learn>=1.4",
        "tqdm": "tqdm>=4.66", "safetensors": "safetensors>=0.4", "fsspec": "fsspec", "numpy": "numpy>=1.26"}
print(" ".join(r for m, r in reqs.items() if importlib.util.find_spec(m) is None))
EOF
)
    if [ -z "$MISSING" ]; then
        say "nothing to install"
    elif [ -d "$WHEELS" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
        say "missing: $MISSING; installing the wheels of $WHEELS"
        timeout 45 "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
            --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl || say "installing the wheels failed"
    else
        say "missing: $MISSING; no wheels folder ($WHEELS): trying the package index (torch pinned)"
        PIN="$(mktemp)"
        "$PY" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" >"$PIN"
        for req in $MISSING; do
            left=$((45 - SECONDS))
            if [ "$left" -le 5 ]; then say "install budget spent: $req skipped"; continue; fi
            DS_BUILD_OPS=0 timeout "$left" "$PY" -m pip install -q --disable-pip-version-check -c "$PIN" --timeout 10 \
                --retries 1 --no-build-isolation --target "$SITE" "$req" || say "could not install $req"
        done
        rm -f "$PIN"
    fi
    say "environment ready"
fi

export PYTHONUNBUFFERED=1
# the stages keep their own budgets; this outer cap (8 minutes from the start, the install included) guards against a
# hung driver or kernel, and whatever rows were measured by then are in RESULTS.md already
exec timeout --signal=TERM --kill-after=5 $((480 - SECONDS)) "$PY" benchmarks/gpu_check.py "$@"
