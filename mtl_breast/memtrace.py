"""Device memory of PyTorch code, traced op by op, with real tensors or with fake ones (no data, no GPU).

`LiveBytes` is a ``TorchDispatchMode`` that registers the storage of every op output and a weakref
finalizer that unregisters it when the last tensor using it dies, so the live bytes are known at every
moment; their maximum is the peak that ``torch.cuda.max_memory_allocated`` reports on a GPU (each storage
rounded up to the caching allocator's 512-byte blocks). Run under ``FakeTensorMode`` the same code costs
neither memory nor compute, which is how `mtl_breast.run.fitcheck` sizes a ViT-B step on a laptop.

`CudaAutocastPolicy` makes CPU autocast follow CUDA autocast's op policy where the two differ, so a fake
CPU run under ``torch.autocast("cpu")`` keeps the same dtypes (and bytes) as the CUDA run would.
"""
# References: torch/distributed/_tools/mem_tracker.py (storage weakrefs under FakeTensorMode);
# aten/src/ATen/autocast_mode.cpp (the CUDA and CPU autocast op lists).

from __future__ import annotations

import math
import traceback
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["BLOCK_BYTES", "CudaAutocastPolicy", "FakeMode", "LiveBytes", "block_bytes"]

BLOCK_BYTES = 512  # the CUDA caching allocator rounds every block up to a multiple of 512 bytes

# Torch function names that CUDA autocast runs in float32 while CPU autocast leaves them in the input dtype.
_CUDA_FP32 = frozenset({
    "layer_norm", "group_norm", "exp", "log", "log2", "log10", "log1p", "expm1", "pow", "__pow__", "__rpow__",
    "rsqrt", "reciprocal", "softplus", "logsumexp", "interpolate", "cosine_similarity", "norm", "cdist", "dist",
    "cross_entropy", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss", "binary_cross_entropy_with_logits",
})
# ... that give a float32 result for a half input without a float32 copy of it (CUDA's "fp32_set_opt_dtype").
_CUDA_FP32_OUT = frozenset({"softmax", "log_softmax", "sum", "cumsum", "prod", "cumprod"})
# ... that CUDA runs in low precision and CPU autocast only after decomposing them (into bmm).
_CUDA_LOW = frozenset({"einsum"})
# ... that CPU autocast runs in float32 and CUDA leaves in the input dtype.
_CPU_ONLY_FP32 = frozenset({"adaptive_avg_pool3d", "avg_pool3d", "max_pool3d", "adaptive_max_pool3d"})
_HALF = (torch.bfloat16, torch.float16)


def block_bytes(nbytes: int) -> int:
    """Bytes the CUDA caching allocator hands out for a request of ``nbytes``."""
    return BLOCK_BYTES * math.ceil(nbytes / BLOCK_BYTES)


def _caller_site() -> str:
    """'mtl_breast/x.py:LINE' of the innermost project frame outside this file, else 'torch'."""
    for frame in reversed(traceback.extract_stack()):
        parts = Path(frame.filename).parts
        if "mtl_breast" in parts and parts[-1] != "memtrace.py":
            return f"{'/'.join(parts[parts.index('mtl_breast'):])}:{frame.lineno}"
    return "torch"


