"""How `perf` measures: the numerics variants, the timed candidates, interleaved timing rounds, peak memory and
evaluation throughput (moved out of `perf_model.py`, which builds the candidates and runs the measurement)."""

from __future__ import annotations

import gc
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.layers import Attention
from timm.models.swin_transformer import WindowAttention
from torch import Tensor, nn

from benchmark.core.device import sync
from benchmark.core.platform import can_reset_peak_rss, malloc_trim, peak_rss_mib, proc_status_mib, reset_peak_rss
from methods import PeftModel, family

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
    """Route every timm `Attention` and Swin `WindowAttention` (and our key-value-extended wrapper, which reads the
    same flag) through `scaled_dot_product_attention` (`fused`) or through the explicit softmax(QKᵀ)V
    (`explicit`). timm leaves Swin's windows on the explicit path unless told (its fused path is experimental)."""
    if kind not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {kind!r}")
    for m in model.modules():
        if isinstance(m, Attention | WindowAttention):
            m.fused_attn = kind == "fused"


def first_block(backbone: nn.Module) -> nn.Module:
    """The first transformer block of a ViT or a Swin (its first stage's first block)."""
    return backbone.layers[0].blocks[0] if family(backbone) == "swin" else backbone.blocks[0]


def count_tokens(model: PeftModel, image_size: int, device: torch.device) -> int:
    """How many tokens enter the model's first block, measured on one image (prompts included). On a Swin, the
    patches of its (B, H, W, C) feature map: prompts there travel beside the map, replicated into every window,
    and are not counted (the floor of a Swin is its plain forward)."""
    seen: list[int] = []

    def record(m: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0]
        seen.append(x.shape[1] * x.shape[2] if x.dim() == 4 else x.shape[1])

    handle = first_block(model.backbone).register_forward_pre_hook(record)
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
PHASE_PEAK = "resident set (VmHWM, reset per phase)"
# Without `/proc` (macOS) the high-water mark cannot be reset: a phase's figure is how far it raised the
# process's peak since it started, which is 0 for a phase smaller than an earlier one.
PROCESS_PEAK = "rise of the process's peak RSS (ru_maxrss; no /proc to reset it per phase: a lower bound)"


def memory_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda max allocated"
    return PHASE_PEAK if can_reset_peak_rss() else PROCESS_PEAK


class PeakMemory:
    """The peak memory of one phase. CUDA: the caching allocator's peak. CPU: the process's resident set,
    its high-water mark reset through Linux's `/proc/self/clear_refs`; where there is no `/proc` (or the reset
    is refused), the process's peak since it started (`ru_maxrss`), as `kind` says.

    No library measures a per-phase peak RSS, hence this. On the CPU, glibc's malloc keeps freed memory
    resident, which a later phase would reuse without raising the resident set; `settle` hands it back
    (`malloc_trim`, where the C library has it) before a phase's baseline is read.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._trim = malloc_trim() if device.type != "cuda" else None
        self.kind = memory_kind(device)
        self._per_phase = self.kind != PROCESS_PEAK

    def settle(self) -> None:
        """Free what is garbage and return the allocator's free memory to the system (CPU)."""
        gc.collect()
        if self._trim is not None:
            self._trim(0)

    def current(self) -> float:
        """Memory in use now (CUDA, `/proc`); without `/proc`, the process's peak so far (the baseline a phase
        must rise above)."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        now = proc_status_mib("VmRSS") if self._per_phase else None
        return peak_rss_mib() if now is None else now

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._per_phase:
            reset_peak_rss()

    def peak(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        hwm = proc_status_mib("VmHWM") if self._per_phase else None
        return peak_rss_mib() if hwm is None else hwm


# -- candidates -----------------------------------------------------------------------------------------
@dataclass
class Candidate:
    """Something whose training step is timed: a method's model, or the floor at a token count.

    A method that cannot be built or stepped stays a candidate with `error` set (one line: why), so the report
    says so in its row instead of leaving the method out; `note` says how a timed method was timed when that is
    not simply its model for the task (e.g. before a pruning decision)."""

    name: str
    kind: str  # "method" | "floor" | "head" | "plain"
    variant: Variant
    tokens: int
    step: Callable[[], None]
    evaluate: Callable[[Tensor], Tensor] | None = None
    params: dict[str, int] | None = None
    memory_mb: float | None = None
    warm: bool = False  # warmed up already (methods are, when their memory is measured)
    times: list[float] = field(default_factory=list)
    config: Any = None  # the method's config as timed (its task's settings)
    model: Any = None  # the method's model, as built and stepped (for its merged model)
    features_frozen: bool = False  # the model's `features_frozen`: a run may train the head on cached features
    note: str | None = None
    error: str | None = None

    @property
    def timed(self) -> bool:
        return self.error is None


def one_line(error: BaseException, limit: int = 240) -> str:
    """An exception as one line for a report cell: its type and the first line of its message, shortened."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def untimed(name: str, variant: Variant, error: BaseException | str) -> Candidate:
    """The candidate of a method that cannot be timed: no step, `error` saying why in one line."""
    reason = error if isinstance(error, str) else one_line(error)
    return Candidate(name, "method", variant, 0, lambda: None, error=reason)


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
    candidates = [c for c in candidates if c.timed]
    for c in candidates:
        for _ in range(0 if c.warm else warmup):
            _guarded(c, c.step)
        c.warm = True
    for r in range(repeats):
        order = candidates[r % len(candidates) :] + candidates[: r % len(candidates)]
        for c in order:
            if c.timed:
                _guarded(c, lambda c=c: c.times.append(time_call(c.step, device)))
        if progress:
            progress(f"round {r + 1}/{repeats}")


def _guarded(c: Candidate, fn: Callable[[], Any]) -> None:
    """Run `fn`; a method's step that raises makes it untimed (its error in one line) instead of ending the run."""
    try:
        fn()
    except Exception as e:
        if c.kind != "method":
            raise
        c.error, c.times = f"its training step failed: {one_line(e)}", []


def measure_memory(candidate: Candidate, memory: PeakMemory, before_build: float) -> None:
    """Peak memory of one training step above the level before the candidate was built (so: its own copy of
    the model, gradients, optimiser state and the step's activations). The caller has already warmed the
    candidate up (optimiser state exists)."""
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
