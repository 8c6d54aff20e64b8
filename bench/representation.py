"""Do an encoder's features carry tumour kinetics? A linear probe that needs no pCR labels.

Each encoder is frozen; its last-layer tokens are pooled inside the tumour (the expert mask) and, optionally, in a
shell around it; a ridge regression, its penalty chosen by inner cross-validation, maps the pooled features to each
phantom's hidden values (`mtl_breast.phantoms.collection.read_truth`); the table gives the 5-fold out-of-fold R^2
per target, with a 95% bootstrap interval. The hand-built features of `mtl_breast.baselines` go through the same
ridge, so the table reads "encoder vs hand features". Next to the weights folders given, a randomly initialised
encoder of the first folder's architecture (fixed seed) says what the architecture alone gives.

    python bench/representation.py --data runs/demo0/data --split test \\
        --weights mae=runs/demo0/weights/mae --weights mtl=runs/demo0/weights/mtl \\
        --cache runs/representation/cache --out runs/representation/demo0.json \\
        --markdown runs/representation/demo0.md

Targets: ln Ktrans, ln kep, ln Fp, ln PS, ve, vp (physiology both kinetic families share), the necrotic fraction,
the hidden grade and ln tumour volume (expert-mask voxels x voxel volume, mm^3); ln kep is also scored within each
kinetic family ("etofts", "2cxm") on the same out-of-fold predictions. A mean over the tumour's tokens does not
grow with the tumour: volume reaches the encoder features only through what the tokens themselves hold (edges,
the shell), while every hand-built set starts with the log volume.

Every encoder sees the same window: the encoder's training crop (`img_size`) centred on the tumour
(`data.window.tumour_window`, the rule of the pCR head), cut from the case preprocessed as its weights' config
says. The interval resamples the cases' out-of-fold predictions (the refits are not repeated); the spread over
folds is given too. Nothing here is seeded by the clock: the same inputs give the same numbers.

A control column pads the "curve" hand features with Gaussian noise columns up to the first encoder's width:
one ridge penalty over a few hundred columns dilutes a signal that lives in a few of them, and with ~150 cases the
loss is large (on demo0's test split ln kep falls from R^2 0.34 to 0.05 with 256 noise columns), so an encoder's
R^2 is to be read against that column as well as against the hand features themselves.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_common import device_name, emit, pick_device, run_meta
from torch import nn

from mtl_breast.baselines import case_acquisition, case_features
from mtl_breast.data.build import preprocess_dataset
from mtl_breast.data.cache import CaseCache
from mtl_breast.data.folder import read_dataset
from mtl_breast.data.mamamia import read_splits
from mtl_breast.data.window import tumour_window
from mtl_breast.features import encoder_of, extract_features, pad_to_patch_multiple
from mtl_breast.files import write_text
from mtl_breast.hub import load_pretrained
from mtl_breast.metrics.intervals import percentile_interval, resample_indices
from mtl_breast.models.kinetics import FEATURE_SETS
from mtl_breast.models.registry import create_model
from mtl_breast.phantoms.collection import read_truth
from mtl_breast.predictor import InferenceSettings, read_weights_config

log = logging.getLogger("representation")

HAND_SETS = ("curve", "concentration", "rim")  # `models.kinetics.FEATURE_SETS` read through the same probe
TRUTH_TARGETS = {  # target name -> (truth key, take the log)
    "ln_ktrans": ("ktrans", True), "ln_kep": ("kep", True), "ln_fp": ("fp", True), "ln_ps": ("ps", True),
    "ve": ("ve", False), "vp": ("vp", False), "necrotic_fraction": ("necrotic_fraction", False),
    "grade": ("grade", False),
}
VOLUME_TARGET = "ln_volume_mm3"
FAMILY_TARGET = "ln_kep"  # also scored within each kinetic family
ALPHAS = np.logspace(-3, 6, 19)  # ridge penalties on standardised features


# ----------------------------------------------------------------------------------------------------- ridge
def _folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    """``k`` disjoint index sets covering ``range(n)``, in a seeded random order."""
    return np.array_split(np.random.default_rng(seed).permutation(n), min(k, n))


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fill non-finite entries with the training column mean, then centre and scale by training statistics; a
    constant (or all-missing) column becomes zero."""
    finite = np.isfinite(train)
    mean = np.where(finite, train, 0.0).sum(0) / np.maximum(finite.sum(0), 1)
    train, test = (np.where(np.isfinite(a), a, mean) for a in (train, test))
    std = train.std(0)
    std = np.where(std > 1e-12 * np.maximum(np.abs(mean), 1.0), std, np.inf)
    return (train - mean) / std, (test - mean) / std


