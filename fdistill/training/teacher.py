"""Training a teacher with the EDM loss (Karras et al. 2022, Eq. 2 with Table 1), with label dropout for
classifier-free guidance; run by ``fdistill.training.loop.training_loop`` like the distiller."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from fdistill.config import to_dict
from fdistill.core.diffusion import edm_loss
from fdistill.training import checkpoint
from fdistill.training.ema import ema_update


@dataclass
class TeacherConfig:
    """EDM training of a teacher (EDM Eq. 2, Table 1), with label dropout for classifier-free guidance."""

    precond: str = "EDMPrecond"  # EDMPrecond | VPPrecond | VEPrecond
    network: dict = field(default_factory=dict)  # constructor kwargs as NVlabs/edm's (model_type, model_channels, ...)
    iterations: int = 4000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 200  # linear learning-rate warm-up, in iterations
    ema_beta: float = 0.999
    label_dropout: float = 0.1  # probability of the null label, for CFG
    P_mean: float = -1.2
    P_std: float = 1.2
    seed: int = 0
    log_every: int = 50  # iterations between log lines
    checkpoint_every: int = 0  # iterations between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2  # the newest checkpoints kept in <run>/checkpoints/


def drop_labels(labels: Tensor | None, p: float) -> Tensor | None:
    """Classifier-free guidance training (Ho & Salimans 2022): each one-hot label becomes the null
    (all-zero) label with probability p. The only place fdistill drops labels: networks never do."""
    if labels is None or p == 0:
        return labels
    keep = (torch.rand(labels.shape[0], 1, device=labels.device) >= p).to(labels.dtype)
    return labels * keep


class TeacherTrainer:
    """A denoiser trained by the EDM loss with Adam, linear warm-up and an EMA (the teacher is the EMA).
    ``real_data(n) -> (x in [-1, 1], one-hot labels or None)``."""

    def __init__(self, cfg: TeacherConfig, net: nn.Module, real_data: Callable[[int], tuple[Tensor, Tensor | None]],
                 device: str | torch.device = "cpu") -> None:
        self.cfg, self.real_data, self.device = cfg, real_data, torch.device(device)
        self.net = net.to(self.device).train()
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
        self.sigma_data = float(getattr(net, "sigma_data", 0.5))  # VP/VE nets have none: EDM's 0.5
        self.iteration, self.rank = 0, 0
        self.info: dict = {}

    def step(self) -> dict:
        cfg = self.cfg
        x, labels = self.real_data(cfg.batch_size)
        x = x.to(self.device)
        labels = drop_labels(None if labels is None else labels.to(self.device), cfg.label_dropout)
        loss = edm_loss(self.net, x, labels, cfg.P_mean, cfg.P_std, self.sigma_data)
        for g in self.opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (self.iteration + 1) / max(cfg.warmup, 1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        ema_update(self.ema, self.net, cfg.ema_beta)
        logs = {"iteration": self.iteration, "kind": "teacher", "loss": loss.detach()}
        self.iteration += 1
        return logs

    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net, "ema": self.ema}

    def save(self, path: str | Path) -> Path:
        meta = {"iteration": self.iteration, "config": to_dict(self.cfg), "info": self.info}
        if hasattr(self.real_data, "state_dict"):
            meta["data_state"] = self.real_data.state_dict()
        return checkpoint.save(path, self.modules(), {"net": self.opt}, meta)

    def load(self, path: str | Path) -> None:
        meta = checkpoint.load(path, self.modules(), {"net": self.opt})
        self.iteration = int(meta["iteration"])
        if "data_state" in meta:
            self.real_data.load_state_dict(meta["data_state"])
