"""MAE pretraining as a LightningModule.

Lightning owns devices, precision (bf16-mixed on GPU, 32-bit on CPU), DDP/FSDP, gradient clipping
and checkpointing; this module owns the model, the optimizer/schedule and what gets logged. Once per
validation epoch it writes a PNG (rows = phases; columns = input, masked input, reconstruction) so a
person can see what the encoder has learned.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch

from mtl_breast.figures import reconstruction_figure, save_png
from mtl_breast.models.registry import create_model
from mtl_breast.sizes import to_3tuple
from mtl_breast.tasks.export import model_spec
from mtl_breast.tasks.loggers import log_figure, training_summary, validation_metrics
from mtl_breast.tasks.optim import build_optimizer, build_scheduler, effective_batch_size
from mtl_breast.tasks.rng import KEY as RNG_KEY
from mtl_breast.tasks.rng import checkpoint_rng_state, restore_rng_on_train_start

log = logging.getLogger(__name__)
VALIDATION_SEED = 1_000_003  # validation masks: the same every epoch, independent of the training stream


class MAEPretrainModule(L.LightningModule):
    """Masked-autoencoder pretraining of the 3D DCE-MRI encoder.

    Args:
        arch: registry name of the MAE model (e.g. "mae_vit_test", "mae_vit_base").
        model_args: keyword overrides for the registry factory (mask_ratio, drop_path_rate, ...).
        img_size: training crop (D, H, W); linked from the data module's crop_size.
        grad_checkpointing: recompute block activations in backward (saves memory, costs ~30% time).
        lr: peak learning rate (before batch scaling).
        lr_reference_batch: if set, lr is multiplied by effective_batch / lr_reference_batch
            (linear scaling rule; MAE uses 256).
        weight_decay: AdamW weight decay (not applied to biases, norms, embeddings).
        betas: AdamW betas.
        warmup_fraction: share of the optimizer steps spent in linear warmup.
        min_lr_ratio: final lr as a fraction of the peak (cosine schedule).
        recon_images: write a reconstruction PNG each validation epoch.
    """

    # What the checkpoint callback keeps as "best".
    monitor = "val/loss"
    monitor_mode = "min"

    def __init__(
        self,
        arch: str = "mae_vit_test",
        model_args: dict[str, Any] | None = None,
        img_size: int | list[int] | tuple[int, int, int] = 64,
        grad_checkpointing: bool = False,
        lr: float = 1.5e-4,
        lr_reference_batch: int | None = None,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_fraction: float = 0.05,
        min_lr_ratio: float = 0.01,
        recon_images: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        size = to_3tuple(img_size, name="img_size")
        self.model = create_model(arch, img_size=size, **(model_args or {}))
        if grad_checkpointing:
            self.model.encoder.set_grad_checkpointing(True)
        self._val_example: dict[str, torch.Tensor] | None = None
        self._resume_rng: dict | None = None

    def on_train_start(self) -> None:
        restore_rng_on_train_start(self)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.model(batch["image"], phase_mask=batch["phase_mask"], phase_time=batch["phase_time"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self(batch)
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=batch["image"].shape[0], sync_dist=True)
        return out["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # The same masks at every validation, so the losses compare across epochs, drawn from a forked generator:
        # validating must not move the training stream (a run resumed after it draws what the original drew).
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(VALIDATION_SEED + batch_idx)
            out = self(batch)
        self.log("val/loss", out["loss"], prog_bar=True, batch_size=batch["image"].shape[0], sync_dist=True)
        if batch_idx == 0:
            self._val_example = {"image": batch["image"][:1], "pred": out["pred"][:1], "mask": out["mask"][:1],
                                 "phase_mask": batch["phase_mask"][:1]}

    def on_validation_epoch_end(self) -> None:
        ex, self._val_example = self._val_example, None
        if not (self.hparams.recon_images and ex) or self.trainer.sanity_checking:
            return
        # `trainer.log_dir` broadcasts rank 0's folder under DDP: every rank must ask, or rank 0 waits forever.
        log_dir = self.trainer.log_dir
        if not self.trainer.is_global_zero:
            return
        masked, recon = self.model.reconstruct(ex["pred"].float(), ex["mask"], ex["image"].float(), ex["phase_mask"])
        out_dir = Path(log_dir or self.trainer.default_root_dir) / "reconstructions"
        path = out_dir / f"epoch_{self.current_epoch:04d}.png"
        fig = reconstruction_figure(ex["image"][0], masked[0], recon[0], ex["phase_mask"][0])
        save_png(fig, path, dpi=80)
        log_figure(self, "val/reconstruction", fig)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Feature extraction must preprocess new cases exactly as the encoder saw them; the rest goes into the
        # exported weights' model card.
        dm = self.trainer.datamodule if self._trainer is not None else None
        checkpoint["mtl_breast"] = {"model": model_spec(self.model),
                                    "preprocess": asdict(dm.preprocess_config) if dm is not None else None,
                                    "training": training_summary(self, "pretrain"),
                                    "validation": validation_metrics(self)}
        checkpoint[RNG_KEY] = checkpoint_rng_state(self)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Resuming a fit: the generators go back in `on_train_start` (Lightning does not store them).
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self._resume_rng = checkpoint.get(RNG_KEY)

    def configure_optimizers(self):
        lr = self.hparams.lr
        if self.hparams.lr_reference_batch:
            batch = self.trainer.datamodule.batch_size if self.trainer.datamodule else 1
            lr = lr * effective_batch_size(self.trainer, batch) / self.hparams.lr_reference_batch
        opt = build_optimizer(self.model, lr=lr, weight_decay=self.hparams.weight_decay,
                              betas=tuple(self.hparams.betas),
                              no_weight_decay=tuple(getattr(self.model, "no_weight_decay", lambda: ())()))
        total = int(self.trainer.estimated_stepping_batches)
        sched = build_scheduler(opt, warmup_steps=int(self.hparams.warmup_fraction * total), total_steps=total,
                                min_lr_ratio=self.hparams.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": sched}
