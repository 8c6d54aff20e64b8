"""Acquisition values the package assumes when a case does not give them, and which it assumed for each case.

The pCR kinetic features (`models.kinetics`) invert the spoiled-gradient-echo signal equation with a case's field
strength, repetition time and flip angle, and time the washout by the acquisition times. Where a case does not give
one of them, a typical breast DCE-MRI value below is used instead; the tumour's native T1 (T10) and the contrast
agent's relaxivity are given by no case at all and are always taken from literature tables by field strength.
Real MAMA-MIA tables give field strength and TR but never a flip angle, so these assumptions are the rule, not the
exception: `assumed_values` says which ones hold for a case, `summarise_assumed` and `assumed_line` count them over
a job, so `preprocess`, `predict` and the model card report them instead of assuming silently.

This module is the one definition of those values and of the acquisition vector's columns (`models.kinetics`
reads them from here, `data.dataset` builds the vector). It imports nothing from
the package and no torch, so `models`, `data` and the top-level modules may all import it without breaking the
one-way layering of DESIGN.md section 2.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["ACQUISITION_FIELDS", "ACQUISITION_UNITS", "DEFAULT_FIELD_T", "DEFAULT_FLIP_DEG", "DEFAULT_INTERVAL_S",
           "DEFAULT_TR_MS", "HIGH_FIELD_T", "NEVER_GIVEN", "R1", "TUMOUR_T10_S", "assumed_counts", "assumed_line",
           "assumed_report", "assumed_text", "assumed_values", "check_given", "field_values", "given_value",
           "summarise_assumed"]

# Used where the case does not say: 1.5 T, and a TR/flip angle typical of breast DCE-MRI (3D spoiled gradient echo).
DEFAULT_FIELD_T, DEFAULT_TR_MS, DEFAULT_FLIP_DEG = 1.5, 5.0, 12.0
DEFAULT_INTERVAL_S = 90.0  # assumed spacing between post-contrast phases when acquisition times are unknown
# Native T1 of breast tumours (s) and Gd relaxivity (/mM/s) by field strength: literature values, as a reader
# without a T1 map would assume (Rakow-Penner 2006; Rohrer 2005).
TUMOUR_T10_S = {1.5: 1.1, 3.0: 1.3}
R1 = {1.5: 4.5, 3.0: 4.0}
HIGH_FIELD_T = 2.25  # a field at or above it takes the 3 T values, below it the 1.5 T ones (midway between them)

# Columns of a case's acquisition vector [5] (`data.dataset.acquisition_vector`), the per-case input the pCR head's
# concentration features read (`models.kinetics`): the intensity normalisation and what the case gives; NaN unknown.
ACQUISITION_FIELDS = ("intensity_offset", "intensity_scale", "field_strength", "repetition_time", "flip_angle")
# The keys of `assumed_values`, in report order, with their units. The first three are `Case.meta` keys (what a
# reader may find in a table or JSON); the others name what no metadata key holds.
ACQUISITION_UNITS = {"field_strength": "T", "repetition_time": "ms", "flip_angle": "deg", "phase_interval_s": "s",
                     "tumour_t10_s": "s", "relaxivity": "/mM/s"}
NEVER_GIVEN = ("tumour_t10_s", "relaxivity")  # assumed for every case: no case, table or JSON gives them
_DEFAULTS = {"field_strength": DEFAULT_FIELD_T, "repetition_time": DEFAULT_TR_MS, "flip_angle": DEFAULT_FLIP_DEG}
# Physically meaningful values of what a case may give: (exclusive low, exclusive high). A value outside would not
# fall back to a default in `models.kinetics`; it would be used and give a meaningless concentration.
_VALID = {"field_strength": (0.0, math.inf), "repetition_time": (0.0, math.inf), "flip_angle": (0.0, 180.0)}


def given_value(value: Any) -> float | None:
    """The value as a finite float, or None when it is not one (absent, None, NaN, text that is not a number).

    This is what `data.dataset.acquisition_vector` reads as given: everything else takes the default there.
    """
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def check_given(key: str, value: Any) -> float | None:
    """A reader's check of one acquisition value: None when absent (None), else the value as a float.

    Raises:
        ValueError: a value that is present but not a number, or outside its physical range (a TR of 0 or a negative
            flip angle would be used, not replaced by the default); the caller names the case and file.
    """
    if value is None:
        return None
    number = given_value(value) if not isinstance(value, bool) else None
    low, high = _VALID[key]
    if number is None or not low < number < high:
        shown = f"in ({low:g}, {high:g})" if math.isfinite(high) else f"> {low:g}"
        raise ValueError(f"{key} {value!r} must be a number {shown} {ACQUISITION_UNITS[key]}, or be left out "
                         f"(then {_DEFAULTS[key]:g} {ACQUISITION_UNITS[key]} is assumed and reported)")
    return number


def field_values(field_t: float) -> tuple[float, float]:
    """(tumour T10 in s, relaxivity in /mM/s) assumed at field strength ``field_t`` (T)."""
    table = 3.0 if field_t >= HIGH_FIELD_T else 1.5
    return TUMOUR_T10_S[table], R1[table]


def assumed_values(meta: Mapping[str, Any] | None, phase_times_known: bool) -> dict[str, float]:
    """The acquisition values the kinetic features assume for one case, in `ACQUISITION_UNITS` order.

    Args:
        meta: the case's metadata (``Case.meta`` / a cache file's ``info["meta"]``: keys ``field_strength`` T,
            ``repetition_time`` ms, ``flip_angle`` deg); a missing key, None, NaN or text counts as not given.
        phase_times_known: whether the case's acquisition times are known; without them the post-contrast phases
            are taken to be `DEFAULT_INTERVAL_S` apart (``phase_interval_s``).

    Returns:
        e.g. ``{"flip_angle": 12.0, "tumour_t10_s": 1.1, "relaxivity": 4.5}``: each value not given and the one
        used instead. ``tumour_t10_s`` and ``relaxivity`` are always there, from the given field strength or, when
        it is missing, the assumed one.
    """
    if meta is None:
        meta = {}
    if not isinstance(meta, Mapping):
        raise TypeError(f"case metadata must be a mapping, got {type(meta).__name__}")
    out = {key: default for key, default in _DEFAULTS.items() if given_value(meta.get(key)) is None}
    if not phase_times_known:
        out["phase_interval_s"] = DEFAULT_INTERVAL_S
    field = given_value(meta.get("field_strength"))
    out["tumour_t10_s"], out["relaxivity"] = field_values(DEFAULT_FIELD_T if field is None else field)
    return out


def assumed_text(assumed: Mapping[str, float]) -> str:
    """One case's assumed values as one CSV-safe cell: ``flip_angle=12;tumour_t10_s=1.1;relaxivity=4.5``."""
    return ";".join(f"{key}={float(assumed[key]):g}" for key in ACQUISITION_UNITS if key in assumed)


