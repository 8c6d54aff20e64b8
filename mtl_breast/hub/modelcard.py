"""Model cards: the ``README.md`` that travels with every exported weights folder.

Weights outlive the run that made them; the card says what they are, what input they expect and what they were
(and were not) trained on, so a reader does not have to guess from tensor names. It is rendered from ``config.json``
alone: whatever the card states can be checked against the config, and whatever the config does not record is
written "not recorded" rather than filled in. Only the keys named here are rendered, so nothing else a config might
carry (paths, ids) leaks into the card; patient ids and patient data are never part of it.

The front matter follows the Hugging Face Hub model-card metadata (``license``, ``library_name``, ``tags``,
``pipeline_tag``, ``base_model``), so a folder pushed to the Hub as-is is indexed correctly.
"""
# References: huggingface_hub ModelCardData / the Hub's modelcard.md template (metadata keys and sections).

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from mtl_breast.acquisition import assumed_counts

__all__ = ["NOT_RECORDED", "card_metadata", "render_model_card"]

NOT_RECORDED = "not recorded"
LICENSE = "apache-2.0"
LIBRARY_NAME = "mtl-breast"
_BASE_TAGS = ["medical-imaging", "mri", "breast", "dce-mri", "3d", "vision-transformer"]
# A Hub model id (org/name); the Hub rejects anything else in `base_model`, e.g. a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PREPROCESS_KEYS = ("spacing", "orientation", "crop_to_breast", "margin_mm", "clip_percentiles")


def _kind(config: Mapping[str, Any]) -> str:
    """``"joint"``, ``"mae"`` or ``"encoder"``: the sections and tags depend on what the weights can do."""
    arch, args = str(config.get("arch", "")), config.get("model_args") or {}
    if arch.startswith("mtl_") or isinstance(args.get("encoder"), Mapping):
        return "joint"
    if arch.startswith("mae_") or "decoder_embed_dim" in args:
        return "mae"
    return "encoder"


def _encoder_args(config: Mapping[str, Any]) -> Mapping[str, Any]:
    # A joint model nests its encoder's arguments; MAE and bare encoders keep them at the top level.
    args = config.get("model_args") or {}
    return args["encoder"] if isinstance(args.get("encoder"), Mapping) else args


def _section(config: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = config.get(key)
    return value if isinstance(value, Mapping) else {}


def _fmt(value: Any, digits: int = 6) -> str:
    """A recorded value as text; an absent one (None) as "not recorded"."""
    if value is None:
        return NOT_RECORDED
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, (list, tuple)):
        return " x ".join(_fmt(v, digits) for v in value)
    return " ".join(str(value).split())  # one line: a stray newline must not break the Markdown


def _cell(value: Any) -> str:
    # A "|" inside a table cell would end the cell.
    return _fmt(value).replace("|", "\\|")


def _size3(value: Any) -> str:
    # img_size / patch_size may be stored as one int for a cube.
    if value is None:
        return NOT_RECORDED
    return _fmt([value] * 3 if isinstance(value, (int, float)) else value)


def _base_weights(config: Mapping[str, Any]) -> str | None:
    value = _section(config, "training").get("base_weights")
    return str(value) if value else None


def card_metadata(config: Mapping[str, Any]) -> dict[str, Any]:
    """The YAML front matter: Hub metadata derived from the config (``base_model`` only for a Hub id)."""
    kind = _kind(config)
    tags = [*_BASE_TAGS, LIBRARY_NAME]
    if kind == "joint":
        tags += ["segmentation", "pcr"]
    if kind == "mae" or _base_weights(config):
        tags.append("mae")
    meta: dict[str, Any] = {
        "license": LICENSE,
        "library_name": LIBRARY_NAME,
        "tags": tags,
        "pipeline_tag": "image-segmentation" if kind == "joint" else "image-feature-extraction",
    }
    base = (_base_weights(config) or "").split("@", 1)[0]
    if _HUB_ID.match(base) and ".." not in base:
        meta["base_model"] = base
    return meta


def _title(config: Mapping[str, Any]) -> list[str]:
    what = {
        "joint": "a joint tumour segmentation + pathologic complete response (pCR) model",
        "mae": "a masked-autoencoder (MAE) pretrainer: the 3D ViT encoder plus its reconstruction decoder",
        "encoder": "a 3D ViT encoder of DCE-MRI series (features only)",
    }[_kind(config)]
    return [
        f"# {config.get('arch') or 'mtl-breast model'}",
        "",
        f"Breast DCE-MRI weights of the `mtl-breast` package: {what}. Load them with",
        "",
        "```python",
        "from mtl_breast import load_pretrained",
        'model = load_pretrained("<this folder or org/name>")',
        "```",
    ]


