"""bench/robustness.py without training: slicing rules, the too-few rule, the sealed-set guard, leave-one-site-out
fitting, and the table of a fake score file."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import load_bench_script

from mtl_breast.phantoms.collection import TRUTH_DIR, read_truth


@pytest.fixture(scope="module")
def rb():
    return load_bench_script("robustness")


def _truth(t10=1.35, field=1.5, field_given=True, tr_given=True, motion=(0.0, 0.0, 0.0), form="parker",
           family="etofts", p=0.3, pcr=0):
    return {"pcr": pcr, "pcr_probability": p, "t10_tumour_s": t10, "field_strength": field,
            "repetition_time": 4.5, "flip_angle": 12.0,
            "given": {"flip_angle": False, "repetition_time": tr_given, "field_strength": field_given},
            "motion_voxels": max(motion), "motion_voxels_per_phase": list(motion), "aif": {"form": form},
            "kinetic_family": family, "enhancement_pattern": "homogeneous", "necrotic_fraction": 0.0}


def _write_truth(root, pid, truth):
    (root / TRUTH_DIR).mkdir(parents=True, exist_ok=True)
    (root / TRUTH_DIR / f"{pid.lower()}.json").write_text(json.dumps(truth))


def test_slices_follow_the_truth_files(rb, tmp_path):
    cases = {
        # 3 T given: assumed 1.3 s; ln(1.45 / 1.3) = 0.11 -> near
        "DUKE_001": _truth(t10=1.45, field=3.0),
        # the same tumour with the field withheld: assumed 1.1 s (1.5 T default); ln(1.45 / 1.1) = 0.28 -> far
        "ISPY2_100001": _truth(t10=1.45, field=3.0, field_given=False, tr_given=False),
        # largest motion of a phase 0.6 > 0.5; Weinmann input, 2CXM
        "NACT_01": _truth(motion=(0.0, 0.2, 0.6), form="weinmann", family="2cxm"),
        # exactly half a voxel is not above it; 1.5 T: ln(1.1 * e^0.25 / 1.1) = 0.25 is not above 0.25 either
        "ISPY1_1001": _truth(t10=1.1 * math.exp(0.25) - 1e-9, motion=(0.5,), tr_given=False),
    }
    for pid, truth in cases.items():
        _write_truth(tmp_path, pid, truth)
    ids = list(cases)
    attributes = {pid: rb.case_attributes(read_truth(tmp_path, pid)) for pid in ids}
    assert attributes["DUKE_001"]["t10_assumed"] == pytest.approx(1.3)
    assert attributes["ISPY2_100001"]["t10_assumed"] == pytest.approx(1.1)
    got = {name: [ids[i] for i in idx] for name, idx in rb.slice_indices(ids, attributes).items()}
    far = next(n for n in got if n.startswith("tumour T10 far"))
    near = next(n for n in got if n.startswith("tumour T10 near"))
    assert got[far] == ["ISPY2_100001"]
    assert set(got[near]) == {"DUKE_001", "NACT_01", "ISPY1_1001"}
    assert got["all cases"] == ids and got["flip angle not given"] == ids  # no randomised record gives it
    assert got["TR not given"] == ["ISPY2_100001", "ISPY1_1001"]
    assert got["field strength not given"] == ["ISPY2_100001"]
    assert got["motion > 0.5 voxel"] == ["NACT_01"]
    assert got["AIF weinmann"] == ["NACT_01"] and got["kinetics 2cxm"] == ["NACT_01"]
    assert len(got["AIF parker"]) == 3 and len(got["kinetics etofts"]) == 3
    assert {s: got[f"site {s}"] for s in rb.SITES} == {"DUKE": ["DUKE_001"], "ISPY1": ["ISPY1_1001"],
                                                       "ISPY2": ["ISPY2_100001"], "NACT": ["NACT_01"]}


def test_too_few_cases_of_a_class_give_no_auc(rb):
    y = np.array([1] * 9 + [0] * 30 + [1] * 10, dtype=float)
    score = np.random.default_rng(0).random(len(y))
    small = rb.auc_cell(y, [score], np.arange(39), samples=20)  # 9 pCR
    assert small["too_few"] and "value" not in small and (small["n"], small["positives"]) == (39, 9)
    assert "too few" in rb._cell_md(small) and "n=39" in rb._cell_md(small)
    enough = rb.auc_cell(y, [score], np.arange(len(y)), samples=20)  # 19 pCR, 30 without
    assert not enough["too_few"] and 0 <= enough["value"] <= 1 and len(enough["ci"]) == 2
    assert rb.too_few([1] * 10 + [0] * 9) and not rb.too_few([1] * 10 + [0] * 10)
    # paired difference of a score with itself is 0
    same = rb.auc_cell(y, [score], np.arange(len(y)), [score], samples=20)
    assert same["value"] == 0 and same["ci"] == [0, 0]


def test_sealed_use_is_recorded_once_and_a_second_is_refused(rb, tmp_path):
    log = tmp_path / "sealed_uses.json"
    with pytest.raises(SystemExit, match="--design"):
        rb.sealed_use(log, None, "/runs/a", 360, 47911, "abc")
    assert not log.exists()
    entry = rb.sealed_use(log, "rim head", "/runs/a", 360, 47911, "abc", now="2026-01-01T00:00:00+00:00")
    assert json.loads(log.read_text())["uses"] == [entry]
    assert entry == {"date": "2026-01-01T00:00:00+00:00", "design": "rim head", "run": "/runs/a", "commit": "abc",
                     "cases": 360, "seed": 47911}
    with pytest.raises(SystemExit, match="already scored"):
        rb.sealed_use(log, "rim head", "/runs/b", 360, 47911, "def")
    assert len(json.loads(log.read_text())["uses"]) == 1  # the refused use is not recorded
    rb.sealed_use(log, "other design", "/runs/b", 360, 47911, "def")
    again = rb.sealed_use(log, "rim head", "/runs/c", 360, 47911, "ghi", rescore_reason="bug in scoring fixed")
    uses = json.loads(log.read_text())["uses"]
    assert [u["design"] for u in uses] == ["rim head", "other design", "rim head"]
    assert again["rescore_reason"] == "bug in scoring fixed" and "rescore_reason" not in uses[0]


def test_the_score_command_refuses_a_second_sealed_use(rb, tmp_path, monkeypatch):
    """Through the command line: a design already in the log is refused before anything is read or scored."""
    log = tmp_path / "uses.json"
    rb.sealed_use(log, "d1", "/runs/a", 360, 47911, "abc")
    monkeypatch.setattr(rb, "set_state", lambda data, config: True)
    with pytest.raises(SystemExit, match="already scored"):
        rb.main(["score", "--run", str(tmp_path / "run"), "--set", "sealed", "--sets", str(tmp_path), "--out",
                 str(tmp_path / "s.json"), "--design", "d1", "--uses", str(log)])
    assert not (tmp_path / "s.json").exists()


class _Spy:
    """A baseline that records the sites it was fitted on; its scores name the fit that made them."""

    fits: list[set[str]] = []

    def __init__(self, features):
        self.features = features

    def fit(self, rows, y):
        self.number = len(_Spy.fits)
        _Spy.fits.append({r["site"] for r in rows})
        return self

    def predict_proba(self, rows):
        return np.full(len(rows), float(self.number))


def test_leave_one_site_out_never_fits_on_the_held_out_site(rb):
    _Spy.fits = []
    train_ids = [f"{s}_{k}" for s in rb.SITES for k in range(5)]
    train_rows = [{"site": rb.site_of(p)} for p in train_ids]
    ids = ["DUKE_900", "NACT_900", "ISPY1_900", "DUKE_901", "ISPY2_900"]
    rows = [{"site": rb.site_of(p)} for p in ids]
    out = rb.loso_baseline_scores(train_ids, train_rows, [0, 1] * 10, ids, rows, rows,
                                  feature_sets={"size": ("x",), "rim": ("x",)}, baseline=_Spy)
    assert len(_Spy.fits) == 4 * 2  # one fit per site and feature set
    assert out["fitted_on"] == {s: 15 for s in ("DUKE", "NACT", "ISPY1", "ISPY2")}
    assert set(out["scores"]) == {f"{n} baseline, {m} mask" for n in ("size", "rim") for m in ("expert", "predicted")}
    for scores in out["scores"].values():
        for pid, fit in zip(ids, scores, strict=True):
            seen = _Spy.fits[int(fit)]
            assert rb.site_of(pid) not in seen and len(seen) == 3, (pid, seen)


def _fake_score_file(rb, n=160, seed=0):
    """A score file as `score` writes it: random scores, the model and ceiling informative, attributes drawn."""
    rng = np.random.default_rng(seed)
    sites = rng.choice(rb.SITES, n)
    ids = [f"{s}_{k}" for k, s in enumerate(sites)]
    y = (rng.random(n) < 0.4).astype(float)
    names = [rb.MODEL, rb.WASHOUT, *rb.BASELINE_NAMES, rb.CEILING]
    scores = {name: (y * 0.8 + rng.random(n)).tolist() if name in (rb.MODEL, rb.CEILING) else rng.random(n).tolist()
              for name in names}
    attributes = {pid: rb.case_attributes(_truth(
        t10=float(rng.lognormal(np.log(1.35), 0.18)), field_given=bool(rng.random() > 0.1),
        tr_given=bool(rng.random() > 0.3), motion=(0.0, float(rng.uniform(0, 1.2))),
        form=str(rng.choice(rb.AIF_FORMS)), family=str(rng.choice(rb.KINETIC_FAMILIES)))) for pid in ids}
    loso = {"scores": {name: rng.random(n).tolist() for name in rb.BASELINE_NAMES},
            "fitted_on": {s: 100 for s in rb.SITES}}
    return {"run": "/runs/fake", "set": "development", "seed": 30000, "design": None,
            "scored": {"ids": ids, "y": y.tolist(), "scores": scores, "dice": rng.random(n).tolist()},
            "attributes": attributes, "loso_baselines": loso, "loso_model": {}}


def test_table_of_a_fake_score_file(rb, tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(_fake_score_file(rb)))
    rb.main(["table", str(path), "--out", str(tmp_path / "table.md"), "--samples", "20"])
    md = (tmp_path / "table.md").read_text()
    result = json.loads((tmp_path / "table.json").read_text())["results"][0]
    table = result["table"]
    assert result["flip_angle_never_given"] and "flip angle not given\" is every case" in md
    assert table["flip angle not given"][rb.MODEL]["value"] == table["all cases"][rb.MODEL]["value"]
    assert table["field strength not given"][rb.MODEL]["too_few"]  # about 16 cases, 6 with pCR
    assert "| field strength not given |" in md and "too few" in md
    # every row of a table has its header's number of cells (a pipe inside a label is escaped)
    for block in md.split("\n\n"):
        rows = [line.replace("\\|", "") for line in block.splitlines() if line.startswith("|")]
        assert len({row.count("|") for row in rows}) <= 1, block
    assert table["all cases"][rb.MODEL]["value"] > 0.7 > table["all cases"]["size baseline, expert mask"]["value"]
    assert set(result["differences"]) == set(rb.DIFFERENCES)
    assert result["loso"]["DUKE"]["leave-site-out"][rb.MODEL] == "not run"
    assert sum(table[f"site {s}"][rb.MODEL]["n"] for s in rb.SITES) == result["cases"]
    # a leave-site-out run of the model fills its column
    f = json.loads(path.read_text())
    site = [(p, s) for p, s in zip(f["scored"]["ids"], f["scored"]["scores"][rb.MODEL], strict=True)
            if p.startswith("ISPY2_")]
    f["loso_model"]["ISPY2"] = {"run": "/runs/no_ispy2", "ids": [p for p, _ in site], "scores": [s for _, s in site]}
    r = rb.summarise([f], samples=20)
    assert r["loso"]["ISPY2"]["leave-site-out"][rb.MODEL]["value"] == r["table"]["site ISPY2"][rb.MODEL]["value"]
    assert r["loso"]["NACT"]["leave-site-out"][rb.MODEL] == "not run"
    assert "| DUKE (100) | 33 (6) | too few |" in md


def test_compare_pairs_two_designs_on_the_same_cases(rb, tmp_path):
    reference, other = _fake_score_file(rb, seed=0), _fake_score_file(rb, seed=0)
    y = np.array(other["scored"]["y"])
    other["run"] = "/runs/other"
    other["scored"]["scores"][rb.MODEL] = y.tolist()  # a perfect model
    other["scored"]["scores"][rb.WASHOUT] = np.random.default_rng(1).random(len(y)).tolist()
    paths = [tmp_path / "ref.json", tmp_path / "other.json"]
    for path, f in zip(paths, (reference, other), strict=True):
        path.write_text(json.dumps(f))
    rb.main(["compare", str(paths[0]), str(paths[1]), "--out", str(tmp_path / "cmp.json")])
    r = json.loads((tmp_path / "cmp.json").read_text())
    assert r["auc"]["other model"]["auc"] == 1.0
    expected = 1.0 - rb.roc_auc(y, np.array(reference["scored"]["scores"][rb.MODEL]))
    assert r["other model minus"]["the reference model"]["difference"] == pytest.approx(expected)
    assert r["other model minus"]["its washout-removed input"]["difference"] > 0.3
    assert set(r["other model minus"]) >= {"size baseline, expert mask", "rim baseline, expert mask"}
    other["scored"]["ids"] = other["scored"]["ids"][::-1]
    paths[1].write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="scored different cases"):
        rb.main(["compare", str(paths[0]), str(paths[1])])
