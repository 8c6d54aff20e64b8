"""experiments/: the ablation overlays parse and change their base config, the variant and comparison tables are
consistent, `python -m experiments` lists and runs experiments by name, and the report renders stored JSON (a
hand-computed case, files of the current and of the earlier format)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from experiments import common, heldout, report
from experiments.__main__ import EXPERIMENTS, main
from experiments.ablations import work_folder
from experiments.variants import COMPARISONS, MODEL, OVERLAYS, REFERENCE, VARIANTS, WASHOUT_REMOVED, row_key, variant
from mtl_breast.metrics.classification import roc_auc
from mtl_breast.models.registry import create_model
from mtl_breast.run.train import parse_training_config

ROOT = Path(__file__).resolve().parents[1]
OVERLAY_FILES = sorted(OVERLAYS.glob("*.yaml"))


def _task(overlay: Path) -> str:
    return "pretrain" if overlay.name.startswith("mae_") else "finetune"


def _parsed(task: str, *configs: Path) -> dict:
    flags = [arg for path in configs for arg in ("--config", str(path))]
    parsed = parse_training_config(task, [*flags, "--data.root", "phantoms"]).as_dict()
    parsed.pop("config", None)  # the config files' own paths
    return parsed


# ---------------------------------------------------------------------------------------------- overlays and tables
@pytest.mark.parametrize("overlay", OVERLAY_FILES, ids=lambda p: p.name)
def test_every_overlay_parses_on_its_base_changes_it_and_builds_its_model(overlay):
    task = _task(overlay)
    base = ROOT / "configs" / task / "demo.yaml"
    # The header says what it changes and the command that applies it.
    text = overlay.read_text()
    assert text.startswith(f"# Overlay on configs/{task}/demo.yaml: ")
    assert f"mtl-breast {task} fit --config configs/{task}/demo.yaml --config configs/experiments/{overlay.name}" \
        in text
    merged, plain = _parsed(task, base, overlay), _parsed(task, base)
    assert merged != plain
    changed = yaml.safe_load(text)
    for section, values in changed.items():  # every value the overlay names is the merged config's
        for key, value in values.items():
            assert merged[section][key] == value, f"{section}.{key}"
    # model_args go to the registry factory unchecked by the parser: a misspelt key fails here, not hours later.
    model = create_model(merged["model"]["arch"], img_size=merged["data"]["crop_size"],
                         **(merged["model"]["model_args"] or {}))
    assert isinstance(model, torch.nn.Module)


def test_variants_have_stable_keys_labels_and_existing_overlays():
    keys, labels = [v.key for v in VARIANTS], [v.label for v in VARIANTS]
    assert len(set(keys)) == len(keys) and len(set(labels)) == len(labels)
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", key) for key in keys)
    assert [v for v in VARIANTS if not v.trains] == [REFERENCE] == [VARIANTS[0]]
    for v in VARIANTS:
        for task in ("finetune", "pretrain"):
            path = v.overlay(task)
            if path is not None:
                assert path.is_file(), path
                assert _task(path) == task, f"{v.key}: {path.name} is not a {task} overlay"
    assert variant("no_kinetic").label == "no kinetic pathway"
    with pytest.raises(SystemExit, match="known: reference, "):
        variant("no kinetic pathway")  # labels are for tables, not for choosing
    assert row_key({"key": "joint_attention", "variant": "anything"}) == "joint_attention"
    assert row_key({"variant": "joint model (reference)"}) == "reference"  # a row written before rows had keys
    assert row_key({"variant": "16 labelled, MAE"}) is None


def test_every_comparison_names_scores_that_scoring_writes():
    names = set(common.score_names())
    assert len({c.key for c in COMPARISONS}) == len(COMPARISONS) == len({c.label for c in COMPARISONS})
    for c in COMPARISONS:
        assert c.a in names and c.b in names, c
    assert MODEL in names and WASHOUT_REMOVED in names


def test_ablation_work_folders_are_named_by_key_and_reuse_label_named_ones(tmp_path):
    run, v = tmp_path / "seed0", variant("no_kinetic")
    assert work_folder(tmp_path, run, v) == tmp_path / "seed0_no_kinetic"
    (tmp_path / "seed0_no_kinetic_pathway").mkdir()  # trained before variants had keys
    assert work_folder(tmp_path, run, v) == tmp_path / "seed0_no_kinetic_pathway"


def test_help_lists_every_experiment_and_each_one_parses_its_flags(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for name in EXPERIMENTS:
        assert f"  {name} " in text
    for name in EXPERIMENTS:
        with pytest.raises(SystemExit) as stop:
            main([name, "--help"])
        assert stop.value.code == 0
        assert f"usage: python -m experiments {name}" in capsys.readouterr().out
    assert main(["ablations", "--list"]) == 0
    listed = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert listed == [[v.key, v.label] for v in VARIANTS]
    with pytest.raises(SystemExit, match="give --runs and --out"):
        main(["ablations", "--only", "no_kinetic"])


def test_heldout_defaults_are_the_development_set():
    development = yaml.safe_load((ROOT / "configs" / "evaluation" / "sets.yaml").read_text())["development"]
    assert common.DEVELOPMENT == development
    import argparse

    p = argparse.ArgumentParser()
    common.add_heldout_arguments(p)
    args = p.parse_args([])
    assert (args.heldout_seed, args.cases, args.size) == (development["seed"], development["cases"],
                                                          development["size"])


# ---------------------------------------------------------------------------------------------- report, by hand
def _row(key: str | None, label: str, scores: list[float], dice: list[float]) -> dict:
    y = [0.0, 0.0, 1.0, 1.0]
    return {"run": "runs/x/seed0", **({"key": key} if key else {}), "variant": label,
            "auc": roc_auc(np.array(y), np.array(scores)), "auc_washout_removed": 0.6, "dice": float(np.mean(dice)),
            "raw": {"ids": ["a", "b", "c", "d"], "y": y, "scores": {MODEL: scores}, "thresholds": {MODEL: 0.5},
                    "dice": dice}}


@pytest.mark.parametrize("with_keys", [True, False], ids=["keyed rows", "rows of earlier files"])
def test_report_renders_a_hand_computed_ablation_table(tmp_path, with_keys):
    # Four cases, two with pCR. Reference: both positives above both negatives, AUC 1. Variant: the positive
    # scored 0.2 beats one negative of two, the one scored 0.9 both: AUC 3/4. Dice 0.85 and 0.55.
    rows = [_row("reference" if with_keys else None, "joint model (reference)", [0.1, 0.2, 0.8, 0.9],
                 [0.9, 0.9, 0.8, 0.8]),
            _row("pcr_loss_only" if with_keys else None, "pCR loss only", [0.1, 0.8, 0.2, 0.9], [0.5, 0.5, 0.6, 0.6])]
    path = tmp_path / "ablations.json"
    path.write_text(json.dumps({"experiment": "ablations", "held_out_cases": 4, "heldout_seed": 30000,
                                "seconds": 12.0, "device": "cpu", "command": "python -m experiments ablations",
                                "results": rows}))
    assert main(["report", str(path), "--out", str(tmp_path / "tables.md"), "--samples", "50"]) == 0
    lines = (tmp_path / "tables.md").read_text().splitlines()
    assert lines[0] == "### ablations"
    assert "`python -m experiments ablations` (12 s, cpu)" in lines
    assert any(line.startswith("4 held-out phantoms (seed 30000), 4 with known pCR") for line in lines)
    variant_row = next(line for line in lines if line.startswith("| seed0 | pCR loss only |"))
    cells = [c.strip() for c in variant_row.split("|")][1:-1]
    assert [cells[2].split()[0], cells[3], cells[4].split()[0], cells[5].split()[0], cells[6].split()[0]] == \
        ["0.750", "0.600", "0.550", "-0.250", "-0.300"]
    reference_row = next(line for line in lines if line.startswith("| seed0 | joint model (reference) |"))
    assert reference_row.endswith("|  |  |")  # the reference is the comparison: no difference to itself
    assert "The reference joint models next to the baselines on the same cases:" in lines


def test_report_renders_differences_by_key_and_by_label(tmp_path):
    """A held-out file of today (differences keyed by comparison key, with their label) and one of earlier versions
    (keyed by label) give the same row."""
    table = {MODEL: {"auc": 0.8, "auc_ci": [0.7, 0.9], "ba": 0.7, "ba_ci": [0.6, 0.8], "auc_per_seed": [0.8]}}
    row = {"auc_difference": 0.1, "ci": [0.05, 0.15], "per_seed": [0.1]}
    base = {"experiment": "heldout", "command": "c", "seconds": 1.0, "device": "cpu", "cases": 4, "positives": 2,
            "seeds": 1, "table": table, "dice": 0.9, "dice_ci": [0.85, 0.95], "heldout_seed": 30000}
    expected = "| model - size baseline (expert mask) | +0.1000 | [0.050, 0.150] | +0.100 |"
    for name, differences in (("today", {"size_expert": {"label": "model - size baseline (expert mask)", **row}}),
                              ("earlier", {"model - size baseline (expert mask)": row})):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**base, "differences": differences}))
        text = report.render([str(path)])
        assert expected in text.splitlines()
        assert "| joint model, as acquired | 0.800 | [0.700, 0.900] | 0.700 | [0.600, 0.800] | 0.800 |" in text


# ---------------------------------------------------------------------------------------------- the experiments' parts
def test_inputs_remove_or_reverse_the_kinetics():
    image = torch.arange(4.0)[:, None, None, None].expand(4, 2, 2, 2)
    assert common.flatten_washout(image)[:, 0, 0, 0].tolist() == [0.0, 1.0, 1.0, 1.0]
    assert common.reverse_post_contrast(image)[:, 0, 0, 0].tolist() == [0.0, 3.0, 2.0, 1.0]


def test_summary_and_report(tmp_path):
    rng = np.random.default_rng(0)
    y = (rng.random(60) < 0.4).astype(float)
    names = ["joint model, as acquired", "joint model, washout removed (post-contrast flattened)",
             "joint model, post-contrast phases reversed", "size baseline, expert mask",
             "size baseline, predicted mask", "kinetic baseline, expert mask", "kinetic baseline, predicted mask",
             "generating model (ceiling)"]

    def run(noise: float) -> dict:
        scores = {n: (y + rng.normal(scale=noise if "as acquired" in n else 1.0, size=60)).tolist() for n in names}
        return {"y": y.tolist(), "scores": scores, "thresholds": dict.fromkeys(names, 0.5),
                "dice": rng.uniform(0.8, 0.9, 60).tolist()}

    summary = common.summarise([run(0.3), run(0.3)], samples=200)
    table = summary["table"]
    assert summary["seeds"] == 2 and summary["cases"] == 60
    assert table[MODEL]["auc"] > table["size baseline, expert mask"]["auc"]
    low, high = table[MODEL]["auc_ci"]
    assert low <= table[MODEL]["auc"] <= high
    diff = summary["differences"]["washout_removed"]
    assert diff["label"] == "model - model with washout removed"
    assert diff["auc_difference"] > 0 and diff["ci"][0] > 0
    # Each training seed's own difference, whose mean is the pooled one (every seed scores the same cases).
    assert len(diff["per_seed"]) == 2 and np.mean(diff["per_seed"]) == pytest.approx(diff["auc_difference"])
    assert "rim_expert" not in summary["differences"]  # these scores have no rim baseline
    result = tmp_path / "heldout.json"
    result.write_text(json.dumps({"experiment": "heldout", "command": "x", "seconds": 1.0, "device": "cpu",
                                  "held_out_cases": 60, **summary}))
    main(["report", str(result), "--out", str(tmp_path / "tables.md")])
    text = (tmp_path / "tables.md").read_text()
    assert "| joint model, as acquired |" in text and "| model - model with washout removed |" in text
    per_seed = ", ".join(f"{v:+.3f}" for v in diff["per_seed"])
    assert f"{report._ci(diff['ci'])} | {per_seed} |" in text

    # The ablations score the reference without reversed phases: its held-out table skips that pair only.
    reference = run(0.3)
    del reference["scores"]["joint model, post-contrast phases reversed"]
    partial = common.summarise([reference], samples=50)
    assert "phases_reversed" not in partial["differences"] and "washout_removed" in partial["differences"]
    ablations = tmp_path / "ablations.json"
    ablations.write_text(json.dumps({
        "experiment": "ablations", "command": "x", "seconds": 1.0, "device": "cpu", "held_out_cases": 60,
        "heldout_seed": 7, "results": [{"run": "seed0", "key": "reference", "variant": "joint model (reference)",
                                        "auc": 0.8, "auc_washout_removed": 0.7, "dice": 0.85,
                                        "raw": {"ids": [str(i) for i in range(60)], **reference}}]}))
    main(["report", str(ablations), "--out", str(tmp_path / "ablations.md"), "--samples", "50"])
    text = (tmp_path / "ablations.md").read_text()
    assert "The reference joint models next to the baselines" in text
    assert "| size baseline, expert mask |" in text and "phases reversed" not in text


def test_own_heldout_pools_runs_that_share_no_case(tmp_path):
    """Each run is scored on its own cases: the pooled difference is the mean of the runs' own paired differences,
    its interval resamples each run's cases separately, and the report shows both."""
    rng = np.random.default_rng(1)
    names = sorted({name for c in COMPARISONS for name in (c.a, c.b)})  # sorted: draws in a fixed order

    def run(n: int, model_noise: float) -> dict:
        y = (rng.random(n) < 0.4).astype(float)
        scores = {name: (y + rng.normal(scale=model_noise if "as acquired" in name else 1.5, size=n)).tolist()
                  for name in names}
        return {"run": f"runs/seed{n}", "ids": [str(i) for i in range(n)], "y": y.tolist(), "scores": scores,
                "thresholds": dict.fromkeys(names, 0.5), "dice": rng.uniform(0.8, 0.9, n).tolist()}

    scored = [run(50, 0.4), run(80, 3.0)]  # a good model on one set, a poor one on the other
    pooled = common.pooled_differences(scored, samples=200)
    size = pooled["size_expert"]
    by_hand = [roc_auc(np.array(r["y"]), r["scores"][MODEL])
               - roc_auc(np.array(r["y"]), r["scores"]["size baseline, expert mask"]) for r in scored]
    assert size["per_run"] == pytest.approx(by_hand)
    assert size["auc_difference"] == pytest.approx(np.mean(by_hand))
    assert by_hand[0] > 0.1 and by_hand[1] < by_hand[0]
    low, high = size["ci"]
    assert low < size["auc_difference"] < high and high - low < 0.5
    one_class = {**scored[0], "y": [1.0] * 50}
    with pytest.raises(SystemExit, match="one pCR class"):
        common.pooled_differences([one_class, scored[1]], samples=10)
    result = tmp_path / "own.json"
    result.write_text(json.dumps({"experiment": "own-heldout", "command": "x", "seconds": 1.0, "device": "cpu",
                                  "runs": [r["run"] for r in scored],
                                  "per_run": [{"run": r["run"], **common.summarise([r], samples=20)} for r in scored],
                                  "pooled": pooled}))
    main(["report", str(result), "--out", str(tmp_path / "own.md")])
    text = (tmp_path / "own.md").read_text()
    assert "| seed50 | 50 (" in text and "| seed80 | 80 (" in text
    assert f"| model - size baseline (expert mask) | {size['auc_difference']:+.4f} |" in text
    # Runs scored before the rim baseline existed lack its scores: that pair is left out, not an error.
    older = [{**r, "scores": {k: v for k, v in r["scores"].items() if not k.startswith("rim")}} for r in scored]
    assert "rim_expert" not in common.pooled_differences(older, samples=10)
    # A file whose pooled table predates a pair its per-case scores hold: the report computes the pair from them;
    # the other pairs are read as stored, under their labels in files of earlier versions.
    data = json.loads(result.read_text())
    data["pooled"] = {row["label"]: row for key, row in pooled.items() if key != "rim_expert"}
    result.write_text(json.dumps({**data, "raw": scored}))
    main(["report", str(result), "--out", str(tmp_path / "own.md"), "--samples", "200"])
    text = (tmp_path / "own.md").read_text()
    assert f"| model - rim baseline (expert mask) | {pooled['rim_expert']['auc_difference']:+.4f} |" in text
    assert f"| model - size baseline (expert mask) | {size['auc_difference']:+.4f} |" in text
    assert "| concentration | rim | inner rim | Dice |" in text