def _architecture(config: Mapping[str, Any]) -> list[str]:
    enc, args = _encoder_args(config), config.get("model_args") or {}
    n = config.get("num_parameters")
    params = f"{n} ({n / 1e6:.2f}M)" if isinstance(n, int) else NOT_RECORDED
    lines = [
        "## Architecture and size",
        "",
        f"- Architecture (`arch`): `{config.get('arch') or NOT_RECORDED}`",
        f"- Parameters: {params}",
        f"- Embedding dim: {_fmt(enc.get('embed_dim'))}",
        f"- Depth (blocks): {_fmt(enc.get('depth'))}",
        f"- Attention heads: {_fmt(enc.get('num_heads'))}",
        f"- Patch size (voxels): {_size3(enc.get('patch_size'))}",
        f"- Image size (voxels per window): {_size3(enc.get('img_size'))}",
        f"- Attention across phases: {_fmt(enc.get('attn_mode'))}",
        f"- Position embedding: {_fmt(enc.get('pos_embed_type'))}",
    ]
    kind = _kind(config)
    if kind == "mae":
        lines.append(f"- MAE decoder: width {_fmt(args.get('decoder_embed_dim'))}, depth "
                     f"{_fmt(args.get('decoder_depth'))}, mask ratio {_fmt(args.get('mask_ratio'))}")
    if kind == "joint":
        seg, head = _section(args, "seg_decoder"), _section(args, "pcr_head")
        skips = args.get("skip_indices")
        skips = ", ".join(map(str, skips)) if isinstance(skips, list) else _fmt(skips)
        lines.append(f"- Segmentation decoder: feature size {_fmt(seg.get('feature_size'))}, "
                     f"{_fmt(seg.get('out_channels'))} output channels, skips from blocks {skips}")
        kinetic = {True: f"`{_fmt(head.get('kinetic_features'))}` features", False: "none"}.get(head.get("kinetic"),
                                                                                          NOT_RECORDED)
        lines.append(f"- pCR head: kinetic pathway {kinetic}, learned kinetic pathway {_fmt(head.get('learned'))}")
    lines += [
        f"- Format version: {_fmt(config.get('format_version'))}",
        f"- `model.safetensors` sha256: {_fmt(config.get('weights_sha256'))}",
    ]
    return lines


def _inputs(config: Mapping[str, Any]) -> list[str]:
    enc, pre, inf = _encoder_args(config), _section(config, "preprocess"), _section(config, "inference")
    spacing = pre.get("spacing")
    return [
        "## Expected input: phases and spacing",
        "",
        "- Phases: phase 0 is the pre-contrast acquisition, then the post-contrast phases in acquisition order, "
        f"at most {_fmt(enc.get('max_phases'))} (fewer are padded and masked out); acquisition times in seconds "
        "after the pre-contrast phase when known.",
        f"- Voxel spacing (mm, x y z): {_fmt(spacing) if spacing is not None else NOT_RECORDED}",
        f"- Orientation: {_fmt(pre.get('orientation'))}",
        f"- Sliding-window size (voxels): {_fmt(inf.get('roi_size'))}",
    ]


def _preprocessing(config: Mapping[str, Any]) -> list[str]:
    pre = config.get("preprocess")
    lines = ["## Preprocessing", ""]
    if not isinstance(pre, Mapping):
        return [*lines, f"Preprocessing: {NOT_RECORDED}. Check how the training data were prepared before use."]
    lines.append("New cases must be prepared as the training data were (`mtl_breast.data.preprocess`):")
    lines.append("")
    for key in _PREPROCESS_KEYS:
        if key not in pre:
            lines.append(f"- `{key}`: {NOT_RECORDED}")
        elif key == "clip_percentiles" and pre[key] is None:
            lines.append(f"- `{key}`: off (no clipping)")
        else:
            lines.append(f"- `{key}`: {_fmt(pre[key])}")
    return lines


