"""The ablations and the comparisons of the experiments: one table each.

An ablation is one change to the demo's recipe, written as a LightningCLI config overlay in configs/experiments/
and applied after the demo's own config (``--config configs/finetune/demo.yaml --config OVERLAY``; a later config
replaces the values it names, and a dict-valued key such as ``model.model_args`` as a whole). Overlays on
configs/pretrain/demo.yaml are named ``mae_*.yaml``. To add an ablation, write its overlay and add one `Variant`
line to `VARIANTS`; `python -m experiments ablations --only KEY` runs it and experiments/suite.sh picks it up.

A comparison is a paired AUC difference between two of the scores `common.score_run` writes (the joint model on
one input variant, or a baseline on the expert or the predicted mask); `COMPARISONS` serves the held-out summary and
the own-held-out pooling alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

OVERLAYS = Path(__file__).resolve().parents[1] / "configs" / "experiments"


@dataclass(frozen=True)
class Variant:
    """One ablation of the joint model.

    Attributes:
        key: stable snake_case name: work folders, result files, the ``key`` of result rows, ``--only``.
        label: what the tables show.
        finetune: overlay file (in configs/experiments/) on configs/finetune/demo.yaml; None fine-tunes with the
            demo config as it is.
        pretrain: overlay file on configs/pretrain/demo.yaml for the variant's own MAE pretraining on the run's pool;
            None fine-tunes from the run's MAE weights.

    A variant with neither overlay changes nothing: it is the run's own joint model, scored as the demo left it.
    """

    key: str
    label: str
    finetune: str | None = None
    pretrain: str | None = None

    @property
    def trains(self) -> bool:
        return self.finetune is not None or self.pretrain is not None

    def overlay(self, task: str) -> Path | None:
        """The overlay file of ``task`` ("finetune" or "pretrain"), or None."""
        name = {"finetune": self.finetune, "pretrain": self.pretrain}[task]
        return None if name is None else OVERLAYS / name


# In the order the suite runs them (the reference first: every other row is paired with it).
VARIANTS: tuple[Variant, ...] = (
    Variant("reference", "joint model (reference)"),
    Variant("seg_loss_only", "segmentation loss only", finetune="seg_loss_only.yaml"),
    Variant("pcr_loss_only", "pCR loss only", finetune="pcr_loss_only.yaml"),
    Variant("phases_as_channels", "phases as input channels (plain spatial ViT)", finetune="phases_as_channels.yaml",
            pretrain="mae_phases_as_channels.yaml"),
    Variant("joint_attention", "joint space-time attention", finetune="joint_attention.yaml",
            pretrain="mae_joint_attention.yaml"),
    Variant("mae_phase_masking_half", "MAE with whole-phase masking (0.5)", pretrain="mae_phase_masking_half.yaml"),
    Variant("no_kinetic", "no kinetic pathway", finetune="no_kinetic.yaml"),
    Variant("token_dropout", "pCR token path with dropout 0.5", finetune="token_dropout.yaml"),
    Variant("concentration_pathway", "concentration kinetic pathway", finetune="concentration_pathway.yaml"),
    Variant("inner_rim_pathway", "inner-rim kinetic pathway", finetune="inner_rim_pathway.yaml"),
)
REFERENCE = VARIANTS[0]


def variant(key: str) -> Variant:
    """The variant of `key`.

    Raises:
        SystemExit: no variant has that key (the message lists them).
    """
    for v in VARIANTS:
        if v.key == key:
            return v
    raise SystemExit(f"no ablation {key!r}; known: {', '.join(v.key for v in VARIANTS)}")


def row_key(row: dict) -> str | None:
    """The variant key of a result row: its ``key``, or for rows written before rows had one, the variant whose
    label the row shows (None for a label no variant has now)."""
    if "key" in row:
        return row["key"]
    return next((v.key for v in VARIANTS if v.label == row.get("variant")), None)


# ------------------------------------------------------------------------------------------------ comparisons
MODEL = "joint model, as acquired"
WASHOUT_REMOVED = "joint model, washout removed (post-contrast flattened)"
PHASES_REVERSED = "joint model, post-contrast phases reversed"


def baseline(features: str, mask: str) -> str:
    """Score name of the logistic baseline on feature set `features` (`models.kinetics.FEATURE_SETS`), mask "expert" or
    "predicted"."""
    return f"{features} baseline, {mask} mask"


@dataclass(frozen=True)
class Comparison:
    """A paired AUC difference ``a - b`` of two scores of the same cases.

    Attributes:
        key: stable name, the key of the difference in result files.
        a, b: score names of `common.score_run`.
        label: what the tables show.
    """

    key: str
    a: str
    b: str
    label: str


COMPARISONS: tuple[Comparison, ...] = (
    Comparison("size_expert", MODEL, baseline("size", "expert"), "model - size baseline (expert mask)"),
    Comparison("size_predicted", MODEL, baseline("size", "predicted"), "model - size baseline (predicted mask)"),
    Comparison("kinetic_expert", MODEL, baseline("kinetic", "expert"), "model - kinetic baseline (expert mask)"),
    Comparison("kinetic_predicted", MODEL, baseline("kinetic", "predicted"),
               "model - kinetic baseline (predicted mask)"),
    Comparison("concentration_expert", MODEL, baseline("concentration", "expert"),
               "model - concentration baseline (expert mask)"),
    Comparison("rim_expert", MODEL, baseline("rim", "expert"), "model - rim baseline (expert mask)"),
    Comparison("rim_predicted", MODEL, baseline("rim", "predicted"), "model - rim baseline (predicted mask)"),
    Comparison("inner_rim_expert", MODEL, baseline("rim_inner", "expert"), "model - inner-rim baseline (expert mask)"),
    Comparison("washout_removed", MODEL, WASHOUT_REMOVED, "model - model with washout removed"),
    Comparison("phases_reversed", MODEL, PHASES_REVERSED, "model - model with phases reversed"),
)
