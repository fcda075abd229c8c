"""How `perf` measures: the numerics variants, the timed candidates, interleaved timing rounds, peak memory and
evaluation throughput (moved out of `perf_model.py`, which builds the candidates and runs the measurement)."""

from __future__ import annotations

import ctypes
import gc
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.layers import Attention
from torch import Tensor, nn

from benchmark.core.device import sync
from methods import PeftModel

ATTENTION = ("fused", "explicit")


PRECISION_DTYPES = {"32": None, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Variant:
    """A numerics setting measured side by side with the others: autocast precision and attention kernel."""

    precision: str = "32"
    attention: str = "fused"

    @property
    def label(self) -> str:
        return f"{'fp32' if self.precision == '32' else self.precision}/{self.attention}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def set_attention(model: nn.Module, kind: str) -> None:
    """Route every timm `Attention` (and our key-value-extended wrapper, which reads the same flag) through
    `scaled_dot_product_attention` (`fused`) or through the explicit softmax(QKᵀ)V (`explicit`)."""
    if kind not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {kind!r}")
    for m in model.modules():
        if isinstance(m, Attention):
            m.fused_attn = kind == "fused"


def count_tokens(model: PeftModel, image_size: int, device: torch.device) -> int:
    """How many tokens enter the model's first block, measured on one image (prompts included)."""
    seen: list[int] = []
    handle = model.backbone.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        handle.remove()
        model.train(was_training)
    return seen[0]


# -- memory ---------------------------------------------------------------------------------------------
def memory_kind(device: torch.device) -> str:
    return "cuda max allocated" if device.type == "cuda" else "resident set (VmHWM, reset per phase)"


class PeakMemory:
    """The peak memory of one phase. CUDA: the caching allocator's peak. CPU: the process's resident set,
    its high-water mark reset through Linux's `/proc/self/clear_refs`.

    No library measures a per-phase peak RSS, hence this. On the CPU, glibc's malloc keeps freed memory
    resident, which a later phase would reuse without raising the resident set; `settle` hands it back
    (`malloc_trim`) before a phase's baseline is read.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = memory_kind(device)
        self._trim: Callable[[int], int] | None = None
        self.available = device.type == "cuda" or self._prepare_cpu()

    def _prepare_cpu(self) -> bool:
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except (OSError, AttributeError):
            return False

    def settle(self) -> None:
        """Free what is garbage and return the allocator's free memory to the system (CPU)."""
        gc.collect()
        if self._trim is not None:
            self._trim(0)

    def _status(self, key: str) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB -> MiB
        raise OSError(f"no {key} in /proc/self/status")

    def current(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        return self._status("VmRSS") if self.available else 0.0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.available:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return self._status("VmHWM") if self.available else 0.0


# -- candidates -----------------------------------------------------------------------------------------
@dataclass
class Candidate:
    """Something whose training step is timed: a method's model, or the floor at a token count."""

    name: str
    kind: str  # "method" | "floor"
    variant: Variant
    tokens: int
    step: Callable[[], None]
    evaluate: Callable[[Tensor], Tensor] | None = None
    params: dict[str, int] | None = None
    memory_mb: float | None = None
    warm: bool = False  # warmed up already (methods are, when their memory is measured)
    times: list[float] = field(default_factory=list)


def autocast(device: torch.device, variant: Variant):
    dtype = PRECISION_DTYPES[variant.precision]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


# -- measuring ------------------------------------------------------------------------------------------
def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(candidates: list[Candidate], *, warmup: int, repeats: int, device: torch.device,
                progress: Callable[[str], None] | None = None) -> None:  # fmt: skip
    """Warm up every candidate not yet warm, then time `repeats` rounds of one step each, in a rotated order
    per round."""
    for c in candidates:
        for _ in range(0 if c.warm else warmup):
            c.step()
        c.warm = True
    for r in range(repeats):
        order = candidates[r % len(candidates) :] + candidates[: r % len(candidates)]
        for c in order:
            c.times.append(time_call(c.step, device))
        if progress:
            progress(f"round {r + 1}/{repeats}")


def measure_memory(candidate: Candidate, memory: PeakMemory, before_build: float) -> None:
    """Peak memory of one training step above the level before the candidate was built (so: its own copy of
    the model, gradients, optimiser state and the step's activations). The caller has already warmed the
    candidate up (optimiser state exists)."""
    if not memory.available:
        return
    sync(memory.device)
    memory.settle()
    memory.reset()
    candidate.step()
    sync(memory.device)
    candidate.memory_mb = memory.peak() - before_build


def eval_throughput(candidate: Candidate, x: Tensor, *, repeats: int, device: torch.device) -> float:
    """Images per second of the candidate's evaluation forward (inference mode) on batch `x`; median of
    `repeats` after one warm-up call."""
    assert candidate.evaluate is not None
    candidate.evaluate(x)
    times = [time_call(lambda: candidate.evaluate(x), device) for _ in range(repeats)]
    return len(x) / statistics.median(times)


def step_ms(c: Candidate) -> float:
    return 1000 * statistics.median(c.times)
