"""`mtl-breast corpus build`: a MAMA-MIA phantom root plus a copy of its patients laid out as the TCIA collections
(Breast_MRI_###, ISPY1_####, ACRIN-6698-######, one anonymised case matched by series UID only): each patient kept
once, the evaluation split's patients left out wherever they appear, counts printed; pretraining from the corpus file
and the model card's corpus listing."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import COMMON_FLAGS, PRETRAIN_FLAGS, demo_config, run_cli

from mtl_breast.data.breastdcedl import read_breastdcedl
from mtl_breast.data.corpus import build_corpus
from mtl_breast.data.folder import read_dataset
from mtl_breast.data.identity import patient_identity
from mtl_breast.data.mamamia import read_mamamia, read_splits

TCIA = {"DUKE": lambda n: f"Breast_MRI_{int(n):03d}", "ISPY1": lambda n: f"ISPY1_{int(n)}",
        "ISPY2": lambda n: f"ACRIN-6698-{int(n)}"}
ANONYMISED = "ANON_0007"


def lay_out_as_tcia(mamamia: Path, out: Path, anonymise: str | None = None) -> dict[str, str]:
    """Copy the DUKE/ISPY1/ISPY2 cases of a MAMA-MIA root as case folders named by their TCIA patient ids (NACT
    cases are left out: the table has no TCIA id form for them), plus one patient MAMA-MIA does not have. The case
    `anonymise` gets an id no rule matches and carries the series UID the MAMA-MIA table gives it. Returns
    {MAMA-MIA id: id in the copy}."""
    names = {}
    for case in read_mamamia(mamamia):
        site, _, number = case.patient_id.partition("_")
        if site not in TCIA:
            continue
        name = ANONYMISED if case.patient_id == anonymise else TCIA[site](number)
        folder = out / name
        folder.mkdir(parents=True)
        phases = []
        for k, path in enumerate(case.image_paths):
            phases.append(f"phase{k}.nii.gz")
            shutil.copy(path, folder / phases[-1])
        meta = {"series_uids": ["1.2.840.99.7"]} if case.patient_id == anonymise else {}
        (folder / "manifest.json").write_text(json.dumps({"phases": phases, "meta": meta}))
        names[case.patient_id] = name
    extra = out / "Breast_MRI_900"
    shutil.copytree(out / next(iter(names.values())), extra)
    return names


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict:
    from mtl_breast.phantoms.collection import generate_dataset

    base = tmp_path_factory.mktemp("corpus")
    mamamia = base / "mamamia"
    generate_dataset(mamamia, num_cases=8, seed=1, size=16)
    splits = read_splits(mamamia)
    test_tcia = [p for p in splits["test"] if p.split("_")[0] in TCIA]
    anonymise = sorted(test_tcia)[0]  # a test patient the copy can only be matched with by its series UID
    table = pd.read_excel(mamamia / "clinical_and_imaging_info.xlsx", sheet_name="dataset_info")
    table["tcia_series_uid"] = ["1.2.840.99.7" if p == anonymise else None for p in table["patient_id"]]
    table.to_excel(mamamia / "clinical_and_imaging_info.xlsx", sheet_name="dataset_info", index=False)
    names = lay_out_as_tcia(mamamia, base / "tcia", anonymise=anonymise)
    return {"mamamia": mamamia, "tcia": base / "tcia", "names": names, "splits": splits, "anonymised": anonymise}


def test_identity_rules_match_the_collections_published_ids():
    assert patient_identity("DUKE_001")[0] == patient_identity("Breast_MRI_001")[0] == "duke:1"
    assert patient_identity("ISPY2_100123")[0] == patient_identity("ACRIN-6698-100123")[0] == \
        patient_identity("ISPY2-100123")[0] == "ispy2:100123"
    assert patient_identity("ISPY1_1001")[0] == "ispy1:1001"
    assert patient_identity("somebody") is None
    rule = patient_identity("NACT_01")[1]
    assert not rule.verified and "collection documentation" in rule.source


def test_corpus_keeps_each_patient_once_and_drops_the_evaluation_split(roots, tmp_path, capsys):
    out = tmp_path / "corpus.json"
    assert run_cli(["corpus", "build", "--root", roots["mamamia"], "--root", roots["tcia"], "--out", out]) == 0
    printed = capsys.readouterr().out
    corpus = json.loads(out.read_text())
    test, train = roots["splits"]["test"], roots["splits"]["train"]
    kept = {(Path(c["root"]).name, c["case"]) for c in corpus["cases"]}
    assert kept == {("mamamia", p) for p in train} | {("tcia", "Breast_MRI_900")}
    assert len({c["patient"] for c in corpus["cases"]}) == len(corpus["cases"])
    removed = {(Path(c["root"]).name, c["case"]) for c in corpus["removed"]["evaluation"]}
    copies_of_test = {("tcia", roots["names"][p]) for p in test if p in roots["names"]}
    assert removed == {("mamamia", p) for p in test} | copies_of_test
    assert ("tcia", ANONYMISED) in removed  # matched through the series UID alone
    duplicates = {c["case"] for c in corpus["removed"]["duplicate"]}
    assert duplicates == {roots["names"][p] for p in train if p in roots["names"]}
    summary = corpus["summary"]
    assert summary["removed_evaluation_patients"] == len(test)
    assert f"removed {len(removed)} case(s) of {len(test)} patient(s) in evaluation splits" in printed
    assert summary["collections"] == {"Duke-Breast-Cancer-MRI": 1, "MAMA-MIA": len(train)}


def test_corpus_order_decides_which_copy_is_kept_and_include_test_keeps_test_patients(roots, tmp_path):
    corpus = build_corpus([roots["tcia"], roots["mamamia"]], include_test=True)
    from_tcia = {c["case"] for c in corpus["cases"] if Path(c["root"]).name == "tcia"}
    assert from_tcia == set(roots["names"].values()) | {"Breast_MRI_900"}
    assert not corpus["removed"]["evaluation"]
    assert len({c["patient"] for c in corpus["cases"]}) == len(corpus["cases"])
    assert corpus["summary"]["cases"] == len(roots["splits"]["train"]) + len(roots["splits"]["test"]) + 1


def test_an_evaluation_split_outside_the_corpus_still_removes_its_patients(roots):
    corpus = build_corpus([roots["tcia"]], eval_splits=[f"{roots['mamamia']}:test"])
    removed = {c["case"] for c in corpus["removed"]["evaluation"]}
    assert removed == {roots["names"][p] for p in roots["splits"]["test"] if p in roots["names"]}


def test_pretraining_reads_a_corpus_and_the_model_card_lists_it(roots, tmp_path):
    corpus = tmp_path / "corpus.json"
    build_corpus([roots["mamamia"], roots["tcia"]], corpus)
    run = tmp_path / "run"
    argv = ["pretrain", "fit", "--config", demo_config("pretrain"), "--data.corpus", corpus,
            "--data.cache_dir", tmp_path / "cache", "--trainer.default_root_dir", run, *COMMON_FLAGS,
            *PRETRAIN_FLAGS, "--data.crop_size", "16", "--trainer.max_steps", "1", "--data.val_fraction", "0.3"]
    assert run_cli(argv) == 0
    assert run_cli(["export", "--ckpt", run / "checkpoints" / "last.ckpt", "--out", tmp_path / "w"]) == 0
    card = (tmp_path / "w" / "README.md").read_text()
    assert re.search(r"Corpus: \d+ cases of \d+ patients", card)
    assert "MAMA-MIA:" in card and "evaluation splits" in card


def test_breastdcedl_layout(tmp_path, roots):
    """The layout implemented from the collection's repository (file names only; unverified on released files)."""
    case = read_mamamia(roots["mamamia"])[0]
    folder = tmp_path / "dcedl" / "ISPY2" / "data_samples" / "dce"  # as the repository's scripts lay it out
    folder.mkdir(parents=True)
    for k, path in enumerate(case.image_paths):
        shutil.copy(path, folder / f"ACRIN-6698-100001_spy2_vis1_dce_aqc_{k}.nii.gz")
    pd.DataFrame({"pid": ["ACRIN-6698-100001"], "pCR": [1], "dataset": ["spy2"]}).to_csv(
        tmp_path / "dcedl" / "BreastDCEDL_metadata.csv", index=False)
    cases = read_breastdcedl(tmp_path / "dcedl")
    assert [c.patient_id for c in cases] == ["ACRIN-6698-100001"] and cases[0].pcr == 1.0
    assert cases[0].num_phases == case.num_phases and cases[0].meta["dataset"] == "ISPY2"
    assert [c.patient_id for c in read_dataset(tmp_path / "dcedl")] == ["ACRIN-6698-100001"]
    assert patient_identity(cases[0].patient_id)[0] == "ispy2:100001"


