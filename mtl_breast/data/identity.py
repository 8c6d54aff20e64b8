"""Which patient a case is, across collections: the rules of `collections.csv` (patient-id forms each collection
publishes, e.g. MAMA-MIA's DUKE_001 = Duke-Breast-Cancer-MRI's Breast_MRI_001), each with its source and whether it
was verified. Used by `corpus` (matching patients across roots) and `clinical` (joining clinical tables)."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path


@dataclass(frozen=True)
class IdentityRule:
    collection: str
    pattern: re.Pattern
    identity: str
    verified: bool
    source: str


@cache
def identity_rules() -> tuple[IdentityRule, ...]:
    """The rows of `collections.csv`: which patient-id form belongs to which collection and patient."""
    with open(Path(__file__).with_name("collections.csv"), newline="") as handle:
        return tuple(IdentityRule(r["collection"], re.compile(r["id_pattern"], re.IGNORECASE), r["identity"],
                                  r["verified"].strip().lower() == "yes", r["source"]) for r in csv.DictReader(handle))


def patient_identity(*names: str | None) -> tuple[str, IdentityRule] | None:
    """(identity such as "duke:1", the rule) of the first name a rule of `collections.csv` matches, else None."""
    for name in names:
        if not name:
            continue
        for rule in identity_rules():
            match = rule.pattern.match(str(name).strip())
            if match:
                return rule.identity.format(n=int(match.group(1)), **{str(k + 1): g for k, g in
                                                                      enumerate(match.groups())}), rule
    return None