def _training(config: Mapping[str, Any]) -> list[str]:
    train = _section(config, "training")
    lines = ["## Training data", ""]
    if not train:
        return [*lines, f"Training data: {NOT_RECORDED}."]
    task = {"pretrain": "MAE pretraining (no labels)", "finetune": "joint segmentation + pCR fine-tuning"}
    datasets = train.get("datasets")
    lines.append(f"- Task: {task.get(train.get('task'), _fmt(train.get('task')))}")
    if isinstance(datasets, Mapping) and datasets:
        lines.append("- Datasets (training cases):")
        lines += [f"  - {name}: {_fmt(count)}" for name, count in datasets.items()]
    else:
        lines.append(f"- Datasets: {NOT_RECORDED}")
    lines += _corpus(train.get("corpus"))
    lines += [
        f"- Training cases: {_fmt(train.get('train_cases'))}",
        f"- Validation cases: {_fmt(train.get('val_cases'))}",
        f"- Epochs: {_fmt(train.get('epochs'))}",
        f"- Optimizer steps: {_fmt(train.get('steps'))}",
        f"- Started from: {_base_weights(config) or (NOT_RECORDED if 'base_weights' not in train else 'scratch')}",
        f"- Synthetic phantoms: {_fmt(train.get('synthetic'))}",
    ]
    if _kind(config) == "joint" or "assumed" in train:
        lines.append(f"- Acquisition values assumed by the pCR kinetic features (not given by the case): "
                     f"{_assumed(train.get('assumed'))}")
    return lines


def _corpus(summary: Any) -> list[str]:
    """The pretraining corpus (`data.corpus`): collections with case counts, and what was left out and why."""
    if not isinstance(summary, Mapping):
        return []
    lines = [f"- Corpus: {_fmt(summary.get('cases'))} cases of {_fmt(summary.get('patients'))} patients, each "
             "patient once across collections (matched by published patient ids and series UIDs)"]
    collections = summary.get("collections")
    if isinstance(collections, Mapping):
        lines += [f"  - {name}: {_fmt(count)} cases" for name, count in collections.items()]
    splits = ", ".join(map(str, summary.get("evaluation_splits") or [])) or "none"
    lines.append(f"  - Left out: {_fmt(summary.get('removed_evaluation_cases'))} cases of "
                 f"{_fmt(summary.get('removed_evaluation_patients'))} patients in evaluation splits ({splits}); "
                 f"{_fmt(summary.get('removed_duplicate_cases'))} cases of patients already taken from another "
                 "collection")
    return lines


def _assumed(summary: Any) -> str:
    """The training summary's ``assumed`` (`acquisition.summarise_assumed` of the training cases) as text."""
    if not isinstance(summary, Mapping):
        return NOT_RECORDED
    try:
        text = assumed_counts(summary, "training cases")
    except ValueError:  # a hand-edited config: say nothing rather than something wrong
        return NOT_RECORDED
    unread = summary.get("unread")
    if isinstance(unread, int) and unread > 0:
        text += f" ({unread} training cases not read: unknown)"
    return _fmt(text)


def _validation(config: Mapping[str, Any]) -> list[str]:
    scores, inf = _section(config, "validation"), _section(config, "inference")
    lines = ["## Validation", ""]
    if scores:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| `{_cell(name)}` | {_cell(_fmt(value, 4))} |" for name, value in scores.items()]
    else:
        lines.append(f"Validation scores: {NOT_RECORDED}.")
    lines += [
        "",
        f"- pCR decision threshold (probability, chosen on validation): {_fmt(inf.get('pcr_threshold'))}",
        f"- pCR logit temperature: {_fmt(inf.get('pcr_temperature'))}",
    ]
    return lines


def _limitations(config: Mapping[str, Any]) -> list[str]:
    train = _section(config, "training")
    datasets = train.get("datasets") if isinstance(train.get("datasets"), Mapping) else None
    trained_on = ", ".join(map(str, datasets)) if datasets else NOT_RECORDED
    lines = [
        "## Intended use and limitations",
        "",
        "- Research use only. This is not a medical device and must not be used for diagnosis or treatment "
        "decisions.",
        f"- Trained on: {trained_on}. Performance on other scanners, protocols, populations, phase counts or "
        "spacings has not been established by these weights.",
    ]
    if train.get("synthetic") is True:
        lines.append("- **Trained on synthetic phantoms, not patient scans.** These weights test the pipeline; "
                     "they say nothing about real tumours or real pCR.")
    if _kind(config) != "joint":
        lines.append("- No segmentation or pCR head: fine-tune before predicting anything.")
    if not _section(config, "validation"):
        lines.append("- Validation scores are not recorded: treat accuracy as unknown.")
    return lines


def render_model_card(config: Mapping[str, Any]) -> str:
    """The model card (Markdown with YAML front matter) of a weights folder, from its ``config.json`` dict only."""
    front = yaml.safe_dump(card_metadata(config), sort_keys=False, default_flow_style=False)
    parts = [_title(config), _architecture(config), _inputs(config), _preprocessing(config), _training(config),
             _validation(config), _limitations(config)]
    body = "\n\n".join("\n".join(p) for p in parts)
    return f"---\n{front}---\n\n{body}\n"