class LiveBytes(TorchDispatchMode):
    """Live device bytes over time, by storage, each storage tagged with what allocated it.

    Set ``tag`` (the label new storages get) and ``where`` (recorded as ``peak_at``) as the traced code
    moves along; ``retag`` relabels storages (e.g. gradients once backward has made them). ``peak`` and
    ``peak_by_tag`` describe the largest live set seen.

    With ``fake=True`` the values of small tensors (<= ``SMALL`` elements: phase masks, times, index lists,
    masking noise) are computed for real alongside the fake ones, so ``bool(mask.all())`` or ``t.tolist()``
    get their true answers; reading a value of a large fake tensor returns True / 1, and the call site is
    counted in ``data_dependent``.
    """

    SMALL = 4096

    def __init__(self, *, fake: bool = False) -> None:
        super().__init__()
        self.fake = fake
        self.live: dict[int, list] = {}  # storage key -> [bytes, tag]
        self.by_tag: Counter = Counter()
        self.total = self.peak = 0
        self.peak_by_tag: dict[str, int] = {}
        self.tag, self.where, self.peak_at = "untagged", "", ""
        self.data_dependent: Counter = Counter()
        self.values = WeakTensorKeyDictionary()  # fake tensor -> a real tensor holding its value

    def add(self, t: torch.Tensor, tag: str | None = None) -> None:
        """Register ``t``'s storage (once; views share it) under ``tag`` or the current tag."""
        storage = t.untyped_storage()
        key, nbytes = storage._cdata, block_bytes(storage.nbytes())
        entry = self.live.get(key)
        if entry is None:
            self.live[key] = [nbytes, tag or self.tag]
            weakref.finalize(storage, self._free, key)
            self._change(tag or self.tag, nbytes)
        elif entry[0] != nbytes:  # resized in place
            self._change(entry[1], nbytes - entry[0])
            entry[0] = nbytes

    def retag(self, tensors, tag: str) -> None:
        for t in tensors:
            entry = self.live.get(t.untyped_storage()._cdata)
            if entry is not None and entry[1] != tag:
                self.by_tag[entry[1]] -= entry[0]
                self.by_tag[tag] += entry[0]
                entry[1] = tag

    def tag_of(self, t: torch.Tensor) -> str | None:
        entry = self.live.get(t.untyped_storage()._cdata)
        return None if entry is None else entry[1]

    def _change(self, tag: str, delta: int) -> None:
        self.total += delta
        self.by_tag[tag] += delta
        if self.total > self.peak:
            self.peak, self.peak_at = self.total, self.where
            self.peak_by_tag = {k: v for k, v in self.by_tag.items() if v}

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.total -= entry[0]
            self.by_tag[entry[1]] -= entry[0]

    def _value(self, x: Any) -> Any:
        # A fake tensor's known value (or None); real tensors (literals being lifted) and non-tensors as they are.
        return self.values.get(x) if isinstance(x, FakeTensor) else x

    def _propagate(self, func, args, kwargs, outputs: list) -> None:
        """Compute the op on the real values of its inputs when all are known and its outputs are small."""
        small = bool(outputs) and all(o.numel() <= self.SMALL for o in outputs)
        if not small and not func._schema.is_mutable:
            return
        inputs = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        if small and all(self._value(x) is not None for x in inputs):
            with _disable_current_modes(), unset_fake_temporarily():
                real = func(*pytree.tree_map(self._value, args), **pytree.tree_map(self._value, kwargs))
            real_outputs = [x for x in pytree.tree_leaves(real) if isinstance(x, torch.Tensor)]
            for o, r in zip(outputs, real_outputs, strict=False):
                self.values[o] = r
        elif func._schema.is_mutable:  # written without a known value: forget the stale one
            for x in inputs:
                self.values.pop(x, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.prim.device.default:  # a metadata query, the most frequent call of all
            return func(*args, **kwargs)
        if self.fake and func is torch.ops.aten._local_scalar_dense.default:
            value = self.values.get(args[0])
            if value is not None:
                with unset_fake_temporarily():
                    return value.item()
            self.data_dependent[_caller_site()] += 1
            dtype = args[0].dtype
            return True if dtype == torch.bool else (1.0 if dtype.is_floating_point else 1)
        out = func(*args, **kwargs)
        outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if self.fake:
            self._propagate(func, args, kwargs, outputs)
        for t in outputs:
            self.add(t)
        return out


class CudaAutocastPolicy(TorchFunctionMode):
    """While CPU autocast is on, follow CUDA autocast's policy where it differs from CPU autocast's.

    CUDA runs norms, softmax, exp/log/pow and losses in float32 (and sums of half tensors with a float32
    result), einsum in low precision, and pooling in the input dtype. Autograd records the casts, so what is
    saved for backward has the CUDA dtypes. It follows checkpoint recomputation, which restores autocast.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in _CUDA_FP32:
            args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.float() if t.dtype in _HALF else t,
                                                (args, kwargs))
        elif name in _CUDA_FP32_OUT:
            if kwargs.get("dtype") is None and args and isinstance(args[0], torch.Tensor) and args[0].dtype in _HALF:
                kwargs = {**kwargs, "dtype": torch.float32}
        elif name in _CUDA_LOW:
            low = torch.get_autocast_dtype("cpu")
            args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to(low) if t.dtype == torch.float32 else t,
                                                (args, kwargs))
        elif name in _CPU_ONLY_FP32:
            with torch.autocast("cpu", enabled=False):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


class FakeMode(FakeTensorMode):
    """``FakeTensorMode(allow_non_fake_inputs=True)`` that asks ``torch.cuda.is_available()`` once, not per op."""

    def __init__(self) -> None:
        self._avoid_device_init = not torch.cuda.is_available()
        super().__init__(allow_non_fake_inputs=True)

    @property
    def avoid_device_init(self) -> bool:
        return self._avoid_device_init
