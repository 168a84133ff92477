"""Discriminator heads on frozen-teacher features (App. B: a small classification head, as in LADD).

The head maps the teacher's feature dict ``{key: tensor}`` to one logit per sample: one head per
key, logits averaged over heads. The density ratio is read off it as r = exp(logit) (Sec. 3).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


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
        return self.net(f.float()).flatten(1).squeeze(1)


class Discriminator(nn.Module):
    """One head per tapped feature; the logit is their mean (FastGen's convention)."""

    def __init__(self, heads: dict[int, nn.Module]) -> None:
        super().__init__()
        self.keys = sorted(heads)
        self.heads = nn.ModuleDict({str(k): heads[k] for k in self.keys})

    @classmethod
    def mlp(cls, feature_channels: dict[int, int], hidden: int = 128) -> Discriminator:
        return cls({k: MLPHead(c, hidden) for k, c in feature_channels.items()})

    @classmethod
    def conv(cls, feature_channels: dict[int, int], hidden: int = 128) -> Discriminator:
        """One ConvHead per tapped resolution (App. B: e.g. (32, 16, 8) for CIFAR-10, (8,) for ImageNet-64)."""
        return cls({res: ConvHead(c, res, hidden) for res, c in feature_channels.items()})

    def forward(self, features: dict[int, Tensor]) -> Tensor:
        return torch.stack([self.heads[str(k)](features[k]) for k in self.keys]).mean(0)
