"""Discriminator heads on frozen-teacher features (App. B: a small classification head, as in LADD).

The discriminator maps the teacher's feature dict ``{key: tensor}`` to one logit per head and sample
(``head_logits``); its logit is their mean (``forward``), and the density ratio is read off it as
r = exp(logit) (Sec. 3). Two conv heads for feature maps: ``ConvHead`` (narrow, ``disc_hidden`` wide) and
``FastGenHead`` (NVlabs/FastGen's ``Discriminator_EDM`` head: the feature width kept throughout).

Video features (B, C, F, H, W) (a video transformer's tokens on their 3-D grid, ``teachers.families.wan``) go
through the same heads frame by frame (``map_logits``): the F frames folded into the batch, the F logits of a sample
averaged. Chosen over a Conv3d head (NVlabs/FastGen's ``dit_simple_conv3d`` for Wan, Conv3d kernel (2, 4, 4)
stride 2) because (1) the tapped block's self-attention already ran over all F' H' W' tokens, so each frame's map
carries the other frames' context; (2) ``Discriminator.conv`` is built from ``feature_channels()`` alone, before any
feature is seen, so the rank can only be read at the forward, and the same head (its parameters, state-dict names
and the memory model's count) then serves images and video; (3) any number of latent frames works, one included.
A map that is not square (a video's H' x W', the tap keyed by its shorter side) ends in a map wider than 1 x 1,
averaged (FastGen's heads end in a global average pool); square maps end at 1 x 1 as before.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def map_logits(net: nn.Module, f: Tensor) -> Tensor:
    """(B,): the logits of conv layers ``net`` on feature map ``f`` (B, C, H, W), the map ``net`` leaves averaged
    over its positions (1 x 1 for a square map); for video features (B, C, F, H, W) the frames folded into the
    batch and each sample's F logits averaged (the module's docstring says why)."""
    if f.dim() == 5:
        b, c, frames, h, w = f.shape
        return map_logits(net, f.transpose(1, 2).reshape(b * frames, c, h, w)).view(b, frames).mean(1)
    return net(f.float()).mean((2, 3)).squeeze(1)


class MLPHead(nn.Module):
    """Head for vector features (B, C)."""

    def __init__(self, channels: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1)
        )

    def forward(self, f: Tensor) -> Tensor:
        return self.net(f).squeeze(1)


class ConvHead(nn.Module):
    """Head for a feature map (B, C, R, R), after NVlabs/FastGen's: [4x4 conv stride 2, GroupNorm, SiLU]
    while the map is larger than 4x4, then a conv over the whole remaining map and a 1x1 conv to one logit."""

    def __init__(self, channels: int, resolution: int, hidden: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, r = channels, resolution
        while r > 4:
            norm = nn.GroupNorm(min(32, hidden // 4), hidden)
            layers += [nn.Conv2d(c, hidden, 4, stride=2, padding=1), norm, nn.SiLU()]
            c, r = hidden, r // 2
        layers += [nn.Conv2d(c, hidden, r), nn.SiLU(), nn.Conv2d(hidden, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, f: Tensor) -> Tensor:
        return map_logits(self.net, f)


def group_count(channels: int) -> int:
    """GroupNorm groups for ``channels`` as NVlabs/FastGen picks them (``_get_optimal_groups``): channels // 4
    up to 32 channels, else the largest divisor of ``channels`` that is at most 32."""
    if channels <= 32:
        return max(1, channels // 4)
    return next(g for g in range(32, 0, -1) if channels % g == 0)


class FastGenHead(nn.Module):
    """NVlabs/FastGen's head for a (B, C, R, R) feature map, C kept throughout: [4x4 conv stride 2, GroupNorm,
    SiLU] while R > 8, then 8 -> 4 (4x4 conv stride 2), 4 -> 1 (4x4 conv stride 4), each with GroupNorm and
    SiLU, and a 1x1 conv to one logit. ``net`` has the layer order (and so the state-dict names and shapes)
    of one of FastGen's ``discriminator_heads``. Maps below 8 x 8 (which FastGen does not take) skip the
    halvings and end in a conv over the whole map."""

    def __init__(self, channels: int, resolution: int) -> None:
        super().__init__()
        c, r, layers = channels, resolution, []

        def block(kernel: int, stride: int, padding: int) -> list[nn.Module]:
            return [nn.Conv2d(c, c, kernel, stride=stride, padding=padding), nn.GroupNorm(group_count(c), c), nn.SiLU()]

        while r >= 8:
            layers += block(4, 2, 1)
            r //= 2
        layers += block(r, r, 0) + [nn.Conv2d(c, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, f: Tensor) -> Tensor:
        return map_logits(self.net, f)


HEADS = ("fdistill", "fastgen")  # the conv heads ``Discriminator.conv`` builds


class Discriminator(nn.Module):
    """One head per tapped feature. ``head_logits``: (B, heads); ``forward``: their mean, the logit that
    r = exp(logit) reads (FastGen's convention)."""

    def __init__(self, heads: dict[int, nn.Module]) -> None:
        super().__init__()
        self.keys = sorted(heads)
        self.heads = nn.ModuleDict({str(k): heads[k] for k in self.keys})

    @classmethod
    def mlp(cls, feature_channels: dict[int, int], hidden: int = 128) -> Discriminator:
        return cls({k: MLPHead(c, hidden) for k, c in feature_channels.items()})

    @classmethod
    def conv(cls, feature_channels: dict[int, int], hidden: int = 128, head: str = "fdistill") -> Discriminator:
        """One conv head per tapped resolution (App. B: e.g. (32, 16, 8) for CIFAR-10, (8,) for ImageNet-64):
        ``ConvHead`` of width ``hidden``, or with ``head="fastgen"`` ``FastGenHead`` (the feature width)."""
        if head not in HEADS:
            raise ValueError(f"disc_head must be one of {', '.join(HEADS)}, got {head!r}")
        if head == "fastgen":
            return cls({res: FastGenHead(c, res) for res, c in feature_channels.items()})
        return cls({res: ConvHead(c, res, hidden) for res, c in feature_channels.items()})

    def head_logits(self, features: dict[int, Tensor]) -> Tensor:
        """(B, heads): each head's logit, heads in increasing key order."""
        return torch.stack([self.heads[str(k)](features[k]) for k in self.keys], 1)

    def forward(self, features: dict[int, Tensor]) -> Tensor:
        return self.head_logits(features).mean(1)