def ridge_path(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
               alphas: np.ndarray = ALPHAS) -> np.ndarray:
    """Predictions ``[len(alphas), n_test]`` of ridge regressions (unpenalised intercept) on standardised features,
    one per penalty, from one SVD of the training matrix."""
    xs, xt = _standardise(x_train, x_test)
    centre = float(y_train.mean())
    u, s, vt = np.linalg.svd(xs, full_matrices=False)
    shrink = s / (s**2 + alphas[:, None])  # [A, r]
    coef = (shrink * (u.T @ (y_train - centre))) @ vt  # [A, p]
    return centre + coef @ xt.T


def r2_score(y: np.ndarray, pred: np.ndarray) -> float:
    """1 - SS_res / SS_tot about the mean of ``y``; NaN when ``y`` is constant."""
    total = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - pred) ** 2).sum()) / total if total > 0 else float("nan")


def ridge_cv(x: np.ndarray, y: np.ndarray, folds: int = 5, inner_folds: int = 5, seed: int = 0,
             alphas: np.ndarray = ALPHAS) -> dict:
    """Out-of-fold ridge predictions, the penalty of each outer fold chosen by inner CV on its training cases.

    Args:
        x: ``[n, p]`` features (NaN allowed: filled with the training mean).
        y: ``[n]`` target.

    Returns:
        ``{"pred": [n] out-of-fold predictions, "fold_r2": R^2 within each outer fold, "alpha": chosen penalties}``.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(y) < max(4, folds + 2):
        raise ValueError(f"ridge_cv needs at least 4 cases and 2 more than folds, got {len(y)} for {folds} folds")
    pred = np.full(len(y), np.nan)
    fold_r2, chosen = [], []
    for k, test in enumerate(_folds(len(y), folds, seed)):
        train = np.setdiff1d(np.arange(len(y)), test)
        error = np.zeros(len(alphas))
        for inner in _folds(len(train), inner_folds, seed + 1 + k):
            fit = np.setdiff1d(np.arange(len(train)), inner)
            p = ridge_path(x[train[fit]], y[train[fit]], x[train[inner]], alphas)
            error += ((p - y[train[inner]]) ** 2).sum(1)
        alpha = alphas[int(np.argmin(error))]
        pred[test] = ridge_path(x[train], y[train], x[test], np.array([alpha]))[0]
        fold_r2.append(r2_score(y[test], pred[test]))
        chosen.append(float(alpha))
    return {"pred": pred, "fold_r2": fold_r2, "alpha": chosen}


def r2_interval(y: np.ndarray, pred: np.ndarray, seed: int = 0, samples: int = 2000) -> tuple[float, float]:
    """95% percentile bootstrap interval of the R^2 of fixed predictions over resampled cases."""
    idx = resample_indices(len(y), samples, seed)
    ys, ps = y[idx], pred[idx]
    total = ((ys - ys.mean(1, keepdims=True)) ** 2).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.where(total > 0, 1.0 - ((ys - ps) ** 2).sum(1) / total, np.nan)
    return percentile_interval(values)


# --------------------------------------------------------------------------------------------------- pooling
def token_fractions(mask: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """Share of each token's patch inside ``mask [D, H, W]`` (a multiple of ``patch``): ``[N]``, tokens row-major
    over the patch grid as the encoder orders them."""
    grid = [s // p for s, p in zip(mask.shape, patch, strict=True)]
    return F.adaptive_avg_pool3d(mask.float()[None, None], grid).reshape(-1)


def pool_tokens(tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of ``tokens [T, N, E]`` over N with ``weights [N]`` -> ``[T, E]`` (NaN when all are zero).
    A token of zero weight has no influence."""
    weights = weights.to(tokens.dtype)
    return torch.einsum("tne,n->te", tokens, weights) / weights.sum()