def summarise_assumed(per_case: Iterable[Mapping[str, float]]) -> dict[str, Any]:
    """Count assumed values over a job's cases (each a dict of `assumed_values`).

    Returns:
        JSON-ready ``{"cases": n, "values": {key: [{"value": v, "cases": k}, ...]}}``: for each key in
        `ACQUISITION_UNITS` order that some case assumed, each value used and for how many cases (by value).
    """
    counts: dict[str, Counter[float]] = {key: Counter() for key in ACQUISITION_UNITS}
    n = 0
    for assumed in per_case:
        n += 1
        for key, value in assumed.items():
            if key in counts:
                counts[key][float(value)] += 1
    values = {key: [{"value": v, "cases": c} for v, c in sorted(found.items())]
              for key, found in counts.items() if found}
    return {"cases": n, "values": values}


def assumed_counts(summary: Mapping[str, Any], noun: str = "cases") -> str:
    """`summarise_assumed`'s ``summary`` as text, e.g. ``flip_angle = 12 deg for 40 of 40 cases; repetition_time =
    5 ms for 6 of 40 cases; tumour_t10_s = 1.1 s for 40 of 40 cases (never given); relaxivity = 4.5 /mM/s for 40 of
    40 cases (never given)``; ``no cases`` for an empty job.

    Raises:
        ValueError: ``summary`` is not of `summarise_assumed`'s form (e.g. a hand-edited config.json).
    """
    try:
        n, values = int(summary["cases"]), summary["values"]
        parts = []
        for key, unit in ACQUISITION_UNITS.items():
            entries = values.get(key) or []
            if not entries:
                continue
            each = ", ".join(f"{float(e['value']):g} {unit} for {int(e['cases'])}" for e in entries)
            never = " (never given)" if key in NEVER_GIVEN else ""
            parts.append(f"{key} = {each} of {n} {noun}{never}")
    except (TypeError, KeyError, ValueError, AttributeError) as err:
        raise ValueError(f"not a summary of assumed acquisition values ({type(err).__name__}: {err})") from err
    if n == 0:
        return f"no {noun}"
    return "; ".join(parts) if parts else "none"


def assumed_line(summary: Mapping[str, Any], noun: str = "cases") -> str:
    """The once-per-job report line: ``assumed acquisition values: `` and `assumed_counts`."""
    return f"assumed acquisition values: {assumed_counts(summary, noun)}"

def assumed_report(per_case: Iterable[Mapping[str, float]]) -> dict[str, Any]:
    """A job's report of its cases' `assumed_values`: `summarise_assumed` plus its text as ``"line"``."""
    summary = summarise_assumed(per_case)
    return {**summary, "line": assumed_line(summary)}
