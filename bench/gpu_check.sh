#!/usr/bin/env bash
# One GPU check for the Triton kernels (issue 3), sized for a lent H200: < ~8 minutes.
#
#   device run, from the repo root:  bash bench/gpu_check.sh      (timeout_s ~560)
#   carry a bitsandbytes wheel in shared/wheels/, wheels/ or .whl/ to test the 4-bit layer.
#
# Steps (each under its own `timeout`, so one hang cannot eat the lease):
#   1. machine facts (nvidia-smi, torch/triton/CUDA versions)            -> $OUT/env.txt
#   2. carried wheels installed with --no-deps into /tmp; bitsandbytes
#      imported and an NF4 round trip run on the GPU                     -> $OUT/bnb.txt
#   3. the package laid out in /tmp (lowmem_es + kernels as lowmem_es.kernels; the repo
#      root never goes on sys.path, its kernels/ would shadow a PyPI package)
#   4. kernel tests compiled for CUDA (TRITON_INTERPRET=0): noise, fused noisy LoRA with
#      the fp16/bf16 rows, ES update, the ES-LoRA layer on a tiny 4-bit model  -> tests.log
#      then the model path on CUDA: decode loop, host-memory embedding + graph capture,
#      kernel self-check                                               -> tests_model.log
#   5. bench_noisy_lora.py (providers x 7B shapes), bench_noise.py, bench_sampling.py,
#      a launch sweep
#                                                                        -> *.md
# Opt-in sections (environment): GPU_CHECK_NF4=1 (issue 8), GPU_CHECK_PROFILES=1 (issue 4:
# 7B/8B under 8/12 GB caps), GPU_CHECK_DECODE=1 (issues 9, 3, 4: decode loop, graph
# capture, fused vs cached LoRA, population tokens/s), GPU_CHECK_GRPO=1 (issue 10): each adds minutes, and the whole
# command must fit one 10-minute device call, so pick one or two per run.
# A summary table goes to stdout and $OUT/summary.md; with more than 7 files the rest is
# bundled into $OUT/gpu_check.tar.gz. Exit status: that of the tests.
set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$REPO/gpu_out}
PY=${PYTHON:-python3}
SITE=/tmp/lowmem_site
mkdir -p "$OUT" "$SITE"
# Work from /tmp: `python -c` and `python -m` put the current directory on sys.path, and
# the repo root's kernels/ would shadow the PyPI `kernels` that bitsandbytes probes.
cd /tmp || exit 1
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 OMP_WAIT_POLICY=PASSIVE \
       LOWMEM_ES_NOISE_BACKEND=eager PYTHONDONTWRITEBYTECODE=1
unset LOWMEM_ES_FORCE_TORCH
SUMMARY=()
TESTS_RC=1

step() {  # step NAME SECONDS LOGFILE command...: run with a timeout, log, record rc + time
    local name=$1 limit=$2 log=$3
    shift 3
    local start=$SECONDS rc
    echo "=== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    SUMMARY+=("| $name | $rc$([ "$rc" = 124 ] && echo ' (timeout)') | $((SECONDS - start)) |")
    return "$rc"
}

# 1. machine facts -------------------------------------------------------------------------
{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0]); \
print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); \
p = torch.cuda.get_device_properties(0); print(p.name, p.multi_processor_count, 'SMs', \
round(p.total_memory / 2**30, 1), 'GiB')" 2>&1
    git -C "$REPO" rev-parse HEAD 2>/dev/null || echo "commit: unknown (no git metadata)"
} >"$OUT/env.txt"
cat "$OUT/env.txt"