def summarise_phases(per_phase: torch.Tensor, pooling: str = "summary", max_phases: int = 8) -> torch.Tensor:
    """One fixed-length vector from ``per_phase [T, E]`` (T >= 2 real phases, phase 0 pre-contrast).

    ``"summary"`` (default): [mean over phases, phase 0, phase 1 - phase 0, last - phase 1], i.e. level,
    pre-contrast state, wash-in and late change (washout or plateau), ``4E``. Cases have 3 to 8 phases acquired at
    site-specific times, so phase slot k is not one time point across cases; anchoring on the pre-contrast, the
    first post-contrast and the last phase keeps the kinetic meaning of each block whatever the phase count, and
    nothing encodes the count itself (a zero-padded slot would, and with it the site).
    ``"concat"``: the phases in order, zero-padded to ``max_phases``, ``max_phases * E``.
    """
    if pooling == "concat":
        return F.pad(per_phase, (0, 0, 0, max_phases - per_phase.shape[0])).reshape(-1)
    first, early, last = per_phase[0], per_phase[min(1, len(per_phase) - 1)], per_phase[-1]
    return torch.cat([per_phase.mean(0), first, early - first, last - early])


def shell_of(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Voxels within ``width`` voxels (Chebyshev distance) of ``mask [D, H, W]`` but outside it."""
    grown = F.max_pool3d(mask.float()[None, None], 2 * width + 1, stride=1, padding=width)[0, 0]
    return grown * (1.0 - mask.float())


@torch.no_grad()
def pooled_features(encoder: nn.Module, image: torch.Tensor, mask: torch.Tensor, phase_time: torch.Tensor | None,
                    shell: int = 4, pooling: str = "summary") -> dict[str, np.ndarray]:
    """Last-layer tokens of one window pooled in the tumour (and the shell around it).

    Args:
        encoder: a `ViTEncoder3d` or a model holding one (`features.encoder_of`).
        image: ``[T, D, H, W]`` the window's phases.
        mask: ``[D, H, W]`` the tumour on the same grid.
        phase_time: ``[T]`` seconds after pre-contrast (NaN unknown) or None.
        shell: shell width in voxels; 0 = no shell.

    Returns:
        ``{"tumour": [F]}`` and, with a shell, ``{"shell": [F]}`` (`summarise_phases` of the pooled phases).
    """
    encoder = encoder_of(encoder)
    patch = tuple(encoder.patch_size)
    device = next(encoder.parameters()).device
    x = pad_to_patch_multiple(image.float(), patch)[None].to(device)
    times = None if phase_time is None else phase_time.float()[None].to(device)
    tokens = extract_features(encoder, x, phase_time=times)["tokens"][0].float().cpu()  # [T, N, E]
    mask = pad_to_patch_multiple(mask.float()[None], patch)[0]
    regions = {"tumour": mask, **({"shell": shell_of(mask, shell)} if shell > 0 else {})}
    max_phases = getattr(encoder, "max_phases", tokens.shape[0])
    return {name: summarise_phases(pool_tokens(tokens, token_fractions(region, patch)), pooling,
                                   max_phases).numpy() for name, region in regions.items()}


# -------------------------------------------------------------------------------------------------- encoders
def random_encoder(config: dict, seed: int = 0) -> nn.Module:
    """The encoder of ``config``'s architecture (``arch``, ``model_args``), randomly initialised from ``seed``
    without touching the global torch RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(config["arch"], **config.get("model_args", {}))
    return encoder_of(model).eval()


def case_window(case: dict, roi: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(phases [T, *roi], tumour [*roi])``: the window of a cached case centred on its expert mask."""
    label = case["label"].float()
    window = tumour_window(torch.cat([case["image"].float(), label[None]]), label, roi)
    return window[:-1], window[-1]


def targets_of(data: Path, pid: str, label: torch.Tensor, voxel_mm3: float) -> dict[str, float]:
    """The hidden values of one phantom as probe targets, plus its kinetic family (a string)."""
    truth = read_truth(data, pid)
    out: dict = {}
    for name, (key, log_it) in TRUTH_TARGETS.items():
        value = truth.get(key)
        value = float("nan") if value is None else float(value)
        out[name] = (math.log(value) if value > 0 else float("nan")) if log_it else value
    voxels = float(label.float().sum())
    out[VOLUME_TARGET] = math.log(voxels * voxel_mm3) if voxels > 0 else float("nan")
    out["family"] = truth.get("kinetic_family")
    return out


# ------------------------------------------------------------------------------------------------ the probe
def _parse_weights(items: Sequence[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--weights takes NAME=PATH, got {item!r}")
        out[name] = Path(path)
    return out


def _select_cases(data: Path, split: str, limit: int | None) -> list:
    cases = read_dataset(data)
    if split != "all":
        wanted = {p.lower() for p in read_splits(data)[split]}
        cases = [c for c in cases if c.patient_id.lower() in wanted]
    return cases[:limit] if limit else cases


def score(features: dict[str, np.ndarray], targets: dict[str, np.ndarray], families: np.ndarray,
          folds: int = 5, seed: int = 0) -> dict:
    """R^2 of every feature set for every target: ``{target: {feature set: {"r2", "ci", "fold_r2", "alpha", "n"}}}``,
    plus ``ln_kep|<family>`` rows scored on the family's cases of the ln kep predictions."""
    table: dict[str, dict] = {}
    for target, y in targets.items():
        keep = np.isfinite(y)
        if keep.sum() < max(4, folds + 2):
            log.warning("%s: %d cases with a value, too few to score", target, int(keep.sum()))
            continue
        for name, x in features.items():
            fit = ridge_cv(x[keep], y[keep], folds=folds, seed=seed)
            rows = {target: np.ones(int(keep.sum()), bool)}
            if target == FAMILY_TARGET:
                rows.update({f"{target}|{f}": families[keep] == f for f in sorted(set(families[keep]))})
            for row, sub in rows.items():
                yy, pp = y[keep][sub], fit["pred"][sub]
                low, high = r2_interval(yy, pp, seed=seed)
                cell = {"r2": r2_score(yy, pp), "ci": [low, high], "n": int(sub.sum())}
                if row == target:
                    cell.update(fold_r2=fit["fold_r2"], alpha=fit["alpha"])
                table.setdefault(row, {})[name] = cell
    return table


def run_probe(args: argparse.Namespace) -> dict:
    data, device = Path(args.data), pick_device(args.device)
    weights = _parse_weights(args.weights)
    configs = {name: read_weights_config(path) for name, path in weights.items()}
    pre = {name: InferenceSettings.from_config(c).preprocess for name, c in configs.items()}
    cache_root = Path(args.cache or Path(args.out).parent / "cache")
    cases = _select_cases(data, args.split, args.cases)
    if not cases:
        raise SystemExit(f"no cases in {data} (split {args.split})")
    caches, skipped = {}, {}
    for config in pre.values():
        if config.key() not in caches:
            report = preprocess_dataset(data, cache_root, config, cases=cases, progress=False)
            skipped.update({s["patient_id"]: s["reason"] for s in report["skipped"]})
            caches[config.key()] = CaseCache(cache_root, config)
    first = next(iter(weights))
    encoders = {name: encoder_of(load_pretrained(path)).to(device).eval() for name, path in weights.items()}
    if args.random_seed is not None:
        name = f"random (seed {args.random_seed})"
        encoders[name] = random_encoder(configs[first], args.random_seed).to(device)
        pre[name] = pre[first]
    roi = tuple(args.window or encoders[first].img_size)
    ids = [c.patient_id for c in cases if c.patient_id not in skipped]

    rows: dict[str, list[np.ndarray]] = {}
    targets: dict[str, list] = {}
    for i, pid in enumerate(ids):
        read = {key: cache.read(pid) for key, cache in caches.items()}
        for name, encoder in encoders.items():
            case = read[pre[name].key()]
            image, mask = case_window(case, roi)
            pooled = pooled_features(encoder, image, mask, case["phase_time"], args.shell, args.pooling)
            rows.setdefault(name, []).append(pooled["tumour"])
            if "shell" in pooled:
                rows.setdefault(f"{name}+shell", []).append(np.concatenate([pooled["tumour"], pooled["shell"]]))
        base = read[pre[first].key()]
        hand = case_features(base["image"], base["label"], base["phase_time"], roi, case_acquisition(base["info"]))
        for name in HAND_SETS:
            rows.setdefault(f"hand: {name}", []).append(np.array([hand[f] for f in FEATURE_SETS[name]]))
        for key, value in targets_of(data, pid, base["label"], math.prod(pre[first].spacing)).items():
            targets.setdefault(key, []).append(value)
        if (i + 1) % 25 == 0:
            log.info("%d/%d cases", i + 1, len(ids))
    families = np.array([str(f) for f in targets.pop("family")])
    features = {name: np.stack(r) for name, r in rows.items()}
    if args.noise_control:
        width = features[first].shape[1]
        noise = np.random.default_rng(args.seed).normal(size=(len(ids), width))
        features[f"hand: {HAND_SETS[0]} + {width} noise"] = np.c_[features[f"hand: {HAND_SETS[0]}"], noise]
    table = score(features, {k: np.array(v, np.float64) for k, v in targets.items()}, families, args.folds,
                  args.seed)
    return {"experiment": "representation", "data": str(data), "split": args.split, "cases": len(ids),
            "skipped": skipped, "kinetic_families": {f: int((families == f).sum()) for f in sorted(set(families))},
            "weights": {k: str(v) for k, v in weights.items()}, "window": list(roi), "shell_voxels": args.shell,
            "pooling": args.pooling, "folds": args.folds, "seed": args.seed,
            "feature_dims": {k: int(v.shape[1]) for k, v in features.items()}, "table": table}


def markdown(result: dict) -> str:
    """The R^2 table: one row per target, one column per feature set, "R^2 (low, high)"."""
    names = list(result["feature_dims"])
    lines = [f"Linear probe, {result['folds']}-fold out-of-fold R^2 (95% bootstrap interval), {result['cases']} "
             f"cases of {result['data']} ({result['split']}), window {'x'.join(map(str, result['window']))}, "
             f"{result['pooling']} pooling, device {result['device']}.", "",
             "| target | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for target, cells in result["table"].items():
        n = next(iter(cells.values()))["n"]
        text = [f"{c['r2']:.2f} ({c['ci'][0]:.2f}, {c['ci'][1]:.2f})" for c in (cells[k] for k in names)]
        lines.append(f"| {target} (n={n}) | " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="phantom dataset root (with phantom_truth/)")
    p.add_argument("--weights", action="append", required=True, metavar="NAME=PATH",
                   help="an exported weights folder (MAE, encoder or joint model); repeat for more")
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--markdown", help="markdown table to write")
    p.add_argument("--cache", help="preprocessed-case cache root (default: cache/ beside --out)")
    p.add_argument("--split", choices=("all", "train", "test"), default="all")
    p.add_argument("--cases", type=int, help="the first N cases of the split")
    p.add_argument("--random-seed", type=int, default=0, help="seed of the random-init encoder")
    p.add_argument("--no-random", dest="random_seed", action="store_const", const=None,
                   help="leave the random-init encoder out")
    p.add_argument("--window", type=int, nargs=3, help="window D H W (default: the first encoder's img_size)")
    p.add_argument("--shell", type=int, default=4, help="shell width in voxels around the tumour (0 = none)")
    p.add_argument("--pooling", choices=("summary", "concat"), default="summary")
    p.add_argument("--no-noise-control", dest="noise_control", action="store_false",
                   help="leave out the hand features padded with noise columns to an encoder's width")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu or cuda[:i] (default: CUDA when there is one)")
    args = p.parse_args(argv)
    if not args.out and not args.cache:
        p.error("give --cache when there is no --out")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    started = time.perf_counter()
    result = run_probe(args)
    result.update(run_meta(sys.argv if argv is None else ["bench/representation.py", *argv], started))
    device = pick_device(args.device)
    if device.type == "cuda":
        result["device"] = device_name(device)
    emit(result)
    if args.out:
        write_text(args.out, json.dumps(result, indent=2, default=str) + "\n")
    if args.markdown:
        write_text(args.markdown, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