def test_report_joins_variant_files_with_paired_intervals(tmp_path):
    rng = np.random.default_rng(1)
    y = (rng.random(80) < 0.4).astype(float)
    ids = [f"case{i}" for i in range(80)]

    def row(variant: str, noise: float, dice: float, **extra) -> dict:
        scores = (y + rng.normal(scale=noise, size=80)).tolist()
        return {"run": "runs/x/seed0", "variant": variant, "auc": roc_auc(y, scores), "dice": dice,
                "auc_washout_removed": float("nan"), **extra,
                "raw": {"ids": ids, "y": y.tolist(), "scores": {MODEL: scores},
                        "thresholds": {MODEL: 0.5}, "dice": rng.normal(dice, 0.01, 80).tolist()}}

    files = []
    # The reference sits in one file, the variant in another (run at different times): one table, paired.
    for name, rows in (("a", [row("joint model (reference)", 0.3, 0.94)]), ("b", [row("pCR loss only", 2.0, 0.5)])):
        files.append(tmp_path / f"ablations_{name}.json")
        files[-1].write_text(json.dumps({"experiment": "ablations", "held_out_cases": 90, "seconds": 1.0,
                                         "device": "cpu", "results": rows,
                                         "command": "bench/science.py ablations --heldout-seed 20000"}))
    main(["report", *map(str, files), "--out", str(tmp_path / "tables.md"), "--samples", "200"])
    lines = (tmp_path / "tables.md").read_text().splitlines()
    assert sum(line.startswith("### ablations") for line in lines) == 1
    assert any("(seed 20000)" in line for line in lines)  # read from the command of a file that lacks the field
    variant_row = next(line for line in lines if line.startswith("| seed0 | pCR loss only |"))
    cells = [c.strip() for c in variant_row.split("|")]
    auc_diff, dice_diff = float(cells[6].split()[0]), float(cells[7].split()[0])
    assert auc_diff < -0.1 and -0.5 < dice_diff < -0.4  # a much worse variant, paired against the reference
    low, high = (float(v) for v in cells[6].split("[")[1].rstrip("]").split(","))
    assert low <= auc_diff <= high < 0
    # Scored on other cases than the reference: refused, not silently paired.
    other = json.loads(files[1].read_text())
    other["results"][0]["raw"]["ids"] = ids[::-1]
    files[1].write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="different held-out cases"):
        main(["report", *map(str, files), "--out", str(tmp_path / "tables.md"), "--samples", "20"])


