"""Attention for R1: PyTorch's fused attention kernels (flash, memory-efficient) have no double backward,
which exact R1 (the gradient of the discriminator's input gradient) needs; the math kernel has one, but saves
every attention's L x L scores. So the math kernel runs only inside ``double_backward()`` (the distiller's exact
R1 pass); the GAN term's teacher pass, differentiated once into the generator, keeps the fused kernels.

Gradient checkpointing recomputes a unit's forward in backward, outside ``double_backward()``: ``checkpoint`` (the
checkpoint function fdistill gives diffusers' networks) recomputes it on the kernels its forward ran on."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.utils.checkpoint

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


def sdpa_backends() -> tuple | None:
    """The scaled-dot-product-attention kernels now enabled (None where torch cannot say)."""
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:
        return None
    cuda = torch.backends.cuda
    flags = ((SDPBackend.FLASH_ATTENTION, cuda.flash_sdp_enabled()),
             (SDPBackend.EFFICIENT_ATTENTION, cuda.mem_efficient_sdp_enabled()),
             (SDPBackend.MATH, cuda.math_sdp_enabled()), (SDPBackend.CUDNN_ATTENTION, cuda.cudnn_sdp_enabled()))
    return tuple(backend for backend, on in flags if on)


def sdpa_kernels(backends: tuple | None):
    """A context with exactly ``backends`` enabled (nothing changed when they are the current ones)."""
    if backends is None or backends == sdpa_backends():
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(list(backends))


def checkpoint(module: torch.nn.Module, *args, context: Callable[[], contextlib.AbstractContextManager] | None = None,
               **kwargs):
    """A diffusers ``gradient_checkpointing_func``: non-reentrant ``torch.utils.checkpoint`` of ``module`` whose
    recomputation in backward runs on the attention kernels enabled at its forward (exact R1's math kernel, though
    the recomputation runs outside ``double_backward()``), inside ``context()`` when given (the shared base's adapter
    and mode: ``SharedBase.checkpoint``). diffusers calls it only with grad enabled: no-grad passes never reach it."""
    backends = sdpa_backends()

    def run(*a, **k):
        with sdpa_kernels(backends), context() if context is not None else contextlib.nullcontext():
            return module(*a, **k)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)
