"""Image pipeline: train an EDM teacher, distill it with Algorithm 1, sample, evaluate.

The trainer and objective are the same as the 2-D lab's; what is new here is the networks (EDM
UNets, ``networks.edm``), the discriminator heads on the teacher's encoder features (App. B), the
data (``data``) and the metrics. ``configs/digits.yaml`` is the CPU-sized preset.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from fdistill.config import apply_overrides, from_dict, load_yaml
from fdistill.data import ImageDataset, ImageSampler, load_dataset
from fdistill.diffusion import edm_loss, edm_sampler
from fdistill.networks.heads import Discriminator
from fdistill.teachers import GuidedDenoiser
from fdistill.trainer import DistillConfig, Distiller

PRECONDS = ("EDMPrecond", "VPPrecond", "VEPrecond")


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


@dataclass
class ImageConfig:
    data: str = "digits"  # see fdistill.data.load_dataset
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    disc_resolutions: list[int] = field(default_factory=lambda: [8, 4])  # App. B, Table 5
    disc_hidden: int = 64
    guidance: float = 1.0  # CFG scale of the distilled teacher (Table 5)
    sampler_steps: int = 18  # EDM Heun: 18 steps = 35 network evaluations


def load_config(path: str | Path, overrides: list[str] = ()) -> ImageConfig:
    return from_dict(ImageConfig, apply_overrides(load_yaml(path), list(overrides)), where=str(path))


# -- networks -----------------------------------------------------------------------------------
def build_network(precond: str, kwargs: dict) -> nn.Module:
    """A randomly initialised network: an EDM preconditioning class with its constructor kwargs, or
    "diffusers" with ``load_diffusers_teacher``'s kwargs (the UNet and scheduler configs)."""
    from fdistill.networks import edm

    if precond == "diffusers":
        from fdistill.diffusers_teacher import build_diffusers_network

        return build_diffusers_network(kwargs)
    if precond not in PRECONDS:
        raise ValueError(f"unknown preconditioning {precond!r}; expected one of {(*PRECONDS, 'diffusers')}")
    return getattr(edm, precond)(**kwargs)


def save_network(net: nn.Module, precond: str, kwargs: dict, path: str | Path) -> Path:
    """Weights as safetensors; the constructor (class and kwargs) in the file's metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"fdistill": json.dumps({"precond": precond, "kwargs": kwargs})}
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, path, metadata=meta)
    return path


def load_network(path: str | Path) -> tuple[nn.Module, str, dict]:
    """Load a teacher: a ``.safetensors`` written by ``save_network``, an NVlabs/edm ``.pkl``
    snapshot (``edm_pickle``) or a local diffusers folder with a DDPM ``UNet2DModel``
    (``diffusers_teacher``, precond "diffusers"). Returns (net in eval mode, precond, constructor kwargs)."""
    path = Path(path)
    if path.suffix == ".pkl":  # an NVlabs/edm snapshot, loaded without running any of its code
        from fdistill.edm_pickle import load_edm_pickle

        return load_edm_pickle(path)
    if path.is_dir():  # a diffusers pipeline or UNet folder
        from fdistill.diffusers_teacher import load_diffusers_teacher

        return load_diffusers_teacher(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher not found: {path} (a .safetensors from `fdistill train-teacher`, an "
                                "NVlabs/edm .pkl or a diffusers model folder)")
    with safe_open(str(path), "pt") as f:
        meta = (f.metadata() or {}).get("fdistill")
        if meta is None:
            raise ValueError(f"{path} has no fdistill metadata (constructor kwargs); was it written by fdistill?")
        spec = json.loads(meta)
        net = build_network(spec["precond"], spec["kwargs"])
        net.load_state_dict({k: f.get_tensor(k) for k in f.keys()}, strict=True)  # noqa: SIM118
    return net.eval(), spec["precond"], spec["kwargs"]


def network_kwargs(cfg: TeacherConfig, data: ImageDataset) -> dict:
    """The teacher's constructor kwargs: the preset's network plus the data's shape and classes."""
    kwargs = dict(cfg.network)
    kwargs.update(img_resolution=data.resolution, img_channels=data.channels, label_dim=data.label_dim)
    return kwargs


