#!/usr/bin/env bash
# The whole evidence suite of docs/RESULTS.md, in order, on CPU: three demo runs (seeds 0-2), the held-out
# comparison with baselines and kinetics removed (on fresh phantoms, then on each run's own held-out split), the
# baselines' label curve, the ablations (seeds 0-2) and the label-efficiency runs (seeds 0-2) with the starting
# regressions of their kinetic pathways.
# Each step writes OUT/<step>.json and skips work whose outputs exist, so a stopped suite resumes.
# Held-out phantoms: the development set of configs/evaluation/sets.yaml (seed 30000, HELDOUT_SEED), where designs are
# chosen; the sealed test set is scored only by bench/robustness.py, once per design that becomes a default.
#   bash bench/science.sh runs/science       # about 10 hours on 2 cores
set -euo pipefail
OUT=${1:-runs/science}
PY=${PYTHON:-.venv/bin/python}
HELDOUT=(--heldout-dir "$OUT/heldout_data" --heldout-seed "${HELDOUT_SEED:-30000}")
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
$PY bench/science.py demo-runs --seeds 0 1 2 --workdir "$OUT" --out "$OUT/demo_runs.json"
# each run's per-case scores are kept (--scores-dir), so a resumed suite scores only the runs it had not
$PY bench/science.py heldout --runs "$OUT/seed0" "$OUT/seed1" "$OUT/seed2" "${HELDOUT[@]}" \
    --scores-dir "$OUT/heldout_scores" --out "$OUT/heldout.json"
# the same runs, each on its own held-out split (other cases per run), with the washout removed too
[ -f "$OUT/own_heldout.json" ] || $PY bench/science.py own-heldout --runs "$OUT/seed0" "$OUT/seed1" "$OUT/seed2" \
    --scores-dir "$OUT/own_heldout_scores" --out "$OUT/own_heldout.json"
# the baselines' pCR AUC against the number of labelled training cases (the runs' training cases pooled)
[ -f "$OUT/label_curve.json" ] || $PY bench/label_curve.py "$OUT/seed0" "$OUT/seed1" "$OUT/seed2" \
    --heldout-dir "$OUT/heldout_data" --out "$OUT/label_curve.json"
# every ablation on seeds 0-2: the reference scored once, then one variant at a time across the seeds, so a suite
# stopped midway leaves whole variants
[ -f "$OUT/ablations_reference.json" ] || $PY bench/science.py ablations --runs "$OUT/seed0" "$OUT/seed1" "$OUT/seed2" \
    "${HELDOUT[@]}" --only "joint model (reference)" --workdir "$OUT/ablations" --out "$OUT/ablations_reference.json"
for variant in "segmentation loss only" "pCR loss only" "phases as input channels (plain spatial ViT)" \
        "joint space-time attention" "MAE with whole-phase masking (0.5)" "no kinetic pathway" \
        "pCR token path with dropout 0.5" "concentration kinetic pathway" "inner-rim kinetic pathway"; do
    tag=$(echo "${variant%% (*}" | tr ' ' _)
    [ -f "$OUT/ablations_$tag.json" ] || $PY bench/science.py ablations --runs "$OUT/seed0" "$OUT/seed1" "$OUT/seed2" \
        "${HELDOUT[@]}" --only "$variant" --workdir "$OUT/ablations" --out "$OUT/ablations_$tag.json"
done
$PY bench/science.py label-efficiency --runs "$OUT/seed0" "$OUT/seed1" "$OUT/seed2" "${HELDOUT[@]}" \
    --workdir "$OUT/label_efficiency" --out "$OUT/label_efficiency.json"
$PY bench/kinetic_start.py "$OUT"/label_efficiency/seed{0,1,2}_n{16,32,64}_MAE \
    --against "$OUT/seed0" "$OUT/seed1" "$OUT/seed2" > "$OUT/kinetic_start.json"
$PY bench/science.py report "$OUT/heldout.json" "$OUT/own_heldout.json" "$OUT"/ablations_*.json "$OUT/label_efficiency.json" --out "$OUT/tables.md"
