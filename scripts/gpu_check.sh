#!/usr/bin/env bash
# Every check that needs a GPU, in one run (issue #12): what decides whether the Triton kernel
# becomes the default on CUDA.
#
#   scripts/gpu_check.sh            # everything (about 5-8 minutes on one H200)
#   scripts/gpu_check.sh --quick    # no full test suite: doctor, the CUDA tests, the bench
#
# Stages, each logged to $OUT/<stage>.log (OUT defaults to runs/gpu_check):
#   1. doctor      versions, GPUs, the path per device; --compile for the local GPU
#   2. tests       the full test suite on this machine (the CUDA-only tests that skip without a
#                  GPU run here: CUDA graphs, capturable, CUDA checkpoints, tests/test_triton.py's
#                  CUDA tests: Triton vs for-loop vs foreach parity, graph capture, no sync)
#   3. triton      tests/test_triton.py, tests/test_triton_lowbit.py (the 8-bit kernel) and
#                  tests/test_triton_master.py (master-weight corrections)
#                  alone, verbose (the parity tests by name)
#   4. bench       adoptim bench --device cuda against torch.optim.Adam(fused=True), foreach
#                  ADOPT and the peers installed, suites a (20 x 1M), b (GPT-2 small), c;
#                  8-bit state: adopt-8bit-fused against adopt-8bit-foreach (its default)
#   5. targets     from the bench: adopt-fused within 1.05x of fused Adam on a and b, and
#                  >= 85 % of the card's peak bandwidth on a and b (adopt-8bit-fused: reported)
# The exit status is 0 only if every stage passed; $OUT/summary.txt says which did not.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
unset TRITON_INTERPRET ADOPTIM_FUSED_BACKEND  # the real GPU kernels, not the interpreter
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, installed or not
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"

declare -A RESULT
stage() {  # stage NAME COMMAND...: run, log, remember the outcome
    local name=$1
    shift
    echo "== $name: $*" | tee "$OUT/$name.log"
    local start=$SECONDS
    "$@" >>"$OUT/$name.log" 2>&1
    local rc=$?
    RESULT[$name]="rc=$rc ($((SECONDS - start)) s)"
    tail -n 25 "$OUT/$name.log"
    echo "== $name: ${RESULT[$name]}"
    return $rc
}

stage env bash -c "nvidia-smi || rocm-smi; $PY -c 'import sys, torch; print(sys.version); \
print(torch.__version__, torch.version.cuda, torch.version.hip, torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'; \
$PY -c 'import triton; print(\"triton\", triton.__version__)'"
stage doctor "$PY" -m adoptim.tools.cli doctor --compile

if [ "$QUICK" = 0 ]; then
    stage tests "$PY" -m pytest -q -x -p no:cacheprovider -rs
fi
stage triton "$PY" -m pytest -v -p no:cacheprovider -rs tests/test_triton.py \
    tests/test_triton_lowbit.py tests/test_triton_master.py

stage bench "$PY" -m adoptim.tools.cli bench --device cuda --suites a,b,c --rounds 3 --repeats 20 \
    --warmup 5 --no-progress --out "$OUT/bench" \
    --optimizers 'adam-fused,adam-foreach,adopt-fused,adopt-foreach,adopt-default,torch-adopt-*,timm-*,pytorch_optimizer,adopt-8bit-fused,adopt-8bit-foreach,torchao-adamw8bit,bnb-adam8bit'

stage targets "$PY" - "$OUT/bench/bench.json" <<'EOF'
import json, sys

report = json.load(open(sys.argv[1]))
ok = True
for suite in report["suites"]:
    eight, each = (suite["results"].get(k, {}) for k in ("adopt-8bit-fused", "adopt-8bit-foreach"))
    if "median_s" in eight and "median_s" in each:  # reported, no target yet
        print(f"({suite['suite']}) 8-bit: adopt-8bit-fused {eight['median_s'] * 1e3:.3f} ms, "
              f"{eight['gb_per_s']:.0f} GB/s, {each['median_s'] / eight['median_s']:.2f}x "
              f"faster than adopt-8bit-foreach")
    fused = suite["results"].get("adopt-fused", {})
    if "median_s" not in fused:
        print(f"({suite['suite']}) adopt-fused did not run: {fused.get('skipped')}")
        ok = False
        continue
    ratio, pct = fused["ratio_to_adam_fused"], fused.get("pct_of_peak_bandwidth")
    line = f"({suite['suite']}) adopt-fused {fused['median_s'] * 1e3:.3f} ms, {ratio:.3f}x fused Adam"
    line += f", {fused['gb_per_s']:.0f} GB/s" + (f" = {pct:.1f}% of peak" if pct else "")
    if suite["suite"] in ("a", "b"):  # the targets: large tensors
        passed = ratio <= 1.05 and (pct is None or pct >= 85.0)
        line += "  PASS" if passed else "  FAIL (target: <= 1.05x and >= 85% of peak)"
        ok &= passed
    print(line)
sys.exit(0 if ok else 1)
EOF

{
    echo "gpu_check $(date -u +%FT%TZ) on $(${PY} -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null)"
    for name in env doctor tests triton bench targets; do
        [ -n "${RESULT[$name]:-}" ] && echo "  $name: ${RESULT[$name]}"
    done
    cat "$OUT/targets.log" 2>/dev/null | grep '^(' || true
} | tee "$OUT/summary.txt"
for name in "${!RESULT[@]}"; do
    case "${RESULT[$name]}" in rc=0*) ;; *) exit 1 ;; esac
done
exit 0
