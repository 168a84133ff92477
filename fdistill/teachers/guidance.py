"""Classifier-free guidance of a teacher, as a denoiser."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fdistill.core.protocols import Denoiser


class GuidedDenoiser(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022) as a denoiser, for distilling a guided teacher
    (App. D.5: the teacher score in Eq. (3) is replaced by its CFG version):
    D_w(x) = D(x | null) + w (D(x | c) - D(x | null)). In x0 space this equals guidance of eps,
    eps_null + w (eps_c - eps_null), since D = x - sigma eps is affine in eps. The null condition is the
    network's own (``net.null_condition(cond)``: Stable Diffusion's empty prompt, SDXL's zeros), else the
    all-zero label that label dropout trains. The unconditional pass runs without autograd; the
    discriminator's features come from the conditional pass. w = 1 is D itself.
    """

    def __init__(self, net: Denoiser, scale: float) -> None:
        super().__init__()
        self.net, self.scale = net, float(scale)
        self.sigma_data = net.sigma_data

    def feature_channels(self) -> dict[int, int]:
        return self.net.feature_channels()

    def prior_std(self, sigma: float) -> float:
        return self.net.prior_std(sigma)

    def null_condition(self, cond):
        return self.net.null_condition(cond)

    def default_sigmas(self) -> dict:
        return self.net.default_sigmas()


    def features(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> dict[int, Tensor]:
        return self.net.features(x, sigma, cond)  # the conditional pass, as in forward

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None, return_features: bool = False):
        out = self.net(x, sigma, cond, return_features=return_features)
        if self.scale == 1.0 or cond is None:
            return out
        d_cond, features = out if return_features else (out, None)
        with torch.no_grad():
            d_null = self.net(x, sigma, self.net.null_condition(cond))
        d = d_null + self.scale * (d_cond - d_null)
        return (d, features) if return_features else d