def test_a_dicom_collection_is_matched_by_patient_id_and_by_series_uid(roots, tmp_path, monkeypatch):
    """A Duke-like DICOM root: one test patient under its TCIA id, one anonymised whose series UID the MAMA-MIA
    table carries, one train patient; the first two are left out as evaluation patients, the third as a duplicate."""
    from dicomwriter import dicom_twin

    monkeypatch.setenv("MTL_BREAST_DICOM_CACHE", str(tmp_path / "staging"))
    cases = {c.patient_id: c for c in read_mamamia(roots["mamamia"])}
    test = sorted(p for p in roots["splits"]["test"] if p.startswith("DUKE_"))[0]
    train = sorted(p for p in roots["splits"]["train"] if p.startswith("DUKE_"))[0]
    other_test = sorted(p for p in roots["splits"]["test"] if p != test)[0]
    dicom = tmp_path / "duke_dicom"
    ids = {test: "Breast_MRI_" + test.split("_")[1], train: "Breast_MRI_" + train.split("_")[1], other_test: "ANON9"}
    written = {}
    for n, (pid, name) in enumerate(ids.items()):
        case = cases[pid]
        written[pid] = dicom_twin(case.image_paths[:3], [0.0, 60.0, 120.0], dicom, tmp_path / "nii", name,
                                  layout="multi", seed=n, extra_series=False)
    mamamia = tmp_path / "mamamia"
    shutil.copytree(roots["mamamia"], mamamia)
    table = pd.read_excel(mamamia / "clinical_and_imaging_info.xlsx", sheet_name="dataset_info")
    table["tcia_series_uid"] = [written[other_test]["series_uids"][0] if p == other_test else None
                                for p in table["patient_id"]]
    table.to_excel(mamamia / "clinical_and_imaging_info.xlsx", sheet_name="dataset_info", index=False)
    corpus = build_corpus([mamamia, dicom])
    removed = {c["case"]: c["reason"] for c in corpus["removed"]["evaluation"] if Path(c["root"]) == dicom}
    assert set(removed) == {ids[test], "ANON9"} and all("evaluation split" in r for r in removed.values())
    assert [c["case"] for c in corpus["removed"]["duplicate"]] == [ids[train]]
    assert not [c for c in corpus["cases"] if Path(c["root"]) == dicom]
    assert corpus["roots"][1]["collection"] == "Duke-Breast-Cancer-MRI"


@pytest.mark.parametrize("given", ["nothing", "not a corpus"])
def test_pretraining_without_a_root_or_with_a_bad_corpus_says_so(tmp_path, capsys, given):
    extra = []
    if given == "not a corpus":
        (tmp_path / "c.json").write_text('{"cases": 1}')
        extra = ["--data.corpus", tmp_path / "c.json"]
    code = run_cli(["pretrain", "fit", "--config", demo_config("pretrain"), "--trainer.default_root_dir",
                    tmp_path / "run", *extra])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mtl-breast pretrain: error:")]
    assert code == 2 and len(errors) == 1, errors
    assert ("--data.corpus" in errors[0]) if given == "nothing" else ("not a corpus file" in errors[0])