# 2. carried wheels (bitsandbytes) ---------------------------------------------------------
WHEELS=$(ls "$REPO"/shared/wheels/*.whl "$REPO"/wheels/*.whl "$REPO"/.whl/*.whl 2>/dev/null)
if [ -n "$WHEELS" ]; then
    # shellcheck disable=SC2086
    step "install carried wheels (--no-deps)" 60 "$OUT/bnb.txt" \
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" $WHEELS
fi
export PYTHONPATH=$SITE
step "bitsandbytes import + CUDA NF4 round trip" 60 "$OUT/bnb_check.txt" "$PY" -c "
import torch, bitsandbytes as bnb
from bitsandbytes.functional import dequantize_4bit, quantize_4bit
w = torch.randn(512, 512, device='cuda', dtype=torch.bfloat16)
q, state = quantize_4bit(w, quant_type='nf4', compress_statistics=True)
err = (dequantize_4bit(q, state) - w).abs().mean().item()
print('bitsandbytes', bnb.__version__, 'NF4 mean abs error', round(err, 4))
assert err < 0.1, err
"
cat "$OUT/bnb_check.txt" >>"$OUT/bnb.txt" 2>/dev/null
rm -f "$OUT/bnb_check.txt"

# 3. the package, laid out as installed ----------------------------------------------------
rm -rf "$SITE/lowmem_es"
cp -r "$REPO/lowmem_es" "$SITE/lowmem_es"
cp -r "$REPO/kernels" "$SITE/lowmem_es/kernels"

# 4. kernel tests on CUDA (from /tmp: the repo root must not be on sys.path) ---------------
step "kernel tests (CUDA, TRITON_INTERPRET=0)" 210 "$OUT/tests.log" \
    "$PY" -m pytest "$REPO/tests/test_noisy_lora.py" "$REPO/tests/test_es_update.py" \
    "$REPO/tests/test_noise.py" "$REPO/tests/test_sampling.py" \
    -q -p no:warnings -p no:cacheprovider -rs --durations=10
TESTS_RC=$?
# 4b. the model path on CUDA (needs the carried bitsandbytes): the input embedding kept in
# host memory with the decode step captured as a CUDA graph, the decode loop, the startup
# kernel self-check. Separate, so that a bitsandbytes mismatch cannot hide kernel results.
MODEL_TESTS=("$REPO/tests/test_model.py" "$REPO/tests/test_decode.py" "$REPO/tests/test_kv_cache.py")
[ -f "$REPO/tests/test_kernel_check.py" ] && MODEL_TESTS+=("$REPO/tests/test_kernel_check.py")
step "model-path tests (CUDA)" 120 "$OUT/tests_model.log" \
    "$PY" -m pytest "${MODEL_TESTS[@]}" -q -p no:warnings -p no:cacheprovider -rs \
    --durations=5 || TESTS_RC=$((TESTS_RC > 0 ? TESTS_RC : 1))

# 5. benchmarks ----------------------------------------------------------------------------
step "bench_noisy_lora.py (grid)" 170 "$OUT/bench_noisy_lora.md" \
    "$PY" "$REPO/bench/bench_noisy_lora.py"
step "bench_noise.py" 60 "$OUT/bench_noise.md" "$PY" "$REPO/bench/bench_noise.py"
step "bench_sampling.py" 40 "$OUT/bench_sampling.md" "$PY" "$REPO/bench/bench_sampling.py"
step "bench_noisy_lora.py --sweep" 50 "$OUT/sweep.md" \
    "$PY" "$REPO/bench/bench_noisy_lora.py" --sweep --shapes 4096x4096 --ranks 16 \
    --rows 512 --members 32

# NF4 matmul (issue 8): its own section, ~3-6 min more; opt in when the budget allows
# (GPU_CHECK_NF4=1), since the whole script must fit one 10-minute device command.
if [ "${GPU_CHECK_NF4:-0}" = "1" ]; then
    OUT="$OUT" bash "$REPO/bench/gpu_check_nf4.sh" || SUMMARY+=("| gpu_check_nf4.sh | $? | - |")
fi

# VRAM profiles (issue 4, item 7): 7B/8B NF4 models under 8 GB / 12 GB caps, ~4 min more;
# opt in (GPU_CHECK_PROFILES=1).
if [ "${GPU_CHECK_PROFILES:-0}" = "1" ]; then
    OUT="$OUT" PYTHON="$PY" bash "$REPO/bench/gpu_check_profiles.sh" \
        || SUMMARY+=("| gpu_check_profiles.sh | $? | - |")
fi
# lowmem-es vs TRL GRPO (issue 10), speed and memory on a random SmolLM2-shaped model,
# ~3-7 min more; needs trl + datasets wheels carried; opt in (GPU_CHECK_GRPO=1).
if [ "${GPU_CHECK_GRPO:-0}" = "1" ]; then
    OUT="$OUT" PYTHON="$PY" bash "$REPO/bench/gpu_check_grpo.sh" \
        || SUMMARY+=("| gpu_check_grpo.sh | $? | - |")
fi
# Decode loop (issue 9) and population evaluation (issue 4), ~3-4 min more; opt in
# (GPU_CHECK_DECODE=1): generate() vs the loop vs the loop + CUDA graph, with the fused LoRA
# kernel and with the cached torch LoRA path (issue 3's design question), on a 4-layer
# Qwen2.5-7B-shaped NF4 model, in ms/step and as a multiple of the weight-read floor; then
# mixed-member vs plain vs one-adapter vs member-by-member tokens/s on the same widths.
if [ "${GPU_CHECK_DECODE:-0}" = "1" ]; then
    step "bench_decode.py (CUDA)" 200 "$OUT/bench_decode.md" \
        "$PY" "$REPO/bench/bench_decode.py" --rows 8 32 128 --new-tokens 32 --layers 4
    step "bench_population.py (CUDA)" 150 "$OUT/bench_population.md" \
        "$PY" "$REPO/bench/bench_population.py" --device cuda --shape qwen7b --population 8 \
        --batch 4 --prompt 64 --completion 32 --repeats 3 --lora
fi
# Each opt-in section adds ~2 files; the device tool returns at most 8 from $OUT, so with
# more than one section run the per-section files are bundled at the end (see below).

# summary ----------------------------------------------------------------------------------
{
    echo "## gpu_check summary ($(head -1 "$OUT/env.txt"))"
    echo
    echo "| step | exit | seconds |"
    echo "|---|---:|---:|"
    printf '%s\n' "${SUMMARY[@]}"
    echo
    echo "tests: $(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -1)"
    echo "model-path tests: $(grep -E '(passed|failed|error)' "$OUT/tests_model.log" \
        2>/dev/null | tail -1)"
    echo "bitsandbytes: $(tail -1 "$OUT/bnb.txt" 2>/dev/null || echo 'no output')"
} | tee "$OUT/summary.md"
# Bundle: summary.md stays readable; everything else goes into one archive when there are
# more files than the device tool returns (8). Unpack with `tar xzf gpu_check.tar.gz`.
FILES=$(find "$OUT" -type f | wc -l)
if [ "$FILES" -gt 7 ]; then
    (cd "$OUT" && find . -type f ! -name summary.md ! -name gpu_check.tar.gz -print0 \
        | tar czf gpu_check.tar.gz --null -T - --remove-files) \
        && find "$OUT" -mindepth 1 -type d -empty -delete
fi
exit "$TESTS_RC"
