"""Which part of the pCR head carries the signal: its kinetic term and its token term, scored apart. Prints JSON.

The head's logit is ``fc(pooled tokens) + kinetic_fc(standardised kinetic features)``. On the held-out split of a
demo run this scores each term on its own (AUC), next to the whole logit and each kinetic feature alone (the
features from the model's own predicted mask on the pCR window, as at inference).

    python bench/pcr_head_parts.py runs/demo
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from mtl_breast.baselines import case_acquisition
from mtl_breast.data.cache import CaseCache
from mtl_breast.data.mamamia import read_splits
from mtl_breast.data.window import tumour_window
from mtl_breast.metrics.classification import roc_auc
from mtl_breast.predictor import InferenceSettings, load_joint_model, predict_volume


@torch.no_grad()
def head_parts(run: str) -> dict:
    model, config = load_joint_model(f"{run}/weights/mtl", "cpu")
    settings = InferenceSettings.from_config(config)
    cache = CaseCache(f"{run}/cache/data", settings.preprocess)
    head = model.pcr_head
    if not head.kinetic:
        raise SystemExit(f"{run}/weights/mtl has no kinetic pathway")
    rows, labels = [], []
    for pid in read_splits(f"{run}/data")["test"]:
        case = cache.read(pid)
        if case["info"].get("pcr") is None:
            continue
        acquisition = case_acquisition(case["info"])
        prob, logit = predict_volume(model, case["image"], case["phase_time"], settings, acquisition=acquisition)
        window = tumour_window(case["image"][None].float(), torch.from_numpy(prob), settings.roi_size)
        times = case["phase_time"][None]
        out = model(window, phase_time=times, acquisition=acquisition[None])
        tumour = out["seg_logits"].float().softmax(1)[:, 1:]
        if head.kinetic_threshold is not None:
            tumour = (tumour >= head.kinetic_threshold).float()
        features = head.kinetic_inputs(window, tumour, None, times, acquisition[None])
        kinetic = float(head.kinetic_fc((features - head.kinetic_mean) / head.kinetic_std))
        rows.append([logit, kinetic, float(out["pcr_logits"]) - kinetic, *features[0].tolist()])
        labels.append(float(case["info"]["pcr"]))
    table, y = np.array(rows), np.array(labels)
    result = {"run": run, "cases": len(y), "auc_whole_logit": roc_auc(y, table[:, 0]),
              "auc_kinetic_term": roc_auc(y, table[:, 1]), "auc_token_term": roc_auc(y, table[:, 2]),
              "std_kinetic_term": float(table[:, 1].std()), "std_token_term": float(table[:, 2].std())}
    # AUC of each feature alone, oriented so that 0.5 is chance and 1 perfect (a feature may predict either way).
    result["auc_feature_alone"] = {n: max(a, 1 - a) for n, a in
                                   ((n, roc_auc(y, table[:, 3 + i])) for i, n in enumerate(head.feature_names))}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a demo work folder (data/, cache/data, weights/mtl)")
    print(json.dumps(head_parts(p.parse_args().run), indent=2))


if __name__ == "__main__":
    main()
