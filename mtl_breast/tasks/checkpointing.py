"""`RUN/checkpoints/last.ckpt`: where a killed or pre-empted run restarts from, kept fresh and never half-written.

Lightning's ModelCheckpoint writes `last.ckpt` only when it validates, so a run killed between validations loses
everything since the last one (up to `check_val_every_n_epoch` epochs), and a run that stops on `max_steps`
between validations leaves a `last.ckpt` older than its final weights, which `--ckpt_path last` and `export`
then use without a word. `LastCheckpoint` owns that file instead: it writes it every `every_n_minutes` of
training (and/or every `every_n_steps` optimizer steps), at the end of every epoch (so after every validation),
and when training ends,
each time through a temporary file in the same folder and an atomic rename, so a kill leaves the previous
`last.ckpt` or the new one. The best-metric checkpoints stay with ModelCheckpoint (`best-*.ckpt`).

It is a Lightning `Checkpoint`, so it runs after the other callbacks and after ModelCheckpoint in each hook:
the file it writes after a validation already records that validation's best checkpoint. Under DDP the save is
collective (every rank calls `trainer.save_checkpoint`, rank 0 writes): rank 0 decides
when it is due, from its own clock, and broadcasts the decision, so the ranks never disagree.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Checkpoint

from mtl_breast.files import atomic_path

LAST_NAME = "last.ckpt"


class LastCheckpoint(Checkpoint):
    """Keep ``dirpath/last.ckpt`` current.

    Args:
        dirpath: folder of the checkpoints; default ``trainer.default_root_dir/checkpoints``.
        every_n_minutes: write at the first step after this many minutes of training since the last write
            (None = off). The default loses at most about five minutes of a long run.
        every_n_steps: write every this many optimizer steps (None = off).
    """

    def __init__(self, dirpath: str | None = None, every_n_minutes: float | None = 5.0,
                 every_n_steps: int | None = None):
        super().__init__()
        if every_n_minutes is not None and every_n_minutes <= 0:
            raise ValueError(f"every_n_minutes must be > 0 or None, got {every_n_minutes}")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or None, got {every_n_steps}")
        self.dirpath = dirpath
        self.every_n_minutes, self.every_n_steps = every_n_minutes, every_n_steps
        self._last_time = time.monotonic()
        self._saved_step: int | None = None
        self._pending = False  # a validation ran since the last write: its choices must reach the file

    def path(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath or Path(trainer.default_root_dir) / "checkpoints") / LAST_NAME

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_time = time.monotonic()

    def _due(self, trainer: L.Trainer) -> bool:
        step = trainer.global_step
        due = bool(self.every_n_steps) and step > 0 and step % self.every_n_steps == 0
        if self.every_n_minutes is not None and time.monotonic() - self._last_time >= 60.0 * self.every_n_minutes:
            due = True
        return bool(trainer.strategy.broadcast(due, src=0))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self._due(trainer) or self._pending:
            self.save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # What validation chose (the pCR threshold, the best checkpoint) goes into the next write: at the end of
        # the epoch, after ModelCheckpoint has recorded its best there, or at the next step.
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._pending = True

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)

    def save(self, trainer: L.Trainer) -> Path:
        """Write the run's state to ``last.ckpt`` atomically (a no-op when nothing changed since the last write)."""
        path = self.path(trainer)
        if self._saved_step == trainer.global_step and not self._pending and path.is_file():
            return path
        if trainer.is_global_zero:
            with atomic_path(path) as tmp:  # a failed save leaves the previous last.ckpt alone
                # collective: every rank calls it, rank 0 writes; the full state (optimizer, loops, callbacks)
                trainer.save_checkpoint(tmp, weights_only=False)
        else:
            trainer.save_checkpoint(path, weights_only=False)
        trainer.strategy.barrier("LastCheckpoint.save")
        self._saved_step, self._last_time, self._pending = trainer.global_step, time.monotonic(), False
        return path
