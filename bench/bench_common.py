"""What the bench scripts share: the device and its name, its dense bf16 peak, peak memory of a block, FLOPs, JSON out.

Imported by the scripts beside it (`python bench/x.py` puts bench/ first on the path); nothing in `mtl_breast`
imports it.
"""

from __future__ import annotations

import json
import platform
import shlex
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s by device-name fragment, first match wins (vendor data
# sheets; SXM parts unless named). `--peak-tflops` overrides it, e.g. for a power-capped or unlisted card.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H800", 989.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0), ("4090", 165.0),
    ("3090", 71.0),
]


def pick_device(name: str | None = None) -> torch.device:
    """``name`` (e.g. "cpu", "cuda:0") or the first CUDA device when there is one, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def device_name(device: torch.device) -> str:
    """The GPU's marketing name, or ``cpu <arch> (<n> threads)``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def peak_bf16_tflops(device: torch.device, override: float | None = None) -> tuple[float | None, str]:
    """(dense bf16 peak in TFLOP/s, where the number comes from); (None, reason) for an unknown device."""
    if override:
        return float(override), f"--peak-tflops {override:g} (given)"
    name = device_name(device)
    for key, peak in PEAK_BF16_TFLOPS:
        if device.type == "cuda" and key in name:
            return peak, f"table: '{key}' in device name '{name}' -> {peak:g} TFLOP/s dense bf16 (no sparsity)"
    return None, f"no bf16 peak known for '{name}' (pass --peak-tflops)"


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock timing covers them (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensors_of(*things) -> list[torch.Tensor]:
    """Tensors held by modules (parameters, gradients, buffers), optimizers (state) and (nested) batches."""
    found: list[torch.Tensor] = []
    for thing in things:
        if isinstance(thing, torch.Tensor):
            found.append(thing)
        elif isinstance(thing, torch.nn.Module):
            found += [*thing.parameters(), *thing.buffers()]
            found += [p.grad for p in thing.parameters() if p.grad is not None]
        elif isinstance(thing, torch.optim.Optimizer):
            found += [v for state in thing.state.values() for v in state.values() if torch.is_tensor(v)]
        elif isinstance(thing, dict):
            found += tensors_of(*thing.values())
        elif isinstance(thing, list | tuple):
            found += tensors_of(*thing)
    return found


class PeakMemory:
    """Peak bytes allocated while the block runs.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (everything allocated counts).
    CPU: the live bytes of every tensor the block creates, traced op by op (`mtl_breast.memtrace.LiveBytes`,
    512-byte blocks as CUDA's allocator), plus the ``baseline`` tensors alive on entry -- the same quantity for
    code that runs on the CPU, so a dry run goes through the same measurement code.

    Args:
        device: where the block runs.
        baseline: tensors alive before the block that the peak includes (CPU; see `tensors_of`).
    """

    def __init__(self, device: torch.device, baseline: Iterable[torch.Tensor] = ()):
        self.device, self.baseline = device, list(baseline)
        self.peak_bytes = 0
        self._trace = None

    @property
    def metric(self) -> str:
        return ("cuda max_memory_allocated" if self.device.type == "cuda"
                else "live tensor bytes traced on the CPU (mtl_breast.memtrace.LiveBytes)")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            from mtl_breast.memtrace import LiveBytes

            self._trace = LiveBytes()
            for t in self.baseline:
                self._trace.add(t, "baseline")
            self._trace.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._trace.__exit__(*exc)
            self.peak_bytes = self._trace.peak
        self.baseline = []


def _cpu_flash_flops():
    from torch.utils import flop_counter

    # PyTorch's CPU flash kernel costs what CUDA's flash kernel does; the flop counter only knows the CUDA ones.
    return {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *a, **kw: flop_counter.sdpa_flop_count(q, k, v),
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *a, **kw: flop_counter.sdpa_backward_flop_count(g, q, k, v),
    }


def flop_counter_mode():
    """A ``torch.utils.flop_counter.FlopCounterMode`` that also counts the CPU flash-attention kernel."""
    from torch.utils import flop_counter

    return flop_counter.FlopCounterMode(display=False, custom_mapping=_cpu_flash_flops())


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (matmuls, convolutions, attention; 2 per multiply-add) of the ops ``fn()`` runs."""
    counter = flop_counter_mode()
    with counter:
        fn()
    return int(counter.get_total_flops())


def run_meta(command: Iterable[str], started: float, threads: int | None = None) -> dict:
    """What a CPU experiment ran and on what: the command, seconds since ``started`` (``time.perf_counter``), the
    CPU with ``threads`` torch threads (default: torch's own count) and torch's version."""
    return {"command": shlex.join(command), "seconds": round(time.perf_counter() - started, 1),
            "device": f"cpu ({platform.processor() or platform.machine()}, {threads or torch.get_num_threads()} "
                      "threads)",
            "torch": torch.__version__}


def emit(result: dict, out: str | Path | None = None) -> dict:
    """Print ``result`` as JSON and, when ``out`` is given, write it there too."""
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    return result
