"""Random-number-generator state in training checkpoints, so a resumed run draws what the original would have.

Lightning checkpoints hold the weights, optimizer, scheduler and loop counters but not the RNGs; the
MAE masks and the phase-time dropout come from the global torch generator. The task modules store the states
here when they save a checkpoint and put them back when training restarts from it: `on_load_checkpoint` keeps
them and `on_train_start` sets them, right before the first step the run continues with, which is where the
states were taken (at an epoch end or after a step). The data path never draws from these generators (the
training order and augmentation come from `data.sampling`, the loaders have their own generators) and
validation draws from a forked one, so nothing between the save and that step moves them.
Everything is kept as tensors and plain Python values, so the checkpoint still loads with
`torch.load(weights_only=True)` (no numpy objects to unpickle).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

KEY = "mtl_breast_rng"


def rng_state() -> dict[str, Any]:
    """The torch (CPU and initialised CUDA devices), numpy and Python global generator states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (the CUDA part only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def checkpoint_rng_state(module) -> dict[str, Any]:
    """What a checkpoint keeps: `rng_state()`, or under DDP every rank's, as ``{"ranks": [state of rank 0, ...]}``.

    Called from `on_save_checkpoint`, which every rank runs (the save is collective; rank 0 writes the file).
    """
    state = rng_state()
    trainer = getattr(module, "_trainer", None)
    if trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized():
        states: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(states, state)
        return {"ranks": states}
    return state


def decorrelate_ranks(rank: int) -> None:
    """Give each DDP rank its own generator sequences, derived from the shared (seeded) state and the rank.

    `seed_everything` seeds every rank alike, so without this all ranks draw the same MAE masks, phase dropout
    and worker seeds. Every rank takes one draw from the shared state, so the result depends only on the run's
    seed and the rank.
    """
    seed = int(torch.randint(0, 2**31, (), dtype=torch.int64)) * 1_000_003 + int(rank)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def restore_rng_on_train_start(module) -> None:
    """Set the states a resumed `module` kept from its checkpoint (`module._resume_rng`), once; under DDP give each
    rank its own: the one it saved when the world size is unchanged, else rank 0's decorrelated by rank."""
    state, module._resume_rng = getattr(module, "_resume_rng", None), None
    trainer = getattr(module, "_trainer", None)
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    if state is not None:
        ranks = state.get("ranks")
        if ranks is not None and len(ranks) == world:
            set_rng_state(ranks[rank])  # each rank continues its own sequence
            return
        set_rng_state(ranks[0] if ranks else state)
    if world > 1:
        decorrelate_ranks(rank)
