"""The device a process computes on, and waiting for it."""

from __future__ import annotations

import torch


def compute_device() -> torch.device:
    """The GPU when there is one (the process's first visible one), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
