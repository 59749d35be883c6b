#!/usr/bin/env bash
# NF4 matmul section of bench/gpu_check.sh (issue 8): compiled-kernel tests + benchmark.
#
# Run from the repository root on the GPU machine, after bitsandbytes is installed (the
# main script carries its wheel), with OUT set:
#     OUT=/some/dir bash bench/gpu_check_nf4.sh
# Writes two files, to stay inside the device tool's 8-file return limit:
#     $OUT/nf4/nf4.log          environment probe, pytest output, benchmark markdown
#     $OUT/nf4/nf4_bench.json   raw benchmark results (and sweep, if run)
# Knobs (environment): PYTHON (default python3), NF4_TEST_TIMEOUT (s, default 300),
# NF4_BENCH_TIMEOUT (s, default 300), NF4_SWEEP=1 to add the launch-constant sweep,
# NF4_SWEEP_BUDGET (s, default 180; add it to NF4_BENCH_TIMEOUT).
# Exit status: 0 if the tests and the benchmark passed, else 1; it never stops the caller.
#
# Expected wall time on an H200 (not yet measured): tests 2-4 min (mostly Triton
# compiles, one per launch variant), benchmark 1-2 min, sweep its budget.

set -u -o pipefail
: "${OUT:?set OUT to the folder for results}"
PY=${PYTHON:-python3}
dir="$OUT/nf4"
log="$dir/nf4.log"
mkdir -p "$dir"
: >"$log"
status=0
say() { echo "== $*" | tee -a "$log"; }

# The package maps kernels/ to lowmem_es.kernels (pyproject package-dir). If it is not
# installed, build that mapping from symlinks instead of running from the repo root,
# where a top-level kernels/ would shadow the PyPI package `kernels`. -P keeps the
# current directory off sys.path for the same reason.
if ! "$PY" -P -c "import lowmem_es.kernels.nf4_matmul" >/dev/null 2>&1; then
    shim=$(mktemp -d)
    mkdir "$shim/lowmem_es"
    for entry in lowmem_es/*; do ln -s "$PWD/$entry" "$shim/lowmem_es/"; done
    ln -s "$PWD/kernels" "$shim/lowmem_es/kernels"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    say "lowmem_es not installed: importing it through symlinks in $shim"
fi

say "environment and bitsandbytes probe"
TRITON_INTERPRET=0 "$PY" -P - >>"$log" 2>&1 <<'EOF' || status=1
import torch
import triton

print("torch", torch.__version__, "CUDA", torch.version.cuda, "triton", triton.__version__)
print("GPU", torch.cuda.get_device_name(), "SMs",
      torch.cuda.get_device_properties(0).multi_processor_count)
import bitsandbytes as bnb
import bitsandbytes.functional as F

weight = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
packed, state = F.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
error = (F.dequantize_4bit(packed, state) - weight).abs().max().item()
print("bitsandbytes", bnb.__version__, "NF4 round trip max error", round(error, 4))
x = torch.randn(8, 512, device="cuda", dtype=torch.bfloat16)
print("bnb.matmul_4bit", tuple(bnb.matmul_4bit(x, packed, quant_state=state).shape))
from lowmem_es.kernels import nf4_matmul

out = nf4_matmul.nf4_matmul_triton(x, packed, state)
ref = nf4_matmul.nf4_matmul_torch(x, packed, state)
print("kernel smoke max |diff| vs twin", (out.float() - ref.float()).abs().max().item())
EOF

say "tests: tests/test_nf4_matmul.py with compiled kernels (TRITON_INTERPRET=0)"
TRITON_INTERPRET=0 timeout "${NF4_TEST_TIMEOUT:-300}" "$PY" -P -m pytest \
    tests/test_nf4_matmul.py -q -p no:warnings -p no:cacheprovider -rs --durations=10 \
    >>"$log" 2>&1 || { status=1; say "tests FAILED or timed out"; }

say "benchmark: bench/bench_nf4_matmul.py"
sweep=()
if [ "${NF4_SWEEP:-0}" = 1 ]; then
    sweep=(--sweep --sweep-budget "${NF4_SWEEP_BUDGET:-180}")
fi
TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 timeout "${NF4_BENCH_TIMEOUT:-300}" "$PY" -P \
    bench/bench_nf4_matmul.py --json "$dir/nf4_bench.json" "${sweep[@]}" \
    >>"$log" 2>&1 || { status=1; say "benchmark FAILED or timed out"; }

say "done, status $status"
exit "$status"
