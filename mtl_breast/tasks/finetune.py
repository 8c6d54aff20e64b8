"""Joint segmentation + pCR fine-tuning as a LightningModule.

Training: Dice+CE on random crops (tumour-oversampled) and class-balanced BCE / focal loss on pCR,
combined with fixed or learned (uncertainty) task weights. pCR is supervised only on crops that
contain tumour, since a crop of background tissue says nothing about response; unknown pCR (NaN) is
masked out, never relabelled 0.

Validation: each case whole, through the same sliding-window routine as `mtl-breast predict`, scored
with the MAMA-MIA formulas (DSC, NormHD, subgroup fairness, balanced accuracy, equalised odds). The
pCR threshold (and optionally a temperature) is chosen on these validation predictions and stored
as buffers, so it is in every checkpoint and in the exported config.json. The best checkpoint is selected
on "val/selection", the mean of the segmentation ranking score and the pCR AUC: both are free of the pCR
threshold, which is fitted on the same validation cases and would make a thresholded score optimistic.
"val/ranking" (the challenge's ranking with that in-sample threshold) is logged for reference.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch

from mtl_breast.baselines import LogisticBaseline, labelled_features
from mtl_breast.figures import overlay_figure
from mtl_breast.hub import load_encoder_into
from mtl_breast.losses.classification import PCRLoss
from mtl_breast.losses.fairness import SubgroupReweighter
from mtl_breast.losses.multitask import MultiTaskLoss
from mtl_breast.losses.segmentation import DiceCELoss
from mtl_breast.metrics.classification import choose_threshold, roc_auc, temperature_scale
from mtl_breast.metrics.mamamia import score_classification, score_segmentation
from mtl_breast.metrics.segmentation import dice, hd95, norm_hd
from mtl_breast.metrics.subgroups import subgroup_labels
from mtl_breast.models.lora import apply_lora
from mtl_breast.models.registry import create_model
from mtl_breast.predictor import InferenceSettings, predict_volume
from mtl_breast.sizes import to_3tuple
from mtl_breast.tasks.export import model_spec
from mtl_breast.tasks.loggers import log_figure, training_summary, validation_metrics
from mtl_breast.tasks.optim import build_optimizer, build_scheduler
from mtl_breast.tasks.rng import KEY as RNG_KEY
from mtl_breast.tasks.rng import checkpoint_rng_state, restore_rng_on_train_start

log = logging.getLogger(__name__)
FAIRNESS_KEY = "mtl_breast_fairness"  # checkpoint entry of the subgroup loss weights


class MTLFinetuneModule(L.LightningModule):
    """Fine-tune the joint segmentation + pCR model.

    Args:
        arch: registry name of the joint model (e.g. "mtl_vit_test", "mtl_vit_base").
        model_args: keyword overrides for the registry factory.
        img_size: training crop (D, H, W); linked from the data module's crop_size.
        pretrained: exported MAE/encoder weights folder to initialise the encoder from (None = scratch).
        grad_checkpointing: recompute encoder blocks in backward to save memory.
        freeze_encoder: train only the decoder and head.
        lora_rank: if set, train low-rank adapters in the encoder attention instead of its weights (the rest of
            the encoder is frozen); lora_alpha: their scale numerator (default 2 x rank).
        lr: peak learning rate; weight_decay, warmup_fraction, min_lr_ratio: AdamW and schedule.
        layer_decay: layer-wise LR decay for encoder blocks (e.g. 0.75), None = off.
        pcr_loss: "bce" or "focal"; pcr_pos_weight: "balanced" (from training counts), a number, or None.
        task_weighting: "fixed" or "uncertainty"; task_weights: fixed weights {"seg": 1, "pcr": 1}.
        fairness: raise the loss weight of subgroups that score worse on validation.
        fairness_temperature: sharpness of those weights.
        threshold_objective: "balanced_accuracy" or "ranking" (BA and equalised odds) for the pCR threshold.
        calibrate: fit a temperature for the pCR logits on validation.
        val_overlap: sliding-window overlap during validation.
        kinetic_init: start the pCR head's kinetic pathway from a logistic regression of pCR on the kinetic
            features of the training cases (expert masks, the pCR window; `baselines.LogisticBaseline`), so
            fine-tuning begins where the kinetic baseline ends; skipped when resuming or without the pathway.
    """

    monitor = "val/selection"
    monitor_mode = "max"

    def __init__(
        self,
        arch: str = "mtl_vit_test",
        model_args: dict[str, Any] | None = None,
        img_size: int | list[int] | tuple[int, int, int] = 64,
        pretrained: str | None = None,
        grad_checkpointing: bool = False,
        freeze_encoder: bool = False,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.05,
        min_lr_ratio: float = 0.01,
        layer_decay: float | None = None,
        pcr_loss: str = "bce",
        pcr_pos_weight: str | float | None = "balanced",
        task_weighting: str = "fixed",
        task_weights: dict[str, float] | None = None,
        fairness: bool = False,
        fairness_temperature: float = 0.1,
        threshold_objective: str = "balanced_accuracy",
        calibrate: bool = False,
        val_overlap: float = 0.25,
        kinetic_init: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        size = to_3tuple(img_size, name="img_size")
        self.img_size = size
        self.model = create_model(arch, img_size=size, **(model_args or {}))
        if pretrained:
            load_encoder_into(self.model, pretrained)
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if freeze_encoder:
            self.model.encoder.requires_grad_(False)
        self.lora = None
        if lora_rank:
            # The adapters train, the rest of the encoder stays as pretrained (decoder and head train as usual).
            self.lora = {"rank": int(lora_rank), "alpha": float(lora_alpha or 2 * lora_rank)}
            apply_lora(self.model.encoder, rank=self.lora["rank"], alpha=self.lora["alpha"], freeze_others=True)
        self.seg_loss = DiceCELoss()
        pos_weight = pcr_pos_weight if pcr_pos_weight in (None, "balanced") else float(pcr_pos_weight)
        self.pcr_loss = PCRLoss(kind=pcr_loss, pos_weight=pos_weight)
        self.task_loss = MultiTaskLoss(tasks=("seg", "pcr"), weighting=task_weighting, weights=task_weights)
        self.reweighter = SubgroupReweighter(temperature=fairness_temperature) if fairness else None
        # Chosen on validation, saved with the weights.
        self.register_buffer("pcr_threshold", torch.tensor(0.5))
        self.register_buffer("pcr_temperature", torch.tensor(1.0))
        self._val_rows: list[dict] = []
        self._val_example: tuple | None = None  # (patient id, phase-1 image, expert mask, probability) [D, H, W]
        self._resume_rng: dict | None = None

    # ------------------------------------------------------------------ training
    def on_train_start(self) -> None:
        restore_rng_on_train_start(self)

    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        if self.hparams.pcr_pos_weight == "balanced" and dm is not None and hasattr(dm, "train_pcr_counts"):
            n_pos, n_neg = dm.train_pcr_counts()
            self.pcr_loss.set_class_counts(n_pos, n_neg)
        if self.hparams.kinetic_init and self.trainer.ckpt_path is None:  # a resumed run has it in its checkpoint
            self._init_kinetic_pathway(dm)

    def _init_kinetic_pathway(self, dm: Any) -> None:
        head = self.model.pcr_head
        if not getattr(head, "kinetic", False) or dm is None or not hasattr(dm, "cache"):
            return
        _, rows, labels = labelled_features(dm.cache, dm.train_ids, self.img_size)
        if len(set(labels)) < 2:
            log.warning("kinetic pathway not initialised: the training cases hold %s pCR label(s) only",
                        sorted(set(labels)) or "no")
            return
        fitted = LogisticBaseline(head.feature_names).fit(rows, labels)
        head.init_kinetic(fitted.mean_, fitted.std_, fitted.coef_[1:], float(fitted.coef_[0]))
        log.info("kinetic pathway initialised from a logistic regression on %d training cases", len(labels))

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.model(batch["image"], phase_mask=batch["phase_mask"], phase_time=batch["phase_time"],
                          acquisition=batch.get("acquisition"))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self(batch)
        label = batch["label"]
        weights = None
        if self.reweighter is not None:
            weights = self.reweighter.weights([subgroup_labels(m) for m in batch["meta"]]).to(self.device)
        # pCR is learned only from tumour-centred crops (the window rule of inference) that hold tumour voxels.
        has_tumour = label.flatten(1).bool().any(dim=1)
        window = batch.get("tumour_window", torch.ones_like(has_tumour)).to(has_tumour.device)
        pcr_target = torch.where(has_tumour & window, batch["pcr"], torch.full_like(batch["pcr"], math.nan))
        losses = {"seg": self.seg_loss(out["seg_logits"].float(), label, sample_weight=weights)}
        # A batch without a labelled tumour window leaves the pCR task out altogether: with uncertainty weighting
        # its `s_pcr / 2` term alone would push the pCR weight up.
        if not torch.isnan(pcr_target).all():
            losses["pcr"] = self.pcr_loss(out["pcr_logits"].float(), pcr_target, sample_weight=weights)
        total, logs = self.task_loss(losses)
        if "pcr" not in losses:
            # Zero-valued terms keep the pCR head and its log-variance in the graph: DDP expects a gradient for
            # every parameter on every rank.
            total = total + 0.0 * out["pcr_logits"].float().sum()
            total = total + sum(0.0 * p.sum() for p in self.task_loss.parameters())
        bs = label.shape[0]
        self.log("train/loss", total, prog_bar=True, batch_size=bs, sync_dist=True)
        # Not synced: a rank whose batch had no tumour window logs no pCR terms, and a sync over different keys
        # would hang DDP. These are per-rank diagnostics; train/loss above is the synced figure.
        self.log_dict({f"train/{k}": float(v) for k, v in logs.items()}, batch_size=bs)
        return total

    # ------------------------------------------------------------------ validation
    def _settings(self) -> InferenceSettings:
        return InferenceSettings(roi_size=self.img_size, overlap=self.hparams.val_overlap)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        for i in range(batch["image"].shape[0]):
            acquisition = batch["acquisition"][i] if "acquisition" in batch else None
            prob, logit = predict_volume(self.model, batch["image"][i], batch["phase_time"][i], self._settings(),
                                         phase_mask=batch["phase_mask"][i], acquisition=acquisition)
            pred = prob >= 0.5
            gt = batch["label"][i, 0].cpu().numpy().astype(bool)
            if batch_idx == 0 and i == 0:  # one case per epoch for the TensorBoard overlay
                image = batch["image"][i, min(1, batch["image"].shape[1] - 1)].float().cpu().numpy()
                self._val_example = (batch["patient_id"][i], image, gt, prob)
            hd = hd95(pred, gt)
            self._val_rows.append({"patient_id": batch["patient_id"][i], "dsc": dice(pred, gt), "hd95": hd,
                                   "norm_hd": norm_hd(hd), "logit": logit, "pcr": float(batch["pcr"][i]),
                                   **subgroup_labels(batch["meta"][i])})

    def on_validation_epoch_end(self) -> None:
        example, self._val_example = self._val_example, None
        if example is not None and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            fig = overlay_figure(example[1], example[2], example[3], str(example[0]))
            log_figure(self, "val/overlay", fig)
        rows = self._gather_rows()
        self._val_rows = []
        if not rows:
            return
        table = pd.DataFrame(rows).drop_duplicates("patient_id").set_index("patient_id")
        groups = table[["age", "menopausal_status", "breast_density"]]
        seg = score_segmentation(table[["dsc", "norm_hd"]], groups)
        metrics = {"val/dsc": seg["dsc"], "val/norm_hd": seg["norm_hd"], "val/seg_ranking": seg["ranking"]}
        rankings, selection = [seg["ranking"]], [seg["ranking"]]
        labeled = table[~table["pcr"].isna()]
        if labeled["pcr"].nunique() == 2:
            y, logits = labeled["pcr"].to_numpy(), labeled["logit"].to_numpy()
            temperature = temperature_scale(logits, y) if self.hparams.calibrate else 1.0
            prob = 1.0 / (1.0 + np.exp(-logits / temperature))
            threshold = choose_threshold(y, prob, objective=self.hparams.threshold_objective,
                                         groups=groups.loc[labeled.index])
            self.pcr_threshold.fill_(float(threshold))
            self.pcr_temperature.fill_(float(temperature))
            cls = score_classification(pd.Series(y, index=labeled.index),
                                       pd.Series((prob >= threshold).astype(int), index=labeled.index),
                                       pd.Series(prob, index=labeled.index), groups.loc[labeled.index])
            metrics.update({"val/pcr_ba": cls["balanced_accuracy"], "val/pcr_auc": roc_auc(y, prob),
                            "val/pcr_ranking": cls["ranking"], "val/pcr_threshold": float(threshold)})
            rankings.append(cls["ranking"])
            selection.append(metrics["val/pcr_auc"])
        metrics["val/ranking"] = float(np.mean(rankings))
        metrics["val/selection"] = float(np.mean(selection))
        # Every rank holds the same gathered rows, so the values agree without sync_dist.
        for name, value in metrics.items():
            self.log(name, float(value), prog_bar=name in ("val/selection", "val/dsc", "val/pcr_auc"))
        if self.reweighter is not None:
            self.reweighter.update({var: {g: float(s) for g, s in table.groupby(var)["dsc"].mean().items()}
                                    for var in ("age", "menopausal_status", "breast_density")})

    def _gather_rows(self) -> list[dict]:
        # Under DDP each rank validated a shard; every rank needs all rows to log the same numbers.
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered: list[list[dict]] = [[] for _ in range(self.trainer.world_size)]
            torch.distributed.all_gather_object(gathered, self._val_rows)
            return [r for part in gathered for r in part]
        return list(self._val_rows)

    # ------------------------------------------------------------------ optimisation and export
    def configure_optimizers(self):
        opt = build_optimizer(self.model, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay,
                              layer_decay=self.hparams.layer_decay)
        extra = [p for p in self.task_loss.parameters() if p.requires_grad]
        if extra:
            opt.add_param_group({"params": extra, "lr": self.hparams.lr, "weight_decay": 0.0, "lr_scale": 1.0})
        total = int(self.trainer.estimated_stepping_batches)
        sched = build_scheduler(opt, warmup_steps=int(self.hparams.warmup_fraction * total), total_steps=total,
                                min_lr_ratio=self.hparams.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": sched}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # What inference needs beyond the weights: the preprocessing and the validation-chosen pCR calibration.
        dm = self.trainer.datamodule if self._trainer is not None else None
        checkpoint["mtl_breast"] = {
            "model": model_spec(self.model, lora=self.lora),
            "preprocess": asdict(dm.preprocess_config) if dm is not None else None,
            "inference": {"roi_size": list(self.img_size), "pcr_threshold": float(self.pcr_threshold),
                          "pcr_temperature": float(self.pcr_temperature)},
            "training": training_summary(self, "finetune"),
            "validation": validation_metrics(self),
        }
        checkpoint[RNG_KEY] = checkpoint_rng_state(self)
        if self.reweighter is not None:  # the subgroup weights learned so far: a resumed run must not restart at 1
            checkpoint[FAIRNESS_KEY] = self.reweighter.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Resuming a fit: the generators go back in `on_train_start` (Lightning does not store them).
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self._resume_rng = checkpoint.get(RNG_KEY)
        if self.reweighter is not None and FAIRNESS_KEY in checkpoint:
            self.reweighter.load_state_dict(checkpoint[FAIRNESS_KEY])
