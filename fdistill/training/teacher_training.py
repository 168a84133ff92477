"""Training a teacher with the EDM loss (Karras et al. 2022, Eq. 2 with Table 1), DDPM's uniform-timestep
loss for a VP teacher, or the rectified-flow velocity loss (Liu et al. 2023; Esser et al. 2024) for a
flow-matching teacher in EDM form, with condition dropout for classifier-free guidance; run by
``fdistill.training.loop.training_loop`` like the distiller."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from fdistill.config import resumable, to_dict
from fdistill.core.diffusion import denoising_loss, edm_loss
from fdistill.data.conditions import TextCondition
from fdistill.training import checkpoint
from fdistill.training.ema import ema_update

NOISE = ("edm", "timesteps", "flow")
FLOW_T = ("uniform", "logit_normal")


@dataclass
class TeacherConfig:
    """EDM training of a teacher (EDM Eq. 2, Table 1), DDPM's (``noise="timesteps"``) or rectified flow's
    (``noise="flow"``, ``flow_matching_loss``), with label dropout for classifier-free guidance.
    Fields made by ``fdistill.config.resumable`` are the ones ``--resume`` may change."""

    precond: str = "EDMPrecond"  # EDMPrecond | VPPrecond | VEPrecond
    network: dict = field(default_factory=dict)  # constructor kwargs as NVlabs/edm's (model_type, model_channels, ...)
    iterations: int = resumable(4000)
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 200  # linear learning-rate warm-up, in iterations
    ema_beta: float = 0.999
    label_dropout: float = 0.1  # probability of the null condition (label or prompt), for CFG
    noise: str = "edm"  # sigma ~ EDM's log-normal (P_mean, P_std), or "timesteps": uniform over a VP teacher's own
    # grid, or "flow": rectified-flow time t ~ flow_t on [t_min, t_max], sigma = t / (1 - t), velocity MSE
    P_mean: float = -1.2
    P_std: float = 1.2
    flow_t: str = "uniform"  # uniform | logit_normal (t = sigmoid(n), n ~ N(0, 1), as SD3 trains; clamped)
    t_min: float = 0.001  # NVlabs/FastGen's range of t for rectified-flow teachers
    t_max: float = 0.999
    seed: int = 0
    log_every: int = resumable(50)  # iterations between log lines
    checkpoint_every: int = resumable(0)  # iterations between checkpoints; 0 = only at the end
    keep_checkpoints: int = resumable(2)  # the newest checkpoints kept in <run>/checkpoints/

    def __post_init__(self) -> None:
        from fdistill import checks
        from fdistill.networks.edm import PRECONDS
        from fdistill.networks.edm_kwargs import check_network_kwargs

        checks.choice("precond", self.precond, PRECONDS)
        check_network_kwargs(self.precond, self.network, "network")
        for name in ("iterations", "batch_size", "log_every", "keep_checkpoints"):
            checks.integer(name, getattr(self, name), 1)
        for name in ("warmup", "checkpoint_every"):
            checks.integer(name, getattr(self, name), 0)
        checks.integer("seed", self.seed)
        checks.number("lr", self.lr, 0, low_open=True)
        checks.number("ema_beta", self.ema_beta, 0, 1, high_open=True)
        checks.number("label_dropout", self.label_dropout, 0, 1, high_open=True)
        checks.choice("noise", self.noise, NOISE)
        checks.number("P_mean", self.P_mean)
        checks.number("P_std", self.P_std, 0, low_open=True)
        checks.choice("flow_t", self.flow_t, FLOW_T)
        checks.number("t_min", self.t_min, 0, 1, low_open=True, high_open=True)
        checks.number("t_max", self.t_max, self.t_min, 1, high_open=True)


def flow_times(n: int, kind: str, t_min: float, t_max: float, device=None) -> Tensor:
    """Rectified-flow times for training: uniform on [t_min, t_max], or logit-normal(0, 1) (SD3's
    ``logit_normal`` sampling, Esser et al. 2024 Sec. 3.1: t = sigmoid(n), n ~ N(0, 1)) clamped to the range."""
    if kind == "uniform":
        return t_min + (t_max - t_min) * torch.rand(n, device=device)
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(n, device=device)).clamp(t_min, t_max)
    raise ValueError(f"flow_t must be one of {FLOW_T}, got {kind!r}")


def flow_matching_loss(net, x0: Tensor, t: Tensor, cond=None, noise: Tensor | None = None) -> Tensor:
    """The rectified-flow loss ||v_pred - (eps - x0)||^2 (mean over elements) of an EDM-form denoiser D.

    With x = x0 + sigma eps, sigma = t / (1 - t): x_t = x / (1 + sigma) = (1 - t) x0 + t eps, and the velocity
    read off D is v = (x_t - D(x; sigma)) / t (D = x_t - t v, ``teachers.flow_matching``), the target
    eps - x0 = (x_t - x0) / t. So v - (eps - x0) = (x0 - D) / t and the loss is
    ((1 + sigma) / sigma)^2 ||D(x; sigma) - x0||^2, i.e. 1 / t^2 times the x0-MSE."""
    eps = torch.randn_like(x0) if noise is None else noise
    sigma = (t / (1 - t)).to(x0.dtype)
    s = sigma.reshape(-1, *[1] * (x0.ndim - 1))
    err = (net(x0 + s * eps, sigma, cond).float() - x0).square()
    return (err * ((1 + s) / s) ** 2).mean()


def drop_labels(cond, p: float, null=None):
    """Classifier-free guidance training (Ho & Salimans 2022): each condition becomes the null one with
    probability p: the all-zero one-hot label, or for text ``null(cond)`` (the network's null condition,
    e.g. Stable Diffusion's empty prompt). The only place fdistill drops conditions: networks never do."""
    if cond is None or p == 0:
        return cond
    keep = torch.rand(len(cond), 1, device=cond.embeds.device if isinstance(cond, TextCondition) else cond.device) >= p
    if not isinstance(cond, TextCondition):
        return cond * keep.to(cond.dtype)
    nothing = null(cond).tensors()
    return TextCondition(**{k: torch.where(keep.reshape(-1, *[1] * (v.ndim - 1)), v, nothing[k])
                            for k, v in cond.tensors().items()})


class TeacherTrainer:
    """A denoiser trained by the EDM loss with Adam, linear warm-up and an EMA (the teacher is the EMA).
    ``real_data(n) -> (x in [-1, 1], one-hot labels or None)``."""

    def __init__(self, cfg: TeacherConfig, net: nn.Module, real_data: Callable[[int], tuple[Tensor, Tensor | None]],
                 device: str | torch.device = "cpu") -> None:
        if cfg.noise not in NOISE:
            raise ValueError(f"teacher.noise must be one of {NOISE}, got {cfg.noise!r}")
        self.cfg, self.real_data, self.device = cfg, real_data, torch.device(device)
        self.net = net.to(self.device).train()
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                    fused=self.device.type in ("cpu", "cuda") or None)  # as the Distiller's
        self.sigma_data = float(net.sigma_data)  # VP/VE preconditionings: EDM's 0.5 (core.protocols)
        self.iteration, self.rank = 0, 0
        self.info: dict = {}

    def step(self) -> dict:
        cfg = self.cfg
        x, cond = self.real_data(cfg.batch_size)
        x = x.to(self.device)
        cond = drop_labels(None if cond is None else cond.to(self.device), cfg.label_dropout,
                           self.net.null_condition)
        if cfg.noise == "edm":
            loss = edm_loss(self.net, x, cond, cfg.P_mean, cfg.P_std, self.sigma_data)
        elif cfg.noise == "flow":
            loss = flow_matching_loss(self.net, x, flow_times(len(x), cfg.flow_t, cfg.t_min, cfg.t_max, x.device), cond)
        else:  # DDPM's training: t uniform over the schedule; eps-MSE for an eps-prediction UNet (weight ~ 1/sigma^2)
            grid = self.net.log_sigmas.exp()
            sigma = grid[torch.randint(len(grid), (len(x),), device=grid.device)].to(x)
            loss = denoising_loss(self.net, x, sigma, cond, self.sigma_data)
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
