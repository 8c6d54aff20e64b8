"""Markdown tables of stored experiment results, to paste into docs/RESULTS.md. Nothing is run again: the tables come
from the JSON files the experiments wrote (per-case scores included), files of earlier versions too.

Ablation and label-efficiency files of the same held-out set are joined into one table each (a reference run may sit
in another file); rows are paired with their comparison (ablations: the run's reference joint model; label
efficiency: scratch with the same labelled cases) case by case.

    python -m experiments report runs/science/heldout.json runs/science/own_heldout.json \\
        runs/science/ablations_*.json runs/science/label_efficiency.json --out runs/science/tables.md
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import numpy as np

from experiments.common import AS_ACQUIRED, WASHOUT_REMOVED, pooled_differences, summarise
from experiments.variants import COMPARISONS, MODEL, REFERENCE, baseline, row_key
from mtl_breast.files import write_text
from mtl_breast.metrics.classification import roc_auc
from mtl_breast.metrics.intervals import bootstrap_interval, mean_interval

# Files that record no held-out seed, neither as a field nor in their command, were scored with the default of the
# time, 10_000.
UNRECORDED_SEED = 10_000

# Columns of the own-heldout table: header -> the score it shows.
OWN_COLUMNS = (("model", MODEL), ("washout removed", f"joint model, {WASHOUT_REMOVED}"),
               ("size", baseline("size", "expert")), ("kinetic", baseline("kinetic", "expert")),
               ("concentration", baseline("concentration", "expert")), ("rim", baseline("rim", "expert")),
               ("inner rim", baseline("rim_inner", "expert")))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", help="JSON files the experiments wrote")
    p.add_argument("--out", required=True, help="markdown file to write")
    p.add_argument("--samples", type=int, default=1000, help="bootstrap resamples of the intervals computed here")


def _ci(low_high) -> str:
    low, high = low_high
    return f"[{low:.3f}, {high:.3f}]"


def _heldout_seed(r: dict) -> int:
    """The held-out seed of a result file (older files name it only in their command, or not at all)."""
    if "heldout_seed" in r:
        return int(r["heldout_seed"])
    words = shlex.split(r.get("command", ""))
    return int(words[words.index("--heldout-seed") + 1]) if "--heldout-seed" in words else UNRECORDED_SEED


def heldout_md(r: dict) -> list[str]:
    """The seed-averaged table of a `summarise` result: each predictor, then each paired difference."""
    lines = [f"{r['cases']} fresh phantoms with known pCR ({r['positives']} pCR), seed {_heldout_seed(r)}, "
             f"{r['seeds']} training seed(s); mean over seeds, 95% bootstrap interval over cases. Baselines are "
             "logistic regressions fitted on each run's training split (expert masks); their features on the "
             "held-out cases come from the expert mask or from the joint model's predicted mask. BA: the model "
             "at its validation-chosen threshold, the baselines at the training pCR rate. "
             f"Segmentation Dice of the model on these cases: {r['dice']:.3f} {_ci(r['dice_ci'])}.", "",
             "| predictor | AUC | 95% CI | BA | 95% CI | AUC per seed |", "|---|---|---|---|---|---|"]
    for name, row in r["table"].items():
        seeds = ", ".join(f"{v:.3f}" for v in row["auc_per_seed"])
        lines.append(f"| {name} | {row['auc']:.3f} | {_ci(row['auc_ci'])} | {row['ba']:.3f} | "
                     f"{_ci(row['ba_ci'])} | {seeds} |")
    lines += ["", "| paired AUC difference | value | 95% CI | per seed |", "|---|---|---|---|"]
    for key, row in r["differences"].items():  # keyed by comparison key, or by label in older files
        # four decimals: the issue's bars are differences of 0.03-0.05, which three decimals round across
        seeds = ", ".join(f"{v:+.3f}" for v in row.get("per_seed", []))  # older files have none
        lines.append(f"| {row.get('label', key)} | {row['auc_difference']:+.4f} | {_ci(row['ci'])} | {seeds} |")
    return lines


def own_heldout_md(r: dict, samples: int = 1000) -> list[str]:
    """Per run: AUCs on its own held-out split; then the mean over runs of each paired difference."""
    # Columns every run was scored with (files written before a baseline existed lack it).
    shown = {header: name for header, name in OWN_COLUMNS if all(name in run["table"] for run in r["per_run"])}
    lines = ["Each run scored on its own held-out split (the cases its demo predicted; no two runs share a case); "
             "baselines fitted on the run's training split, features from the expert mask (the columns) or the "
             "model's predicted mask.", "",
             f"| run | cases (pCR) | {' | '.join(shown)} | Dice |", "|" + "---|" * (len(shown) + 3)]
    for run in r["per_run"]:
        aucs = " | ".join(f"{run['table'][name]['auc']:.3f}" for name in shown.values())
        lines.append(f"| {Path(run['run']).name} | {run['cases']} ({run['positives']}) | {aucs} | {run['dice']:.3f} |")
    lines += ["", "Mean over runs of each run's paired AUC difference; 95% bootstrap interval resampling each run's "
              "cases independently:", "", "| paired AUC difference | mean | 95% CI | per run |", "|---|---|---|---|"]
    stored = r["pooled"]  # keyed by comparison key, or by label in older files
    found = {c.key: stored.get(c.key, stored.get(c.label)) for c in COMPARISONS}
    # Comparisons added after a file was written are computed from its per-case scores.
    missing = tuple(c for c in COMPARISONS if found[c.key] is None)
    if missing and "raw" in r:
        found.update(pooled_differences(r["raw"], samples=samples, comparisons=missing))
    for c in COMPARISONS:
        if found.get(c.key) is not None:
            row = found[c.key]
            per_run = ", ".join(f"{d:+.3f}" for d in row["per_run"])
            lines.append(f"| {c.label} | {row['auc_difference']:+.4f} | {_ci(row['ci'])} | {per_run} |")
    return lines


def _as_acquired(row: dict) -> np.ndarray:
    return np.array(row["raw"]["scores"][f"joint model, {AS_ACQUIRED}"])


def _check_same_cases(first: dict, *others: dict) -> None:
    """Rows are paired case by case: refuse any row scored on other held-out cases than `first`."""
    for other in others:
        if first["raw"]["ids"] != other["raw"]["ids"]:
            raise SystemExit(f"{first['variant']} and {other['variant']} were scored on different held-out cases")


def _intervals(a: dict, b: dict | None, samples: int) -> dict:
    """95% bootstrap intervals over the held-out cases of run `a`'s AUC and Dice and, given a run `b` scored on the
    same cases, the paired differences `a - b`."""
    y = np.array(a["raw"]["y"])
    pa, da = _as_acquired(a), np.array(a["raw"]["dice"])
    out = {"auc_ci": bootstrap_interval(lambda i: roc_auc(y[i], pa[i]), len(y), samples=samples),
           "dice_ci": mean_interval(da, samples=samples)}
    if b is None:
        return out
    _check_same_cases(a, b)
    pb, db = _as_acquired(b), np.array(b["raw"]["dice"])
    return {**out, "auc_diff": roc_auc(y, pa) - roc_auc(y, pb),
            "auc_diff_ci": bootstrap_interval(lambda i: roc_auc(y[i], pa[i]) - roc_auc(y[i], pb[i]), len(y),
                                              samples=samples),
            "dice_diff": float((da - db).mean()), "dice_diff_ci": mean_interval(da - db, samples=samples)}


def _comparison(row: dict, rows: list[dict], experiment: str) -> dict | None:
    """The row `row` is compared with (same run): ablations, the run's reference joint model; label efficiency,
    scratch with the same labelled cases. None where that is `row` itself or was not run."""
    if experiment == "ablations":
        base = next((r for r in rows if r["run"] == row["run"] and row_key(r) == REFERENCE.key), None)
    else:
        base = next((r for r in rows if r["run"] == row["run"] and r["labelled"] == row.get("labelled")
                     and r["init"] == "scratch"), None)
    return None if base is row else base


def _mean_auc_interval(y: np.ndarray, scores: list[np.ndarray], against: list[np.ndarray] | None,
                       samples: int) -> tuple[float, float]:
    """Bootstrap interval over cases of the mean over runs of each run's AUC, or of its paired AUC difference to
    `against` (one score array per run)."""
    def statistic(i: np.ndarray) -> float:
        aucs = [roc_auc(y[i], s[i]) for s in scores]
        if against is not None:
            aucs = [a - roc_auc(y[i], b[i]) for a, b in zip(aucs, against, strict=True)]
        return float(np.mean(aucs))

    return bootstrap_interval(statistic, len(y), samples=samples)


def over_seeds_md(rows: list[dict], experiment: str, samples: int = 1000) -> list[str]:
    """Variants run from more than one training run (seed): the mean over runs, with 95% bootstrap intervals over
    the held-out cases, resampled jointly for every run (as the held-out comparison does), and the mean paired
    difference to each run's own comparison row (`_comparison`)."""
    by_variant: dict[str, list[dict]] = {}
    for row in rows:  # ablation rows by variant key (older rows by label), label-efficiency rows by label
        by_variant.setdefault(row_key(row) or row["variant"], []).append(row)
    repeated = [group for group in by_variant.values() if len({r["run"] for r in group}) > 1]
    if not repeated:
        return []
    lines = ["Mean over training runs (seeds), 95% bootstrap intervals over the held-out cases; per-run values in "
             "run order.", "",
             "| variant | runs | pCR AUC | per run | Dice | AUC difference | per run | Dice difference |",
             "|---|---|---|---|---|---|---|---|"]
    for group in repeated:
        _check_same_cases(*group)
        y = np.array(group[0]["raw"]["y"])
        scores = [_as_acquired(r) for r in group]
        dice = np.stack([np.array(r["raw"]["dice"]) for r in group])  # [runs, cases]
        aucs = [roc_auc(y, s) for s in scores]
        auc_ci = _mean_auc_interval(y, scores, None, samples)
        cells = [group[0]["variant"], str(len(group)), f"{np.mean(aucs):.3f} {_ci(auc_ci)}",
                 ", ".join(f"{a:.3f}" for a in aucs),
                 f"{dice.mean():.3f} {_ci(mean_interval(dice.mean(axis=0), samples=samples))}"]
        bases = [_comparison(r, rows, experiment) for r in group]
        if all(b is not None for b in bases):
            for r, b in zip(group, bases, strict=True):
                _check_same_cases(r, b)
            pairs = [(s, _as_acquired(b)) for s, b in zip(scores, bases, strict=True)]
            diffs = [roc_auc(y, a) - roc_auc(y, b) for a, b in pairs]
            diff_ci = _mean_auc_interval(y, scores, [b for _, b in pairs], samples)
            dice_diff = (dice - np.stack([np.array(b["raw"]["dice"]) for b in bases])).mean(axis=0)  # [cases]
            cells += [f"{np.mean(diffs):+.3f} {_ci(diff_ci)}", ", ".join(f"{d:+.3f}" for d in diffs),
                      f"{dice_diff.mean():+.3f} {_ci(mean_interval(dice_diff, samples=samples))}"]
        else:
            cells += ["", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def variants_md(rows: list[dict], experiment: str, cases: int, seed: int, samples: int = 1000) -> list[str]:
    """One table for the rows of ablation or label-efficiency files: each run's AUC and Dice with intervals, and
    its paired difference to the comparison a reader wants (ablations: the run's reference joint model;
    label efficiency: MAE weights minus scratch at the same number of labelled cases)."""
    known = len(rows[0]["raw"]["y"]) if rows else 0
    against = "the reference joint model" if experiment == "ablations" else "scratch with the same labelled cases"
    lines = [f"{cases} held-out phantoms (seed {seed}), {known} with known pCR for the AUC; one row per run; 95% "
             f"bootstrap intervals over the held-out cases; differences are paired, against {against}.", "",
             "| run | variant | pCR AUC | AUC, washout removed | Dice | AUC difference | Dice difference |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        stats = _intervals(row, _comparison(row, rows, experiment), samples)
        diff = f"{stats['auc_diff']:+.3f} {_ci(stats['auc_diff_ci'])}" if "auc_diff" in stats else ""
        ddiff = f"{stats['dice_diff']:+.3f} {_ci(stats['dice_diff_ci'])}" if "dice_diff" in stats else ""
        flat = row["auc_washout_removed"]
        lines.append(f"| {Path(row['run']).name} | {row['variant']} | {row['auc']:.3f} {_ci(stats['auc_ci'])} | "
                     f"{'' if np.isnan(flat) else f'{flat:.3f}'} | {row['dice']:.3f} {_ci(stats['dice_ci'])} | "
                     f"{diff} | {ddiff} |")
    return lines


def render(paths: list[str], samples: int = 1000) -> str:
    """The markdown of the result files at `paths`: held-out and own-held-out files one by one, ablation and
    label-efficiency files joined per held-out set."""
    lines: list[str] = []
    joined: dict[tuple[str, int], dict] = {}
    for path in paths:
        r = json.loads(Path(path).read_text())
        if r["experiment"] in ("heldout", "own-heldout"):
            lines += [f"### {r['experiment']}", "", f"`{r['command']}` ({r['seconds']:.0f} s, {r['device']})", ""]
            lines += (heldout_md(r) if r["experiment"] == "heldout" else own_heldout_md(r, samples)) + [""]
        elif r["experiment"] in ("label-efficiency", "ablations"):
            group = joined.setdefault((r["experiment"], _heldout_seed(r)),
                                      {"rows": [], "commands": [], "cases": r["held_out_cases"]})
            group["rows"] += r["results"]
            group["commands"].append(f"`{r['command']}` ({r['seconds']:.0f} s, {r['device']})")
    for (experiment, seed), group in joined.items():
        lines += [f"### {experiment}", "", *group["commands"], ""]
        lines += variants_md(group["rows"], experiment, group["cases"], seed, samples) + [""]
        references = [r for r in group["rows"] if row_key(r) == REFERENCE.key]
        if references:  # scored with the baselines and the washout removed, as the held-out comparison is
            _check_same_cases(*references)
            summary = summarise([r["raw"] for r in references], samples=samples)
            lines += ["The reference joint models next to the baselines on the same cases:", "",
                      *heldout_md({**summary, "heldout_seed": seed}), ""]
        over_seeds = over_seeds_md(group["rows"], experiment, samples)
        lines += [*over_seeds, ""] if over_seeds else []
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> None:
    write_text(Path(args.out), render(args.results, args.samples))
    print(json.dumps({"experiment": "report", "files": args.results, "out": args.out}))
