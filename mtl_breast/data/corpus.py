"""One pretraining corpus over several dataset roots, each patient once, evaluation patients left out.

The public breast DCE-MRI collections overlap: MAMA-MIA's DUKE_, ISPY1_ and ISPY2_ cases are Duke-Breast-Cancer-MRI,
I-SPY1 and I-SPY2 patients, and BreastDCEDL repackages the same three. Pooling roots naively pretrains on the
patients a benchmark later scores. `build_corpus` reads every root (`folder.read_dataset`: MAMA-MIA, case folders,
DICOM studies, BreastDCEDL), gives each case a patient identity and

1. matches patients across roots: by the patient-id rules of `collections.csv` (each with the collection
   documentation it comes from; rules not verified are marked so), and by series UID whenever two cases share one
   (a MAMA-MIA table column such as `tcia_series_uid`; the `series_uids` of converted DICOM cases);
2. leaves out every patient of an evaluation split (by default the test split of each MAMA-MIA root, plus every
   `eval_splits` entry), in whichever root the patient appears;
3. keeps each remaining patient from one collection only: the first root (command-line order) that holds it.

The corpus file (JSON) lists the kept cases with their root, collection, patient identity and series UIDs, and says
what was removed and why; `PretrainDataModule(corpus=...)` reads it.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from mtl_breast.data.breastdcedl import is_breastdcedl_root
from mtl_breast.data.case import Case, DatasetError
from mtl_breast.data.folder import read_dataset
from mtl_breast.data.identity import patient_identity
from mtl_breast.data.mamamia import SPLITS, _find, _read_table, is_mamamia_root, read_splits
from mtl_breast.files import write_text

FORMAT = "mtl-breast-corpus"
VERSION = 1
_UID = re.compile(r"\d+(?:\.\d+)+")


def _uids(value: Any) -> list[str]:
    return _UID.findall(str(value)) if value is not None else []


def _table_uids(root: Path) -> dict[str, list[str]]:
    """Series UIDs per lower-case patient id from a MAMA-MIA table column whose name holds "series" and "uid"."""
    if not is_mamamia_root(root):
        return {}
    _, rows = _read_table(root)
    out = {}
    for key, row in rows.items():
        uids = [u for column, value in row.items() if "series" in column and "uid" in column for u in _uids(value)]
        if uids:
            out[key] = uids
    return out


def _collection(root: Path, cases: list[Case]) -> str:
    if is_mamamia_root(root):
        return "MAMA-MIA"
    if is_breastdcedl_root(root):
        return "BreastDCEDL"
    votes = Counter(found[1].collection for c in cases
                    if (found := patient_identity(c.patient_id, c.meta.get("dicom_patient_id"))))
    return votes.most_common(1)[0][0] if votes else root.name


class _Union:
    """Identities joined into patients; a patient is named by a rule's identity when one of its members has one."""

    def __init__(self):
        self.parent: dict[str, str] = {}
        self.ruled: set[str] = set()

    def find(self, key: str) -> str:
        self.parent.setdefault(key, key)
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def join(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            keep = min(ra, rb, key=lambda k: (k not in self.ruled, k.startswith("uid:"), k))
            self.parent[rb if keep == ra else ra] = keep


def _eval_ids(spec: str) -> tuple[str, Path | None, list[str]]:
    """`ROOT[:SPLIT]` (a MAMA-MIA root or a split CSV; split default test) or a text file of ids, one a line."""
    path, _, split = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    path, split = Path(path), split or "test"
    if path.is_dir():
        if _find(path, SPLITS) is None:
            raise DatasetError(f"evaluation split {spec}: {path} has no {SPLITS}")
        splits = read_splits(path)
        if split not in splits:
            raise DatasetError(f"evaluation split {spec}: no split {split!r} (have {sorted(splits)})")
        return f"{path}:{split}", path, splits[split]
    if not path.is_file():
        raise FileNotFoundError(f"evaluation split {spec}: no such root or file")
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        column = f"{split}_split"
        if not rows or column not in rows[0]:
            raise DatasetError(f"evaluation split {spec}: {path} has no column {column}")
        return f"{path}:{split}", None, [r[column].strip() for r in rows if (r[column] or "").strip()]
    return str(path), None, [line.strip() for line in path.read_text().splitlines() if line.strip()]


def build_corpus(roots: list[Path | str], out: Path | str | None = None, eval_splits: list[str] = (),
                 include_test: bool = False) -> dict[str, Any]:
    """Build the corpus of `roots` (module docstring) and write it to `out` (JSON, atomically) when given."""
    roots = [Path(r) for r in roots]
    union, read, skipped, root_info = _Union(), [], [], []
    for index, root in enumerate(roots):
        if not root.is_dir():
            raise FileNotFoundError(f"corpus root {root} does not exist or is not a folder")
        unreadable: list[dict[str, str]] = []
        cases = read_dataset(root, skipped=unreadable)
        skipped += [{**u, "root": str(root)} for u in unreadable]
        collection = _collection(root, cases)
        table_uids = _table_uids(root)
        for case in cases:
            found = patient_identity(case.patient_id, case.meta.get("dicom_patient_id"))
            identity = found[0] if found else f"{collection.lower()}:{case.patient_id.lower()}"
            if found:
                union.ruled.add(identity)
            uids = sorted(set(case.meta.get("series_uids") or []) | set(table_uids.get(case.patient_id.lower(), [])))
            union.find(identity)
            for uid in uids:
                union.join(identity, f"uid:{uid}")
            # A repackaging keeps its own name; a plain root (case folders, DICOM) holds the collection its ids say.
            own = found[1].collection if found and collection not in ("MAMA-MIA", "BreastDCEDL") else collection
            read.append({"root_index": index, "case": case.patient_id, "identity": identity,
                         "collection": own, "series_uids": uids,
                         "rule": None if not found else {"source": found[1].source, "verified": found[1].verified}})
        root_info.append({"path": str(root), "collection": collection, "cases_read": len(cases),
                          "unreadable": len(unreadable)})

    specs = list(eval_splits)
    if not include_test:
        specs += [str(r) for r in roots if is_mamamia_root(r) and _find(r, SPLITS) is not None
                  and str(r) not in specs]
    members: list[tuple[str, str]] = []  # (identity, name of the split)
    for spec in specs:
        name, root, ids = _eval_ids(spec)
        uids = _table_uids(root) if root is not None else {}
        for pid in ids:
            found = patient_identity(pid)
            identity = found[0] if found else None
            if found:
                union.ruled.add(identity)
            for uid in uids.get(pid.lower(), []):
                identity = identity or f"uid:{uid}"
                union.join(identity, f"uid:{uid}")
            if identity is None:  # an id without a rule: it can only match the same id in the corpus
                identity = next((r["identity"] for r in read if r["case"].lower() == pid.lower()), f"id:{pid}")
            members.append((identity, name))
    evaluation: dict[str, str] = {}  # union root -> name of the split, once every match is known
    for identity, name in members:
        evaluation.setdefault(union.find(identity), name)

    kept, removed_eval, removed_dup, owner = [], [], [], {}
    for entry in read:
        patient = union.find(entry["identity"])
        record = {"case": entry["case"], "root": roots[entry["root_index"]].as_posix(),
                  "collection": entry["collection"], "patient": patient, "series_uids": entry["series_uids"],
                  "identity_rule": entry["rule"]}
        if patient in evaluation:
            removed_eval.append({**record, "reason": f"patient in evaluation split {evaluation[patient]}"})
        elif owner.setdefault(patient, entry["root_index"]) != entry["root_index"]:
            first = roots[owner[patient]]
            removed_dup.append({**record, "reason": f"same patient as a case of {first} (kept there)"})
        else:
            kept.append(record)
    names = Counter(k["case"].lower() for k in kept)
    for record in kept:  # unique ids in the pretraining cache
        record["id"] = record["case"] if names[record["case"].lower()] == 1 else \
            f"{record['collection']}-{record['case']}"
    for info in root_info:
        info["kept"] = sum(1 for k in kept if k["root"] == Path(info["path"]).as_posix())
    corpus = {"format": FORMAT, "version": VERSION, "roots": root_info, "evaluation_splits": specs,
              "cases": kept, "removed": {"evaluation": removed_eval, "duplicate": removed_dup},
              "unreadable": skipped, "summary": corpus_summary_of(kept, removed_eval, removed_dup, specs)}
    if out is not None:
        write_text(out, json.dumps(corpus, indent=2))
    return corpus


def corpus_summary_of(kept: list[dict], removed_eval: list[dict], removed_dup: list[dict], specs: list[str]) -> dict:
    """Counts only (no ids): what a model card may carry."""
    return {"cases": len(kept), "patients": len({k["patient"] for k in kept}),
            "collections": dict(sorted(Counter(k["collection"] for k in kept).items())),
            "removed_evaluation_cases": len(removed_eval),
            "removed_evaluation_patients": len({r["patient"] for r in removed_eval}),
            "removed_duplicate_cases": len(removed_dup), "evaluation_splits": list(specs)}


def read_corpus(path: Path | str) -> dict[str, Any]:
    """A corpus file, checked to be one."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: not a corpus file ({err})") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("cases"), list):
        raise DatasetError(f"{path}: not a corpus file (build one with `mtl-breast corpus build`)")
    return doc


def corpus_cases(corpus: dict[str, Any], skipped: list[dict[str, str]] | None = None) -> list[Case]:
    """The cases a corpus lists, read from their roots, with the corpus's unique ids as patient ids."""
    wanted: dict[str, dict[str, str]] = {}
    for record in corpus["cases"]:
        wanted.setdefault(record["root"], {})[record["case"].lower()] = record["id"]
    out = []
    for root, ids in wanted.items():
        found = {c.patient_id.lower(): c for c in read_dataset(Path(root), skipped=skipped)}
        for key, new_id in ids.items():
            if key not in found:
                if skipped is not None:
                    skipped.append({"patient_id": new_id, "reason": f"listed in the corpus but not readable in {root}"})
                continue
            case = found[key]
            case.patient_id = new_id
            out.append(case)
    return out