# -- teacher training ---------------------------------------------------------------------------
def train_teacher(cfg: ImageConfig, out_dir: str | Path, progress: bool = True) -> Path:
    """Train an EDM teacher on cfg.data; writes <out_dir>/teacher.safetensors (EMA weights)."""
    tc = cfg.teacher
    data = load_dataset(cfg.data)
    torch.manual_seed(tc.seed)
    kwargs = network_kwargs(tc, data)
    net = build_network(tc.precond, kwargs).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=tc.lr, betas=(0.9, 0.999), eps=1e-8)
    sampler = ImageSampler(data, seed=tc.seed)
    sigma_data = float(getattr(net, "sigma_data", 0.5))
    bar = tqdm(range(tc.iterations), desc="teacher (EDM loss)", disable=not progress)
    for it in bar:
        x, labels = sampler(tc.batch_size)
        if labels is not None and tc.label_dropout > 0:
            keep = (torch.rand(labels.shape[0], 1) >= tc.label_dropout).to(labels.dtype)
            labels = labels * keep
        loss = edm_loss(net, x, labels, tc.P_mean, tc.P_std, sigma_data)
        for g in opt.param_groups:
            g["lr"] = tc.lr * min(1.0, (it + 1) / max(tc.warmup, 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - tc.ema_beta)
        if it % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return save_network(ema, tc.precond, kwargs, Path(out_dir) / "teacher.safetensors")


# -- distillation -------------------------------------------------------------------------------
def make_distiller(cfg: ImageConfig, teacher_path: str | Path, data: ImageDataset | None = None,
                   device: str | torch.device = "cpu") -> Distiller:
    """Alg. 1 for images: generator and fake score are copies of the teacher (generator evaluated once
    at sigma_max on sigma_max z); the discriminator is conv heads on the teacher's encoder features."""
    data = data if data is not None else load_dataset(cfg.data)
    net, precond, kwargs = load_network(teacher_path)
    if (kwargs["img_resolution"], kwargs["img_channels"]) != (data.resolution, data.channels):
        raise ValueError(f"teacher {teacher_path} is for {kwargs['img_channels']}x{kwargs['img_resolution']}^2 "
                         f"images but {cfg.data} has {data.channels}x{data.resolution}^2")
    data = match_labels(data, kwargs.get("label_dim", 0), teacher_path)
    torch.manual_seed(cfg.distill.seed)
    missing = sorted(set(cfg.disc_resolutions) - set(net.encoder_resolutions))
    if missing:
        raise ValueError(f"disc_resolutions {missing} are not encoder resolutions of the teacher "
                         f"({net.encoder_resolutions})")
    net.feature_resolutions = list(cfg.disc_resolutions)
    channels = net.feature_channels()
    generator = copy.deepcopy(net).train().requires_grad_(True)
    fake_score = copy.deepcopy(net).train().requires_grad_(True)
    teacher = GuidedDenoiser(net, cfg.guidance) if cfg.guidance != 1.0 else net
    disc = Discriminator.conv({r: channels[r] for r in cfg.disc_resolutions}, cfg.disc_hidden)
    sampler = ImageSampler(data, seed=cfg.distill.seed)
    d = Distiller(cfg.distill, teacher, generator, fake_score, disc, real_data=sampler,
                  sample_shape=(data.channels, data.resolution, data.resolution), sample_cond=sampler.sample_labels,
                  device=device)
    d.info = {"precond": precond, "network": kwargs, "data": cfg.data}
    return d


def match_labels(data: ImageDataset, label_dim: int, teacher: str | Path) -> ImageDataset:
    """The data's labels as the teacher's classes: dropped for an unconditional teacher; one-hot over
    all ``label_dim`` classes for a conditional one (a dataset may hold fewer, e.g. a subset)."""
    if label_dim == 0:
        return dataclasses.replace(data, labels=None, label_dim=0)
    if data.labels is None:
        raise ValueError(f"teacher {teacher} is class-conditional ({label_dim} classes) but {data.source} has no "
                         "labels: give a labelled dataset (EDM zip with dataset.json, CIFAR-10 batches, ...)")
    if data.label_dim > label_dim:
        raise ValueError(f"{data.source} has labels up to {data.label_dim - 1}; teacher {teacher} knows "
                         f"{label_dim} classes")
    return dataclasses.replace(data, label_dim=label_dim)


def load_generator(checkpoint_dir: str | Path, ema: bool = True) -> tuple[nn.Module, float, dict]:
    """The one-step generator of a distillation checkpoint: (network, sigma_gen, info)."""
    from fdistill import checkpoint

    path = Path(checkpoint_dir)
    meta = json.loads((path / "state.json").read_text())["meta"] if (path / "state.json").is_file() else None
    if meta is None:
        raise FileNotFoundError(f"{path} is not a distillation checkpoint (no state.json)")
    info, cfg = meta["info"], from_dict(DistillConfig, meta["config"])
    net = build_network(info["precond"], info["network"])
    net.load_state_dict(checkpoint.load_weights(path, "generator_ema" if ema else "generator"))
    return net.eval().requires_grad_(False), cfg.generator_sigma or cfg.sigmas.sigma_max, info


def class_labels(n: int, label_dim: int) -> Tensor | None:
    """One-hot labels cycling through the classes (None for unconditional models)."""
    return torch.eye(label_dim)[torch.arange(n) % label_dim] if label_dim else None


@torch.no_grad()
def generate(
    net: nn.Module, n: int, shape: tuple[int, int, int], label_dim: int, sigma_gen: float | None = None,
    steps: int = 18, guidance: float = 1.0, batch_size: int = 256, seed: int = 0,
    device: str | torch.device = "cpu", progress: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """n samples in [-1, 1] (on the CPU) and their one-hot labels (classes in turn). With ``sigma_gen``: the
    one-step generator G(z) = D(sigma_gen z; sigma_gen); without: EDM's Heun sampler (2 steps - 1
    evaluations). The latents come from a CPU generator, so a seed gives the same samples on any device."""
    gen = torch.Generator().manual_seed(seed)
    labels = class_labels(n, label_dim)
    net = net.to(device)
    teacher = GuidedDenoiser(net, guidance) if guidance != 1.0 else net
    out = []
    for i in tqdm(range(0, n, batch_size), desc="sampling", disable=not progress, leave=False):
        m = min(batch_size, n - i)
        z = torch.randn(m, *shape, generator=gen).to(device)
        cond = None if labels is None else labels[i : i + m].to(device)
        if sigma_gen is not None:
            x = net(z * sigma_gen, torch.full((m,), sigma_gen, device=device), cond)
        else:
            x = edm_sampler(teacher, z, cond, num_steps=steps)
        out.append(x.cpu())
    return torch.cat(out).clamp(-1, 1), labels
