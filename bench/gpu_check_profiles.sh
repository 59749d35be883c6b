#!/usr/bin/env bash
# VRAM-profile section of the GPU check (issue 4, item 7), sized for a lent H200: < ~4 min.
#
#   alone, from the repo root:   OUT=/some/dir bash bench/gpu_check_profiles.sh
#   from bench/gpu_check.sh:     GPU_CHECK_PROFILES=1 (see the line there)
#   a bitsandbytes wheel must travel (shared/wheels/, wheels/ or .whl/), as for gpu_check.sh.
#
# For a Qwen2.5-7B-shaped and a Llama-3.1-8B-shaped model (random weights, NF4, built from
# the config on the GPU by bench_memory.build_model), under the 8gb and then the 12gb
# profile: cap PyTorch's allocator with torch.cuda.set_per_process_memory_fraction at
# the card's memory less a 0.5 GiB CUDA context, plan the run as ESTrainer does, run one
# ES iteration (generate_population at the planned rows per chunk + es_update) and
# compare torch.cuda.max_memory_allocated with the plan (bench/check_profile_fit.py).
# Only the first PROFILES_CHUNKS chunks of the iteration's rows are generated (default 2:
# every chunk has the same shape, so the peak is the full iteration's; 0 = all chunks).
#
# Writes two files (the device tool returns at most 8 in all):
#   $OUT/profiles/profiles.md    log of every step, the plans, the tables and verdicts
#   $OUT/profiles/profiles.json  the records of bench/check_profile_fit.py, both shapes
# Knobs (environment): PYTHON (python3), PROFILES_CHUNKS (2), PROFILES_TIMEOUT (s per
# shape, 110), PROFILES_SHAPES ("qwen7b llama8b"), PROFILES_LIST ("8gb 12gb"),
# PROFILES_ARGS (more check_profile_fit.py options, e.g. "--kv-cache-dtype int8" to check
# the int8 KV cache's plan), PROFILES_DEVICE (cuda; "cpu" skips
# the CUDA probe: a dry run of this script's steps on a machine without a GPU, e.g.
#   PROFILES_DEVICE=cpu PROFILES_SHAPES=tiny PROFILES_LIST=cpu PROFILES_ARGS="--population 4
#   --batch 2 --prompt 16 --completion 8" OUT=/tmp/x bash bench/gpu_check_profiles.sh).
# Exit status: 0 if every shape ran to the end, else 1.
set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${OUT:=$REPO/gpu_out}"
PY=${PYTHON:-python3}
SITE=/tmp/lowmem_site
DIR="$OUT/profiles"
WORK=/tmp/profile_fit
LOG="$DIR/profiles.md"
rm -rf "$WORK"
mkdir -p "$DIR" "$SITE" "$WORK"
: >"$LOG"
# Work from /tmp: the repo root's kernels/ would shadow the PyPI `kernels` package.
cd /tmp || exit 1
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 OMP_WAIT_POLICY=PASSIVE \
       LOWMEM_ES_NOISE_BACKEND=eager PYTHONDONTWRITEBYTECODE=1
unset LOWMEM_ES_FORCE_TORCH
STATUS=0
say() { echo "== $*" | tee -a "$LOG"; }

# 1. bitsandbytes (carried wheel) and the package laid out as installed ----------------
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
if ! "$PY" -P -c "import bitsandbytes" >/dev/null 2>&1; then
    WHEELS=$(ls "$REPO"/shared/wheels/*.whl "$REPO"/wheels/*.whl "$REPO"/.whl/*.whl 2>/dev/null)
    say "installing carried wheels: ${WHEELS:-none found}"
    # shellcheck disable=SC2086
    [ -n "$WHEELS" ] && timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$SITE" $WHEELS >>"$LOG" 2>&1
fi
rm -rf "$SITE/lowmem_es"
cp -r "$REPO/lowmem_es" "$SITE/lowmem_es"
cp -r "$REPO/kernels" "$SITE/lowmem_es/kernels"

say "environment and bitsandbytes CUDA probe"
{
    echo '```'
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    timeout 60 "$PY" -P - 2>&1 <<'EOF'
import torch
import bitsandbytes as bnb
from bitsandbytes.functional import dequantize_4bit, quantize_4bit

print("torch", torch.__version__, "CUDA", torch.version.cuda, "bitsandbytes", bnb.__version__)
w = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)
q, state = quantize_4bit(w, quant_type="nf4", compress_statistics=True)
err = (dequantize_4bit(q, state) - w).abs().mean().item()
print("NF4 round trip mean abs error", round(err, 4))
assert err < 0.1, err
EOF
    echo "probe exit: $?"
    echo '```'
} >>"$LOG"
sed -n '/^```$/,/^```$/p' "$LOG"
if [ "${PROFILES_DEVICE:-cuda}" = cuda ] && ! grep -q "probe exit: 0" "$LOG"; then
    say "bitsandbytes does not work on this GPU: the NF4 models cannot be built; stopping"
    exit 1
fi

# 2. one process per shape (the model is built once and checked under every profile) --
for shape in ${PROFILES_SHAPES:-qwen7b llama8b}; do
    say "check_profile_fit.py --shape $shape (limit ${PROFILES_TIMEOUT:-110} s)"
    start=$SECONDS
    # shellcheck disable=SC2086
    timeout --kill-after=10 "${PROFILES_TIMEOUT:-110}" "$PY" "$REPO/bench/check_profile_fit.py" \
        --device "${PROFILES_DEVICE:-cuda}" --shape "$shape" --profiles ${PROFILES_LIST:-8gb 12gb} \
        --chunks "${PROFILES_CHUNKS:-2}" --out-dir "$WORK" ${PROFILES_ARGS:-} 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    say "$shape: exit $rc$([ "$rc" = 124 ] && echo ' (timeout)') after $((SECONDS - start)) s"
    [ "$rc" = 0 ] || STATUS=1
done

# 3. merge what each shape wrote (written after every profile, so a timeout keeps some) --
"$PY" -P - "$WORK" "$DIR/profiles.json" >>"$LOG" 2>&1 <<'EOF'
import json
import sys
from pathlib import Path

work, target = Path(sys.argv[1]), Path(sys.argv[2])
merged = {path.stem: json.loads(path.read_text()) for path in sorted(work.glob("*.json"))}
target.write_text(json.dumps(merged, indent=2))
print("\n## summary\n")
for path in sorted(work.glob("profile_fit_*.md")):
    print(path.read_text())
EOF
tail -n 30 "$LOG"
exit "$STATUS"