def test_report_averages_label_efficiency_over_runs(tmp_path):
    """Three runs (seeds) of MAE vs scratch on the same held-out cases: one mean-over-runs row per variant whose
    AUC is the mean of the runs' AUCs and whose paired difference is the mean of the runs' differences."""
    rng = np.random.default_rng(2)
    y = (rng.random(90) < 0.4).astype(float)
    ids = [f"case{i}" for i in range(90)]

    def row(run: str, init: str, noise: float, dice: float) -> dict:
        scores = (y + rng.normal(scale=noise, size=90)).tolist()
        return {"run": run, "variant": f"16 labelled, {init}", "labelled": 16, "init": init,
                "auc": roc_auc(y, scores), "dice": dice, "auc_washout_removed": float("nan"),
                "raw": {"ids": ids, "y": y.tolist(), "scores": {MODEL: scores}, "dice": np.full(90, dice).tolist()}}

    runs = [f"runs/x/seed{k}" for k in range(3)]
    rows = [row(run, init, noise, dice) for run in runs
            for init, noise, dice in (("MAE", 0.4, 0.92), ("scratch", 1.0, 0.90))]
    path = tmp_path / "label_efficiency.json"
    path.write_text(json.dumps({"experiment": "label-efficiency", "held_out_cases": 90, "heldout_seed": 20000,
                                "seconds": 1.0, "device": "cpu", "command": "x", "results": rows}))
    main(["report", str(path), "--out", str(tmp_path / "tables.md"), "--samples", "200"])
    lines = (tmp_path / "tables.md").read_text().splitlines()
    mae = next(line for line in lines if line.startswith("| 16 labelled, MAE | 3 |"))
    cells = [c.strip() for c in mae.split("|")][1:-1]
    aucs = [r["auc"] for r in rows if r["init"] == "MAE"]
    diffs = [a - r["auc"] for a, r in zip(aucs, (r for r in rows if r["init"] == "scratch"), strict=True)]
    assert float(cells[2].split()[0]) == pytest.approx(np.mean(aucs), abs=5e-4)
    assert cells[3] == ", ".join(f"{a:.3f}" for a in aucs)
    assert float(cells[4].split()[0]) == pytest.approx(0.92, abs=5e-4)
    assert float(cells[5].split()[0]) == pytest.approx(np.mean(diffs), abs=5e-4) and np.mean(diffs) > 0.1
    low, high = (float(v) for v in cells[5].split("[")[1].rstrip("]").split(","))
    assert 0 < low <= np.mean(diffs) <= high
    assert float(cells[7].split()[0]) == pytest.approx(0.02, abs=5e-4)
    scratch = next(line for line in lines if line.startswith("| 16 labelled, scratch | 3 |"))
    assert scratch.rstrip().endswith("|  |  |  |")  # scratch is the comparison: no difference to itself


