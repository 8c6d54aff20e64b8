"""Lightning callbacks the CLI tests pass with `--trainer.callbacks+=probes.X` (tests/ is on sys.path).

They observe or steer a run from outside the package: record which cases each rank trained on and the
weights it ended with, save the encoder as training starts, stop a run after an epoch as if it had
been interrupted, and pin the data module's augmentation random state per epoch.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import lightning as L
import torch


class RecordSeen(L.Callback):
    """Write `<out_dir>/rank<r>.json` (patient ids of every training batch) and `rank<r>.pt` (final module state)."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.seen: list[str] = []
        self.generators: dict[str, str] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        # The augmentation's generator as the data module seeded it (before probes.PinAugmentation pins it).
        transform = trainer.train_dataloader.dataset.transform
        self.generators["transform"] = hashlib.sha256(pickle.dumps(transform.R.get_state())).hexdigest()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.extend(str(p) for p in batch["patient_id"])
        if batch_idx == 0 and "torch" not in self.generators:  # the generator of MAE masks and phase dropout
            self.generators["torch"] = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        (self.out_dir / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world_size": trainer.world_size,
                                                                   "global_step": trainer.global_step,
                                                                   "seen": self.seen,
                                                                   "generators": self.generators}))
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.out_dir / f"rank{rank}.pt")


class StopAfterEpoch(L.Callback):
    """End `fit` after epoch `epoch` (0-based) is complete, as an interrupted job would: last.ckpt is its state."""

    def __init__(self, epoch: int = 0):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch >= self.epoch:
            trainer.should_stop = True


class CrashAtStep(L.Callback):
    """Raise `SimulatedCrash` as step `step` is about to start: the run ends as a killed job does, with last.ckpt
    as its last periodic write left it (the test sets `--last_checkpoint.every_n_steps 1`) and no end-of-run save."""

    def __init__(self, step: int = 1):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise SimulatedCrash(f"crash before step {trainer.global_step + 1}")


class SimulatedCrash(RuntimeError):
    pass


class SaveEncoderAtStart(L.Callback):
    """Save the encoder's weights as they are when training starts (after any pretrained weights were loaded)."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().cpu().clone() for k, v in pl_module.model.encoder.state_dict().items()},
                       self.path)


class RecordLastCheckpoint(L.Callback):
    """Before each training step, the global step stored in RUN/checkpoints/last.ckpt (or None): written to `path`."""

    def __init__(self, path: str):
        self.path, self.seen = Path(path), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        step = torch.load(last, map_location="cpu", weights_only=True)["global_step"] if last.is_file() else None
        self.seen.append([trainer.global_step, step])
        self.path.write_text(json.dumps(self.seen))


class SignalAtStep(L.Callback):
    """Send `signal` (a name, e.g. "SIGTERM") to this process as step `step` (1-based) starts, as a scheduler
    pre-empting the job would while that step runs."""

    def __init__(self, step: int = 1, signal: str = "SIGTERM"):
        self.step, self.signal = step, signal

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import os
        import signal

        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), getattr(signal, self.signal))
