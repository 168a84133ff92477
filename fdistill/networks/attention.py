"""Attention for R1: PyTorch's fused attention kernels (flash, memory-efficient) have no double backward,
which R1 (the gradient of the discriminator's input gradient) needs; the math kernel has one."""

from __future__ import annotations

import contextlib


def twice_differentiable():
    """A context in which ``F.scaled_dot_product_attention`` runs on the math kernel."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: the math kernel is the default on CPU, and chosen when needed on CUDA
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)