def test_heldout_scores_kept_per_run_are_reused_and_never_mixed_up(tmp_path, monkeypatch):
    """`heldout --scores-dir` (and `own-heldout --scores-dir`): a run scored once is read back (runs scored by
    separate processes join one summary); a kept file of another run folder with the same name, or of another
    held-out set, is refused."""
    calls = []

    def fake_score_run(run, weights, data, cache):
        calls.append(run)
        return {"ids": ["a", "b"], "y": [0.0, 1.0], "scores": {MODEL: [0.2, 0.7]}, "thresholds": {MODEL: 0.5},
                "dice": [0.9, 0.8]}

    monkeypatch.setattr(heldout, "score_run", fake_score_run)
    run, kept = tmp_path / "a" / "seed0", tmp_path / "scores"
    first = heldout.scored_run(run, tmp_path, None, 20_000, str(kept))
    assert heldout.scored_run(run, tmp_path, None, 20_000, str(kept)) == first and len(calls) == 1
    assert (kept / "seed0.json").exists()
    with pytest.raises(SystemExit, match="use another --scores-dir"):
        heldout.scored_run(tmp_path / "b" / "seed0", tmp_path, None, 20_000, str(kept))
    with pytest.raises(SystemExit, match="on held-out seed 20000"):
        heldout.scored_run(run, tmp_path, None, 30_000, str(kept))
    assert heldout.scored_run(run, tmp_path, None, 20_000, None) == first and len(calls) == 2
    # `own-heldout --scores-dir`: the run's own split is another held-out set, never confused with a seed's.
    with pytest.raises(SystemExit, match="on its own held-out split"):
        common.kept_scores(run, str(kept), common.OWN_SPLIT, lambda: first)
    own = tmp_path / "own"
    assert common.kept_scores(run, str(own), common.OWN_SPLIT, lambda: first) == first
    assert common.kept_scores(run, str(own), common.OWN_SPLIT, lambda: {}) == first  # read back, not rescored
    with pytest.raises(SystemExit, match="holds the scores of .* on its own held-out split"):
        heldout.scored_run(run, tmp_path, None, 20_000, str(own))
