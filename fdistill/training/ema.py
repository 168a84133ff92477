"""Exponential moving average of a network's weights (the generator's in distillation, the teacher's in
EDM training): theta_ema <- beta theta_ema + (1 - beta) theta after every optimizer step."""

from __future__ import annotations

import copy

import torch
from torch import nn

from fdistill.networks.shared_base import AdapterView


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, beta: float) -> None:
    """Parameters move by lerp towards ``net``'s (one fused multi-tensor call); buffers (e.g. fixed
    Fourier frequencies) are copied."""
    ema_params, params = list(ema.parameters()), list(net.parameters())
    if len(ema_params) != len(params):
        raise ValueError("the EMA and its network have different parameters")
    if params and not hasattr(params[0], "to_local"):  # plain tensors; sharded DTensors go one by one
        torch._foreach_lerp_(ema_params, params, 1.0 - beta)
    else:
        for p_ema, p in zip(ema_params, params):
            p_ema.lerp_(p, 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), net.buffers(), strict=True):
        b_ema.copy_(b)


def ema_copy(net: nn.Module) -> nn.Module:
    """A frozen copy of ``net`` to hold its EMA: a deep copy, or for a shared-base view a sibling adapter on the
    same base (``networks.shared_base``: the base's weights are not copied)."""
    if isinstance(net, AdapterView):
        return net.ema_copy()
    return copy.deepcopy(net).eval().requires_grad_(False)
