"""Which pathway of the pCR head carries the signal: each term of the logit scored on its own. Prints JSON.

The head's logit is a sum of terms (`PCRHead.parts`): "tokens" (attention-pooled encoder tokens, with the output
bias), "learned" (the learned kinetic pathway, when the head has it) and "kinetic" (the hand-feature regression,
when it has it). Per term, on held-out cases: the AUC of the term alone; its share of the logit's variance,
``cov(term, logit) / var(logit)`` (the shares add up to 1; a term that moves against the others has a negative
share); and the AUC of the term with the post-contrast phases flattened (every phase after the first post-contrast
one replaced by it: no washout, no late enhancement), so a term that reads kinetics must lose AUC there.

    python bench/pcr_head_parts.py runs/demo                       # the run's held-out split
    python bench/pcr_head_parts.py runs/demo --set development --sets /work/runs/eval_sets --out parts.json

The terms are computed on the pCR window as at inference (`predictor.predict_volume`'s rule, no flips).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import run_meta

from mtl_breast.baselines import case_acquisition
from mtl_breast.data.cache import CaseCache
from mtl_breast.data.mamamia import read_splits
from mtl_breast.data.window import tumour_window
from mtl_breast.files import write_text
from mtl_breast.metrics.classification import roc_auc
from mtl_breast.metrics.intervals import bootstrap_interval
from mtl_breast.predictor import InferenceSettings, load_joint_model, predict_volume

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's experiments/ (a script sees only bench/)
from experiments.common import flatten_washout, held_out_set  # noqa: E402


@torch.no_grad()
def case_parts(model: torch.nn.Module, image: torch.Tensor, phase_time: torch.Tensor, prob: np.ndarray,
               settings: InferenceSettings, acquisition: torch.Tensor) -> dict[str, float]:
    """The logit terms of one case on its pCR window (the window of the predicted probability ``prob``)."""
    window = tumour_window(image[None].float(), torch.from_numpy(prob), settings.roi_size, settings.seg_threshold)
    out = model(window, phase_time=phase_time[None], acquisition=acquisition[None])
    return {name: float(term) / settings.pcr_temperature for name, term in out["pcr_parts"].items()}


def _cases(args: argparse.Namespace, settings: InferenceSettings) -> tuple[CaseCache, list[str]]:
    run = Path(args.run)
    if args.set is None:
        return CaseCache(run / "cache" / "data", settings.preprocess), list(read_splits(run / "data")["test"])
    sys.path.insert(0, str(Path(__file__).parent))
    from robustness import read_sets

    config = read_sets()[args.set]
    if args.set == "sealed":
        raise SystemExit("the sealed set is scored by `bench/robustness.py score --design`, once per design")
    _, cache = held_out_set(Path(args.sets) / args.set, config["cases"], config["size"], settings, config["seed"])
    return cache, list(cache.patient_ids())


def head_parts(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    model, config = load_joint_model(Path(args.run) / "weights" / "mtl", "cpu")
    settings = InferenceSettings.from_config(config)
    cache, ids = _cases(args, settings)
    ids = ids[:args.limit] if args.limit else ids
    rows: dict[str, list[dict]] = {"as acquired": [], "post-contrast flattened": []}
    labels = []
    for pid in ids:
        case = cache.read(pid)
        if case["info"].get("pcr") is None:
            continue
        acquisition = case_acquisition(case["info"])
        prob, _ = predict_volume(model, case["image"], case["phase_time"], settings, acquisition=acquisition)
        for name, image in (("as acquired", case["image"]), ("post-contrast flattened",
                                                               flatten_washout(case["image"]))):
            rows[name].append(case_parts(model, image, case["phase_time"], prob, settings, acquisition))
        labels.append(float(case["info"]["pcr"]))
    y = np.array(labels)
    terms = list(rows["as acquired"][0])
    table = {name: {t: np.array([r[t] for r in rs]) for t in terms} for name, rs in rows.items()}
    logit = sum(table["as acquired"].values())
    flat_logit = sum(table["post-contrast flattened"].values())
    result = {"experiment": "pcr head parts", "run": str(args.run), "set": args.set or "run test split",
              "cases": len(y), "positives": int(y.sum()), "terms": terms,
              "auc_whole_logit": _auc(y, logit, args.seed),
              "auc_whole_logit_flattened": _auc(y, flat_logit, args.seed), "per_term": {}}
    for t in terms:
        term = table["as acquired"][t]
        result["per_term"][t] = {
            "auc": _auc(y, term, args.seed),
            "auc_flattened": _auc(y, table["post-contrast flattened"][t], args.seed),
            "std": float(term.std()),
            "variance_share": float(np.cov(term, logit)[0, 1] / logit.var(ddof=1)) if logit.var() > 0 else None}
    return {**result, **run_meta(sys.argv, started)}


def _auc(y: np.ndarray, score: np.ndarray, seed: int) -> dict:
    """AUC with a 95% case-bootstrap interval."""
    if np.ptp(score) == 0:
        return {"auc": 0.5, "ci": [0.5, 0.5]}
    low, high = bootstrap_interval(lambda i: roc_auc(y[i], score[i]), len(y), seed=seed)
    return {"auc": roc_auc(y, score), "ci": [low, high]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a demo work folder (data/, cache/data, weights/mtl)")
    p.add_argument("--set", choices=("development",), default=None,
                   help="score an evaluation set of configs/evaluation/sets.yaml instead of the run's test split")
    p.add_argument("--sets", default="runs/eval_sets", help="where `bench/robustness.py sets` put the sets")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--limit", type=int, default=None, help="score only the first N cases (a quick check)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    result = head_parts(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        write_text(Path(args.out), text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
