#!/usr/bin/env bash
# Every GPU figure of docs/PERFORMANCE.md in one go: one JSON per bench in OUT, then OUT/summary.md (figure, value,
# target, met or missed by how much, device) and OUT/summary.json.
#
#   bash bench/gpu_suite.sh OUT             # one H100/H200: about 4 minutes; each bench is capped, 8 min in all
#   bash bench/gpu_suite.sh OUT --dry-run   # the same scripts and code paths on the CPU, test sizes (< 2 min)
#
# Benches (ViT-B unless dry-run):
#   finetune_memory      joint fine-tuning peak memory, 3 and 6 phases of 128^3, batch 2, checkpointing on/off,
#                        next to the fit-check estimate (bench/finetune_memory.py)
#   mae_step             one MAE step, ours vs MONAI MaskedAutoEncoderViT, 4 x 4 x 128^3, mask 0.75, bf16, same
#                        input: step time, tokens/s, FLOPs and MFU (bench/mae_step.py)
#   mae_max_batch        largest MAE batch within 22 GiB (doubling then bisection, at most 256), volumes/s, MFU
#   inference_real       one real-size case, 3 x 380 x 190 x 190 (3 phases of 512x256x172 after 1 mm resampling),
#                        through mtl_breast.predictor.predict_volume, float32 as `mtl-breast predict` runs it
#   inference_real_bf16  the same under bf16 autocast, as validation runs it
# A bench that fails or runs past its cap leaves OUT/<bench>.json with "error" (its log in OUT/<bench>.log); the
# suite goes on and exits 1 at the end. PYTHON picks the interpreter (default: .venv/bin/python when present).
set -uo pipefail

usage() { echo "usage: bash bench/gpu_suite.sh OUT [--dry-run]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 && $1 != -* ]] || usage
OUT=$1
DRY=0
if [[ $# -eq 2 ]]; then
    [[ $2 == --dry-run ]] || usage
    DRY=1
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-}
if [[ -z $PY ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then PY=$ROOT/.venv/bin/python; else PY=python; fi
fi
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's mtl_breast, installed or not
: > "$OUT/runs.tsv"
failed=0

# run NAME CAP_SECONDS SCRIPT ARGS...: one bench; its JSON goes to OUT/NAME.json, its output to OUT/NAME.log.
run() {
    local name=$1 cap=$2 start rc
    shift 2
    echo "== $name: $*" >&2
    rm -f "$OUT/$name.json"
    start=$(date +%s.%N)
    timeout --kill-after=10 "$cap" "$PY" "$@" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
    rc=$?
    if [[ $rc -ne 0 || ! -s $OUT/$name.json ]]; then
        failed=$((failed + 1))
        echo "   $name failed (exit status $rc): see $OUT/$name.log" >&2
        "$PY" - "$OUT/$name.json" "$name" "$rc" "$cap" "$OUT/$name.log" <<'PYEOF'
import json
import sys

path, name, rc, cap, log = sys.argv[1:]
with open(log, errors="replace") as f:
    tail = f.read()[-3000:]
error = f"exit status {rc}" + (f" (stopped at its {cap} s cap)" if rc in ("124", "137") else "")
with open(path, "w") as f:
    json.dump({"benchmark": name, "error": error, "log_tail": tail}, f, indent=2)
PYEOF
    fi
    printf '%s\t%s\t%s\n' "$name" "$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')" \
        "$rc" >> "$OUT/runs.tsv"
}

if [[ $DRY -eq 0 ]]; then
    # Caps sum to 470 s: the suite ends within 8 minutes whatever happens.
    run finetune_memory 150 bench/finetune_memory.py --arch mtl_vit_base --size 128 --phases 3,6 --batch 2 \
        --checkpointing on,off --precision bf16-mixed --steps 3
    run mae_step 90 bench/mae_step.py --model base --size 128 --phases 4 --batch 4 --mask-ratio 0.75 --bf16 \
        --warmup 3 --steps 10
    run mae_max_batch 130 bench/mae_step.py --find-max-batch --model base --size 128 --phases 4 --mask-ratio 0.75 \
        --bf16 --grad-ckpt --limit-gib 22 --max-batch 256 --warmup 2 --steps 5
    run inference_real 50 bench/inference.py --arch mtl_vit_base --shape 3 380 190 190 --repeats 3
    run inference_real_bf16 50 bench/inference.py --arch mtl_vit_base --shape 3 380 190 190 --repeats 3 --bf16
else
    # Test-size models at 32^3 on the CPU through the same scripts and flags (fine-tuning at batch 1: its CPU
    # convolutions are slow); CPU stand-ins for CUDA-only calls: traced live tensor bytes for CUDA's peak memory
    # (bench_common.PeakMemory), a nominal 0.2 TFLOP/s bf16 peak for MFU, float32 where bf16 would only be slow.
    run finetune_memory 120 bench/finetune_memory.py --arch mtl_vit_test --size 32 --phases 3,6 --batch 1 \
        --checkpointing on,off --precision 32-true --steps 1 --device cpu --measure-on-cpu
    run mae_step 120 bench/mae_step.py --model test --size 32 --phases 4 --batch 4 --mask-ratio 0.75 --bf16 \
        --warmup 1 --steps 1 --device cpu --peak-tflops 0.2
    run mae_max_batch 120 bench/mae_step.py --find-max-batch --model test --size 32 --phases 4 --mask-ratio 0.75 \
        --grad-ckpt --limit-gib 0.012 --max-batch 8 --warmup 1 --steps 1 --device cpu --memory measured \
        --peak-tflops 0.2
    run inference_real 120 bench/inference.py --arch mtl_vit_test --shape 3 40 32 32 --repeats 1 --device cpu
    run inference_real_bf16 120 bench/inference.py --arch mtl_vit_test --shape 3 40 32 32 --repeats 1 --bf16 \
        --device cpu
fi

"$PY" bench/suite_summary.py "$OUT" $([[ $DRY -eq 1 ]] && echo --dry-run) > /dev/null || true
echo "summary: $OUT/summary.md" >&2
cat "$OUT/summary.md"
[[ $failed -eq 0 ]]
