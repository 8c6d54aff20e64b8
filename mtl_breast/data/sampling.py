"""Which training sample comes when, and with which augmentation: a pure function of (seed, epoch, position).

`EpochSampler` yields ``(case index, sample seed)`` pairs; `CachedCaseDataset` seeds the sample's random
transforms (crop, flips, gain, phase dropout) from the sample seed before applying them. So:

* the crops do not depend on the number of DataLoader workers or on which worker reads a sample;
* DDP ranks share one order (the same seed on every rank) and take disjoint positions of it, each position with
  its own seed, so ranks never draw the same augmentation;
* `ResumableLoader` starts each pass where the trainer's counters say the run stands, so a run resumed from a
  checkpoint written mid-epoch continues with the next batch of that epoch and sees exactly the samples the
  uninterrupted run saw.

The global torch generator, which draws the MAE masks and the model's own randomness, is checkpointed
separately (`tasks.rng`); nothing here draws from it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

SampleKey = tuple[int, int]  # (index into the dataset, seed of that sample's augmentation)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of the sample at `position` (over all ranks) of `epoch`: a 32-bit integer."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0])


class EpochSampler(DistributedSampler):
    """Shuffled (or ordered) positions of one epoch with a seed per sample; one rank's share under DDP.

    A `DistributedSampler`, so Lightning does not wrap it in another one under DDP: it already takes this rank's
    positions (``rank``, ``rank + world_size``, ...; the order is padded by repetition to a multiple of the world
    size, as `DistributedSampler` does).

    Args:
        num_samples: length of the dataset.
        seed: the same on every rank (the order must be common).
        shuffle: a new permutation each epoch; False keeps the dataset order.
        rank, world_size: this process and the number of processes.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if num_samples < 1:
            raise ValueError(f"EpochSampler needs at least one sample, got {num_samples}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        # DistributedSampler's own fields (epoch, num_replicas, rank, seed, shuffle) keep their meaning.
        self.dataset_length, self.num_replicas, self.rank = num_samples, world_size, rank
        self.seed, self.shuffle, self.epoch, self.drop_last = int(seed), shuffle, 0, False
        self.num_samples = math.ceil(num_samples / world_size)  # per rank
        self.total_size = self.num_samples * world_size
        self.driven, self._start = False, 0

    def __len__(self) -> int:
        return self.num_samples

    def order(self, epoch: int) -> np.ndarray:
        """Dataset indices of every position of `epoch`, all ranks, padded to `total_size`."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.dataset_length)
        else:
            order = np.arange(self.dataset_length)
        return np.resize(order, self.total_size)

    def keys(self, epoch: int, start: int = 0) -> list[SampleKey]:
        """This rank's samples of `epoch` from its `start`-th on."""
        order = self.order(epoch)
        positions = range(self.rank + start * self.num_replicas, self.total_size, self.num_replicas)
        return [(int(order[p]), sample_seed(self.seed, epoch, p)) for p in positions]

    def set_epoch(self, epoch: int) -> None:
        """Use `epoch`'s order next. Ignored when a `ResumableLoader` drives the sampler: it sets the epoch from
        the trainer's counters, and after a restart Lightning's `set_epoch` number is one ahead of the epoch
        that actually runs."""
        if not self.driven:
            self.epoch = int(epoch)

    def start_at(self, epoch: int, start: int = 0) -> None:
        """The next iteration yields `epoch` from this rank's `start`-th sample on."""
        self.epoch, self._start = int(epoch), int(start)

    def __iter__(self) -> Iterator[SampleKey]:
        start, self._start = self._start, 0
        return iter(self.keys(self.epoch, start))


class ResumableLoader(DataLoader):
    """A training DataLoader over an `EpochSampler` whose place in the run Lightning checkpoints.

    Each pass asks `position`, at its first batch, where the run stands (the trainer's counters) and starts
    there: at the first sample of a new epoch, or after the samples already trained when a run restarts
    mid-epoch. Lightning's own `set_epoch` calls are not used for that: after a restart they are a step ahead
    of the epoch that actually runs. `state_dict` (seed, epoch, samples done), which Lightning stores in every
    checkpoint, records the place for inspection and brings the seed back when Lightning restores it.

    Args:
        position: returns (epoch, batches of it already trained, or None once it is complete); None for a loader
            used outside a trainer, which starts each iteration at the sampler's own epoch.
        *args, **kwargs: as `DataLoader`; `sampler` must be an `EpochSampler`.
    """

    def __init__(self, *args: Any, position: Callable[[], tuple[int, int | None]] | None = None, **kwargs: Any):
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, EpochSampler):
            raise TypeError("ResumableLoader needs an EpochSampler as its sampler")
        self.position = position
        self.sampler.driven = position is not None

    def _where(self) -> tuple[int, int]:
        """(epoch, samples of this rank already trained in it)."""
        sampler: EpochSampler = self.sampler  # type: ignore[assignment]
        if self.position is None:
            return sampler.epoch, 0
        epoch, batches = self.position()
        if batches is None:
            return epoch + 1, 0
        return epoch, batches * int(self.batch_size or 1)

    def __iter__(self) -> Iterator[Any]:
        return _StartOnFirstBatch(self)

    def _start(self) -> Iterator[Any]:
        epoch, start = self._where()
        self.sampler.start_at(epoch, start)
        # Making a DataLoader iterator draws a base seed for its workers; from the loader's own generator, so
        # the global one (MAE masks, dropout) is never touched by the data path and a resumed run draws the same.
        self.generator.manual_seed(int(np.random.SeedSequence([self.sampler.seed, epoch], spawn_key=(1,))
                                       .generate_state(1)[0]))
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        epoch, start = self._where()
        return {"seed": self.sampler.seed, "epoch": epoch, "samples_done": start}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.seed = int(state["seed"])


class _StartOnFirstBatch:
    """The iterator of a `ResumableLoader`, made when the first batch is asked for rather than by `iter()`.

    Lightning calls `iter()` on the training loader while it sets up (to count batches), before it restores a
    checkpoint's loop counters; the place in the run is only known at the first batch. (With workers, an
    iterator made early would also have queued the wrong samples already.)
    """

    def __init__(self, loader: ResumableLoader):
        self.loader, self.iterator = loader, None

    def __iter__(self) -> _StartOnFirstBatch:
        return self

    def __next__(self) -> Any:
        if self.iterator is None:
            self.iterator = self.loader._start()
        return next(self.iterator)
