#!/usr/bin/env bash
# GPU section of the lowmem-es vs TRL GRPO comparison (issue 10): speed and memory only.
#
# Run from the repository root on the GPU machine with OUT set, after bench/gpu_check.sh
# (or on its own: it installs carried wheels itself when bitsandbytes or trl is missing):
#     OUT=/some/dir bash bench/gpu_check_grpo.sh
# Needs wheels carried in shared/wheels/, wheels/ or .whl/ (installed --no-deps):
#     bitsandbytes-0.50.2 (43 MB), trl-1.16.0, datasets-5.2.0, dill-0.4.1,
#     multiprocess-0.70.19 (the last four ~1.8 MB together; pyarrow, pandas, xxhash are
#     already on the machine's image).
# The real SmolLM2 weights do not travel (64 MiB limit): the runs use a random-init model
# with SmolLM2-135M's shapes (compare_grpo.py --random-model), so accuracy is meaningless
# there; wall time, completions/s and torch.cuda.max_memory_allocated are what it measures.
# One lr per side (ES 0.01, GRPO 5e-5), 1024 completions each (8 steps of 128), 2 points.
#
# Writes (2 files, within the device tool's 8-file return limit):
#     $OUT/grpo/grpo.log        environment probe, the run's output and the table
#     $OUT/grpo/results.json    compare_grpo.py's results (per-run timings and memory)
# Knobs (environment): PYTHON (default python3), GRPO_TIMEOUT (s, default 420),
# GRPO_BUDGET (completions per run, default 1024).
# Exit status: that of compare_grpo.py (1 if the probe failed); never stops the caller.
# Expected wall time on an H200 (not yet measured): model build ~20 s, each run 1-3 min.

set -u -o pipefail
: "${OUT:?set OUT to the folder for results}"
PY=${PYTHON:-python3}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir="$OUT/grpo"
log="$dir/grpo.log"
mkdir -p "$dir"
: >"$log"
say() { echo "== $*" | tee -a "$log"; }

# Carried wheels, unless bitsandbytes and trl already import (gpu_check.sh installs them
# into /tmp/lowmem_site and puts it on PYTHONPATH).
if ! "$PY" -P -c "import bitsandbytes, trl, datasets" >/dev/null 2>&1; then
    WHEELS=$(ls "$REPO"/shared/wheels/*.whl "$REPO"/wheels/*.whl "$REPO"/.whl/*.whl 2>/dev/null)
    if [ -n "$WHEELS" ]; then
        site=/tmp/grpo_site
        say "installing carried wheels into $site"
        # shellcheck disable=SC2086
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" $WHEELS >>"$log" 2>&1
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi

# lowmem_es with kernels/ as lowmem_es.kernels, through symlinks when not installed: the
# repo root must never be on sys.path (its kernels/ shadows the PyPI package `kernels`).
if ! "$PY" -P -c "import lowmem_es.kernels" >/dev/null 2>&1; then
    shim=$(mktemp -d)
    mkdir "$shim/lowmem_es"
    for entry in "$REPO"/lowmem_es/*; do ln -s "$entry" "$shim/lowmem_es/"; done
    ln -s "$REPO/kernels" "$shim/lowmem_es/kernels"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi

say "environment probe"
if ! "$PY" -P - >>"$log" 2>&1 <<'EOF'
import torch
import bitsandbytes
import transformers, peft, trl, datasets
print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name())
for module in (transformers, peft, bitsandbytes, trl, datasets):
    print(module.__name__, module.__version__)
from bitsandbytes.functional import dequantize_4bit, quantize_4bit
w = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
q, state = quantize_4bit(w, quant_type="nf4", compress_statistics=True)
print("NF4 round trip mean abs error", (dequantize_4bit(q, state) - w).abs().mean().item())
EOF
then
    say "probe failed (see above): bitsandbytes / trl / datasets missing or broken; skipped"
    cat "$log"
    exit 1
fi
cat "$log"

say "compare_grpo.py --random-model on CUDA"
cd "$REPO" || exit 1
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 LOWMEM_ES_NOISE_BACKEND=eager
timeout --kill-after=15 "${GRPO_TIMEOUT:-420}" "$PY" bench/compare_grpo.py --device cuda \
    --random-model --budget "${GRPO_BUDGET:-1024}" --points 2 --eval-limit 32 --threads 4 \
    --es-lr 0.01 --grpo-lr 5e-5 --out-dir /tmp/compare_grpo_gpu --plot "" 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
cp /tmp/compare_grpo_gpu/results.json "$dir/results.json" 2>/dev/null
for run in /tmp/compare_grpo_gpu/*/train.log; do  # the workers' own logs, tails only
    [ -f "$run" ] && { echo "--- $run"; tail -n 15 "$run"; } >>"$log"
done
say "exit status $status"
exit "$status"
