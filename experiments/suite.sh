#!/usr/bin/env bash
# The whole evidence suite of docs/RESULTS.md, in order, on CPU: three demo runs (seeds 0-2), the held-out
# comparison with baselines and kinetics removed (on fresh phantoms, then on each run's own held-out split), the
# baselines' label curve, every ablation of experiments/variants.py (seeds 0-2) and the label-efficiency runs
# (seeds 0-2) with the starting regressions of their kinetic pathways; then the tables.
# Each step writes OUT/<step>.json and is skipped when that file exists (or skips the work whose outputs exist), so
# a stopped suite resumes.
# Held-out phantoms: the development set of configs/evaluation/sets.yaml (the experiments' default), where designs
# are chosen; the sealed test set is scored only by bench/robustness.py, once per design that becomes a default.
#   bash experiments/suite.sh runs/science       # about 10 hours on 2 cores
set -euo pipefail
OUT=${1:-runs/science}
PY=${PYTHON:-.venv/bin/python}
HELDOUT=(--heldout-dir "$OUT/heldout_data")
RUNS=("$OUT/seed0" "$OUT/seed1" "$OUT/seed2")
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
$PY -m experiments demo-runs --seeds 0 1 2 --workdir "$OUT" --out "$OUT/demo_runs.json"
# each run's per-case scores are kept (--scores-dir), so a resumed suite scores only the runs it had not
$PY -m experiments heldout --runs "${RUNS[@]}" "${HELDOUT[@]}" --scores-dir "$OUT/heldout_scores" \
    --out "$OUT/heldout.json"
# the same runs, each on its own held-out split (other cases per run), with the washout removed too
[ -f "$OUT/own_heldout.json" ] || $PY -m experiments own-heldout --runs "${RUNS[@]}" \
    --scores-dir "$OUT/own_heldout_scores" --out "$OUT/own_heldout.json"
# the baselines' pCR AUC against the number of labelled training cases (the runs' training cases pooled)
[ -f "$OUT/label_curve.json" ] || $PY bench/label_curve.py "${RUNS[@]}" \
    --heldout-dir "$OUT/heldout_data" --out "$OUT/label_curve.json"
# every ablation on seeds 0-2, one variant at a time across the seeds (the reference, scored only, first), so a
# suite stopped midway leaves whole variants
KEYS=$($PY -m experiments ablations --list | cut -f1)  # an assignment, so that a failure stops the suite
for key in $KEYS; do
    [ -f "$OUT/ablations_$key.json" ] || $PY -m experiments ablations --runs "${RUNS[@]}" "${HELDOUT[@]}" \
        --only "$key" --workdir "$OUT/ablations" --out "$OUT/ablations_$key.json"
done
$PY -m experiments label-efficiency --runs "${RUNS[@]}" "${HELDOUT[@]}" \
    --workdir "$OUT/label_efficiency" --out "$OUT/label_efficiency.json"
$PY bench/kinetic_start.py "$OUT"/label_efficiency/seed{0,1,2}_n{16,32,64}_MAE \
    --against "${RUNS[@]}" > "$OUT/kinetic_start.json"
$PY -m experiments report "$OUT/heldout.json" "$OUT/own_heldout.json" "$OUT"/ablations_*.json \
    "$OUT/label_efficiency.json" --out "$OUT/tables.md"
