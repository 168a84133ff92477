"""Attention for R1: PyTorch's fused attention kernels (flash, memory-efficient) have no double backward,
which exact R1 (the gradient of the discriminator's input gradient) needs; the math kernel has one, but saves
every attention's L x L scores. So the math kernel runs only inside ``double_backward()`` (the distiller's exact
R1 pass); the GAN term's teacher pass, differentiated once into the generator, keeps the fused kernels."""

from __future__ import annotations

import contextlib

import torch

_double_backward = False


@contextlib.contextmanager
def double_backward():
    """The forward passes inside will be differentiated twice (exact R1): ``twice_differentiable`` then applies."""
    global _double_backward
    before, _double_backward = _double_backward, True
    try:
        yield
    finally:
        _double_backward = before


def twice_differentiable(x: torch.Tensor):
    """A context in which ``F.scaled_dot_product_attention`` runs on the math kernel when the forward of ``x``
    (an input requiring grad, inside ``double_backward()``) will be differentiated twice; else no change."""
    if not (_double_backward and torch.is_grad_enabled() and x.requires_grad):
        return contextlib.nullcontext()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: the math kernel is the default on CPU, and chosen when needed on CUDA
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)
