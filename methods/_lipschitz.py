"""Upper bounds of a convolution's operator norm, the Lipschitz constants LION's implicit layers are scaled by."""

from __future__ import annotations

import torch
from torch import Tensor


def conv_operator_bound(weight: Tensor, size: tuple[int, int]) -> Tensor:
    """An upper bound of the operator norm of a stride-1 'same' convolution with zero padding on `size`.

    The zero-padded convolution is the restriction of a circular convolution on the grid enlarged by the
    kernel size − 1 (the zero border keeps wrap-around out of the interior), whose norm is the largest
    singular value of the kernel's Fourier transform over that grid's frequencies.

    A real kernel's transform is conjugate-symmetric, so half the frequencies (`rfft2`) carry every
    singular value; each frequency's largest singular value comes from the largest eigenvalue of the
    small Hermitian matrix K̂ᴴK̂ (`eigvalsh`, several times cheaper than an SVD per frequency).
    """
    k = weight.shape[-1]
    spectrum = torch.fft.rfft2(weight, s=(size[0] + k - 1, size[1] + k - 1)).permute(2, 3, 0, 1)  # [H', W'', o, i]
    gram = spectrum.mH @ spectrum
    return torch.linalg.eigvalsh(gram)[..., -1].max().clamp_min(0).sqrt()


def kernel_bound(weight: Tensor) -> Tensor:
    """k·‖M‖₂ for the [c_out, c_in·k·k] kernel matrix M: every pixel enters at most k² patches."""
    return weight.shape[-1] * torch.linalg.matrix_norm(weight.flatten(1), ord=2)
