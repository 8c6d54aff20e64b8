"""`RUN/checkpoints/last.ckpt`: where a killed or pre-empted run restarts from, kept fresh and never half-written.

Lightning's ModelCheckpoint writes `last.ckpt` only when it validates, so a run killed between validations loses
everything since the last one (up to `check_val_every_n_epoch` epochs), and a run that stops on `max_steps`
between validations leaves a `last.ckpt` older than its final weights, which `--ckpt_path last` and `export`
then use without a word. `LastCheckpoint` owns that file instead: it writes it every `every_n_minutes` of
training (and/or every `every_n_steps` optimizer steps), at the end of every epoch (so after every validation),
and when training ends,
each time through a temporary file in the same folder and an atomic rename, so a kill leaves the previous
`last.ckpt` or the new one. The best-metric checkpoints stay with ModelCheckpoint (`best-*.ckpt`).

Pre-emption: SIGTERM (what SLURM, Kubernetes and cloud schedulers send before killing a job), and any signal
named in `signals` (e.g. SLURM's warning signal, ``#SBATCH --signal=B:USR2@300``), make the run save `last.ckpt`
at the end of the step in progress and exit with code 128 + the signal's number (143 for SIGTERM), never 0, so
`fit && export` does not export an unfinished model; `--ckpt_path last` continues the run. Lightning notes SIGTERM
itself (`trainer.received_sigterm`) but would end the run with exit code 0 at the end of the epoch, without saving.
A signal that arrives during validation ends the run there with the same exit code; `last.ckpt` then holds the
state saved at the end of the last step.

It is a Lightning `Checkpoint`, so it runs after the other callbacks and after ModelCheckpoint in each hook:
the file it writes after a validation already records that validation's best checkpoint. Under DDP the save is
collective (every rank calls `trainer.save_checkpoint`, rank 0 writes): rank 0 decides
when it is due, from its own clock, and broadcasts the decision, so the ranks never disagree.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mtl_breast.files import atomic_path

LAST_NAME = "last.ckpt"


class CheckpointError(ValueError):
    """A checkpoint to resume from that cannot be read (truncated, garbled); the message names the file."""


class LastCheckpoint(Checkpoint):
    """Keep ``dirpath/last.ckpt`` current.

    Args:
        dirpath: folder of the checkpoints; default ``trainer.default_root_dir/checkpoints``.
        every_n_minutes: write at the first step after this many minutes of training since the last write
            (None = off). The default loses at most about five minutes of a long run.
        every_n_steps: write every this many optimizer steps (None = off).
        signals: names of signals that pre-empt the run like SIGTERM (save at the end of the step, exit 128 + the
            signal's number), e.g. ``["SIGUSR2"]`` for ``#SBATCH --signal=B:USR2@300``. SIGTERM always does.
    """

    def __init__(self, dirpath: str | None = None, every_n_minutes: float | None = 5.0,
                 every_n_steps: int | None = None, signals: list[str] | None = None):
        super().__init__()
        if every_n_minutes is not None and every_n_minutes <= 0:
            raise ValueError(f"every_n_minutes must be > 0 or None, got {every_n_minutes}")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or None, got {every_n_steps}")
        self.dirpath = dirpath
        self.every_n_minutes, self.every_n_steps = every_n_minutes, every_n_steps
        self.signals = [_signal_number(name) for name in signals or []]
        self._last_time = time.monotonic()
        self._saved_step: int | None = None
        self._pending = False  # a validation ran since the last write: its choices must reach the file
        self._received: int | None = None  # a pre-empting signal arrived (its number)
        self._at_epoch_end = False
        self._previous_handlers: dict[int, object] = {}

    def path(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath or Path(trainer.default_root_dir) / "checkpoints") / LAST_NAME

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_time = time.monotonic()
        self._received = None
        for number in self.signals:  # SIGTERM is Lightning's: it sets trainer.received_sigterm
            self._previous_handlers[number] = signal.signal(number, self._note_signal)

    def _note_signal(self, number: int, frame) -> None:
        self._received = number

    def _restore_handlers(self) -> None:
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        self._previous_handlers = {}

    def _signalled(self, trainer: L.Trainer) -> int | None:
        """The pre-empting signal received by this process, if any (SIGTERM as Lightning noted it)."""
        if self._received is not None:
            return self._received
        return int(signal.SIGTERM) if getattr(trainer, "received_sigterm", False) else None

    def _due(self, trainer: L.Trainer) -> tuple[bool, int | None]:
        """(a periodic write is due, the pre-empting signal or None): rank 0's decision, so the ranks agree."""
        step = trainer.global_step
        due = bool(self.every_n_steps) and step > 0 and step % self.every_n_steps == 0
        if self.every_n_minutes is not None and time.monotonic() - self._last_time >= 60.0 * self.every_n_minutes:
            due = True
        due, stop = trainer.strategy.broadcast((due, self._signalled(trainer)), src=0)
        return bool(due), stop

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        due, stop = self._due(trainer)
        if due or self._pending or stop is not None:
            self.save(trainer)
        if stop is not None:
            path = self.path(trainer)
            if trainer.is_global_zero:
                print(f"{signal.Signals(stop).name} received: {path} saved at step {trainer.global_step}; exiting "
                      f"with code {128 + stop}; continue with --ckpt_path last", file=sys.stderr, flush=True)
            raise SIGTERMException(128 + stop)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        # Lightning stops on SIGTERM at the end of an epoch or during validation with SystemExit(None): exit 0, as
        # if the run had finished. A pre-empted run must not look finished.
        if isinstance(exception, SIGTERMException) and not exception.code:
            number = self._signalled(trainer) or int(signal.SIGTERM)
            if trainer.is_global_zero:
                print(f"{signal.Signals(number).name} received: the run stopped before its end; {self.path(trainer)} "
                      f"holds step {self._saved_step}; exiting with code {128 + number}; continue with "
                      "--ckpt_path last", file=sys.stderr, flush=True)
            exception.code = 128 + number

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # What validation chose (the pCR threshold, the best checkpoint) goes into the next write: at the end of
        # the epoch, after ModelCheckpoint has recorded its best there, or at the next step.
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._pending = True

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._at_epoch_end = True
        try:
            self.save(trainer)
        finally:
            self._at_epoch_end = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Written from `on_train_epoch_end`, the loop state shows the epoch processed but not completed (Lightning
        # counts it complete only after the hooks) and its batch counters full. Restored as it is in a run with
        # `max_steps` and no validation at that epoch end, Lightning restarts the finished epoch and runs one more
        # batch in it, so the resumed run drifts a batch and an epoch off the uninterrupted one (and, made complete
        # but with full batch counters, the next epoch ends after one batch). Every epoch-end hook has run by now (this
        # callback runs last), so the file records the epoch as complete and the next one as not begun.
        if self._at_epoch_end and "fit_loop" in checkpoint.get("loops", {}):
            _as_between_epochs(checkpoint["loops"]["fit_loop"])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()
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


def _as_between_epochs(fit_loop: dict) -> None:
    """Make a fit loop's saved state read as between two epochs: the last one complete, the next one not begun
    (the per-epoch `current` counters of its batches, scheduler and optimizer steps at 0). Totals are unchanged."""
    progress = fit_loop.get("epoch_progress")
    for part in ("total", "current") if progress else ():
        progress[part]["completed"] = progress[part]["processed"]

    def zero_current(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "current" and isinstance(value, dict):
                    node[key] = dict.fromkeys(value, 0)
                else:
                    zero_current(value)

    for key in ("epoch_loop.batch_progress", "epoch_loop.scheduler_progress",
                "epoch_loop.automatic_optimization.optim_progress",
                "epoch_loop.manual_optimization.optim_step_progress"):
        if key in fit_loop:
            zero_current(fit_loop[key])
    if "epoch_loop.batch_progress" in fit_loop:
        fit_loop["epoch_loop.batch_progress"]["is_last_batch"] = False


def _signal_number(name: str | int) -> int:
    """The number of a signal given by name (``"SIGUSR2"``, ``"USR2"``) or number; ValueError for an unknown one."""
    if isinstance(name, int):
        return int(signal.Signals(name))
    text = str(name).upper()
    try:
        return int(signal.Signals[text if text.startswith("SIG") else f"SIG{text}"])
    except KeyError:
        raise ValueError(f"unknown signal {name!r} (use a name such as SIGUSR1, SIGUSR2, SIGTERM)") from None
