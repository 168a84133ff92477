"""The image pipeline: train an EDM teacher, distill it with Algorithm 1, sample.

The trainer and objective are the 2-D lab's; what is new here is the networks (EDM UNets,
``networks.edm``, or any teacher ``teachers.loading`` reads), the discriminator heads on the teacher's
encoder features (App. B) and the data (``data``). ``configs/digits.yaml`` is the CPU-sized preset.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fdistill import config
from fdistill.config import from_dict
from fdistill.core.diffusion import edm_sampler, one_step, seeded_noise
from fdistill.data.conditions import TextConfig
from fdistill.data.datasets import ImageDataset, load_dataset, to_uint8
from fdistill.data.sampler import ImageSampler
from fdistill.data.writers import save_image_grid
from fdistill.io import atomic_path
from fdistill.networks.heads import Discriminator
from fdistill.networks.taps import resolve_taps
from fdistill.teachers.guidance import GuidedDenoiser
from fdistill.teachers.loading import TEACHER_FILE, build_network, is_pipeline_folder, load_network, save_network
from fdistill.training import checkpoint
from fdistill.training.distiller import DistillConfig, Distiller
from fdistill.training.loop import training_loop
from fdistill.training.teacher import TeacherConfig, TeacherTrainer


@dataclass
class ImageConfig:
    data: str = "digits"  # see fdistill.data.load_dataset
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    disc_resolutions: list[int | str] = field(default_factory=lambda: [8, 4])  # App. B, Table 5; "mid": bottleneck
    disc_hidden: int = 64  # width of the "fdistill" head
    disc_head: str = "fdistill"  # or "fastgen": NVlabs/FastGen's head, the feature width kept (networks.heads)
    guidance: float = 1.0  # CFG scale of the distilled teacher (Table 5)
    sampler_steps: int = 18  # EDM Heun: 18 steps = 35 network evaluations
    text: TextConfig = field(default_factory=TextConfig)  # text-to-image (a Stable Diffusion teacher)
    student_dropout: float | None = 0.0  # dropout of generator and fake score; None keeps the teacher's (FastGen: 0)

    def __post_init__(self) -> None:
        from fdistill import checks

        key = "disc_hidden"
        try:  # top-level keys: a ConfigError naming the key, so that the override holding it is named too
            checks.integer(key, self.disc_hidden, 1)
            key = "guidance"
            checks.number(key, self.guidance, 0)
        except ValueError as e:
            raise config.ConfigError(key, str(e)) from None


def load_config(path: str | Path, overrides: list[str] = ()) -> ImageConfig:
    """The image pipeline's config: a preset name, a YAML file or a run folder, then ``key=value`` overrides."""
    return config.load(ImageConfig, path, overrides)


# -- teacher training ---------------------------------------------------------------------------
def network_kwargs(cfg: TeacherConfig, data: ImageDataset) -> dict:
    """The teacher's constructor kwargs: the preset's network plus the data's shape and classes."""
    kwargs = dict(cfg.network)
    kwargs.update(img_resolution=data.resolution, img_channels=data.channels, label_dim=data.label_dim)
    return kwargs


def train_teacher(cfg: ImageConfig, out_dir: str | Path, progress: bool = True,
                  device: str | torch.device = "cpu", resume: Path | None = None,
                  started: Callable[[TeacherTrainer], None] | None = None) -> Path:
    """Train an EDM teacher on cfg.data in run folder ``out_dir`` (log.jsonl, checkpoints/, continuing
    from checkpoint ``resume`` if given); writes <out_dir>/teacher.safetensors (the EMA weights) and a
    grid of its samples, <out_dir>/samples.png. ``started(trainer)`` is called once the data is open and the
    trainer built, before the first step (the CLI writes config.yaml there: ``fdistill.training.run.Start``)."""
    tc = cfg.teacher
    data = load_dataset(cfg.data)
    check_batch(data, tc.batch_size)
    torch.manual_seed(tc.seed)
    kwargs = network_kwargs(tc, data)
    trainer = TeacherTrainer(tc, build_network(tc.precond, kwargs), ImageSampler(data, seed=tc.seed), device)
    if resume is not None:
        trainer.load(resume)
    if started is not None:
        started(trainer)
    training_loop(trainer, run_dir=out_dir, progress=progress, desc="teacher (EDM loss)")
    path = save_network(trainer.ema, tc.precond, kwargs, Path(out_dir) / TEACHER_FILE)
    shape = (data.channels, data.resolution, data.resolution)
    n = 10 * data.label_dim if 0 < data.label_dim <= 10 else 100
    x, _ = generate(trainer.ema, n, shape, data.label_dim, steps=cfg.sampler_steps, device=device)
    write_grid(x, data.label_dim, Path(out_dir) / "samples.png")
    return path


def check_batch(data: ImageDataset, batch_size: int) -> None:
    if len(data) < batch_size:
        raise ValueError(f"{data.source} holds {len(data)} images, fewer than the batch of {batch_size}: every batch "
                         "would repeat images; give more data or a smaller batch_size")


# -- distillation -------------------------------------------------------------------------------
def make_distiller(cfg: ImageConfig, teacher_path: str | Path, data: ImageDataset | None = None,
                   device: str | torch.device = "cpu") -> Distiller:
    """Alg. 1 for images: generator and fake score are copies of the teacher (generator evaluated once
    at sigma_max on sigma_max z); the discriminator is conv heads on the teacher's encoder features.
    A Stable Diffusion (XL) folder as the teacher is text-to-image (``t2i.make_distiller``)."""
    if is_pipeline_folder(teacher_path):
        from fdistill.apps import t2i

        return t2i.make_distiller(cfg, teacher_path, device)
    data = data if data is not None else load_dataset(cfg.data)
    check_batch(data, cfg.distill.batch_size)
    net, precond, kwargs = load_network(teacher_path)
    if (kwargs["img_resolution"], kwargs["img_channels"]) != (data.resolution, data.channels):
        r = kwargs["img_resolution"]
        raise ValueError(f"teacher {teacher_path} is for {kwargs['img_channels']}x{r}x{r} images but {cfg.data} has "
                         f"{data.channels}x{data.resolution}x{data.resolution} (channels x height x width)")
    data = match_labels(data, kwargs.get("label_dim", 0), teacher_path)
    torch.manual_seed(cfg.distill.seed)
    taps = resolve_taps(cfg.disc_resolutions, net.encoder_resolutions, f"teacher {teacher_path}")
    net.feature_resolutions = taps
    channels = net.feature_channels()
    generator = copy.deepcopy(net).train().requires_grad_(True)
    fake_score = copy.deepcopy(net).train().requires_grad_(True)
    if cfg.student_dropout is not None:
        for m in (generator, fake_score):
            set_dropout(m, cfg.student_dropout)
    teacher = GuidedDenoiser(net, cfg.guidance) if cfg.guidance != 1.0 else net
    disc = Discriminator.conv({r: channels[r] for r in taps}, cfg.disc_hidden, cfg.disc_head)
    sampler = ImageSampler(data, seed=cfg.distill.seed)
    d = Distiller(cfg.distill, teacher, generator, fake_score, disc, real_data=sampler,
                  sample_shape=(data.channels, data.resolution, data.resolution), sample_cond=sampler.sample_labels,
                  device=device)
    d.info = {"precond": precond, "network": kwargs, "data": cfg.data}
    return d


def set_dropout(net: nn.Module, p: float) -> None:
    """Every dropout of a network to probability p: EDM's UNet blocks hold it as a number, torch's as
    ``nn.Dropout`` modules. The students train without dropout by default, as NVlabs/FastGen's networks:
    dropout in the fake score's estimate of s_fake would only add noise to Eq. (4)."""
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif isinstance(vars(m).get("dropout"), float):  # not getattr: diffusers' config attributes warn
            m.dropout = p


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
    meta = checkpoint.read_meta(checkpoint_dir)
    info = meta["info"]
    if "precond" not in info:
        raise ValueError(f"checkpoint {checkpoint_dir} holds no one-step generator (its meta.info names no network): "
                         "is it a train-teacher run's? Give a distill run folder or one of its checkpoints")
    try:
        cfg = from_dict(DistillConfig, meta["config"])
    except ValueError as e:
        raise ValueError(f"checkpoint {checkpoint_dir}: its state.json's config is not a distill config ({e})") \
            from None
    net = build_network(info["precond"], info["network"])
    weights = checkpoint.load_weights(checkpoint_dir, "generator_ema" if ema else "generator", "generator")
    try:
        net.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {checkpoint_dir}: its generator weights do not fit the network its meta.info "
                         f"describes ({' '.join(str(e).split())[:300]})") from None
    return net.eval().requires_grad_(False), cfg.generator_sigma or cfg.sigmas.largest, info


def sample_maker(net: nn.Module, shape: tuple[int, int, int], label_dim: int, sigma_gen: float | None = None,
                 steps: int = 18, guidance: float = 1.0, device: str | torch.device = "cpu"):
    """``make(classes, seeds) -> images in [-1, 1]`` (on the CPU): sample i from z = ``seeded_noise`` of seed i
    and class ``classes[i]`` (ignored by an unconditional net). With ``sigma_gen``: the one-step generator
    G(z) = D(sigma_gen z; sigma_gen); without: EDM's Heun sampler (2 steps - 1 evaluations)."""
    net = net.to(device)
    teacher = GuidedDenoiser(net, guidance) if guidance != 1.0 else net

    @torch.no_grad()
    def make(classes: list[int], seeds: list[int]) -> Tensor:
        z = seeded_noise(shape, seeds, device)
        cond = one_hot(classes, label_dim, device)
        x = one_step(net, z, sigma_gen, cond) if sigma_gen is not None else \
            edm_sampler(teacher, z, cond, num_steps=steps)
        return x.clamp(-1, 1).cpu()
    return make


def one_hot(classes: list[int], label_dim: int, device: str | torch.device = "cpu") -> Tensor | None:
    """The one-hot labels of ``classes`` (None for an unconditional model, label_dim 0); a class outside
    [0, label_dim) is refused (a negative index would silently pick a class from the end)."""
    if not label_dim:
        return None
    import numbers

    bad = [c for c in classes if not (isinstance(c, numbers.Integral) and not isinstance(c, bool)
                                      and 0 <= c < label_dim)]
    if bad:
        raise ValueError(f"class labels must be integers in [0, {label_dim - 1}] (the model's {label_dim} classes), "
                         f"got {bad[0]!r:.40}")
    return torch.eye(label_dim, device=device)[list(classes)]


def sample_classes(n: int, label_dim: int) -> list[int]:
    """The classes in turn (all 0 for an unconditional model): sample i is of class i mod label_dim."""
    return [i % label_dim if label_dim else 0 for i in range(n)]


def generate(
    net: nn.Module, n: int, shape: tuple[int, int, int], label_dim: int, sigma_gen: float | None = None,
    steps: int = 18, guidance: float = 1.0, batch_size: int = 256, seed: int = 0,
    device: str | torch.device = "cpu", progress: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """n samples in [-1, 1] (on the CPU) of ``sample_maker``, sample i from seed ``seed + i`` and class
    i mod label_dim, and their one-hot labels. The same samples on any device and for any batch size."""
    make = sample_maker(net, shape, label_dim, sigma_gen, steps, guidance, device)
    classes = sample_classes(n, label_dim)
    out = [make(classes[i:i + batch_size], list(range(seed + i, seed + min(i + batch_size, n))))
           for i in tqdm(range(0, n, batch_size), desc="sampling", disable=not progress, leave=False)]
    return torch.cat(out), one_hot(classes, label_dim)


def write_grid(x: Tensor, label_dim: int, path: Path, size: int = 100) -> Path:
    """A PNG grid of the first ``size`` samples; for a class-conditional model with at most 10 classes
    (samples in class order, as ``generate`` makes them) each column is one class, labelled."""
    columns = label_dim if 0 < label_dim <= 10 else 10
    labels = [str(c) for c in range(columns)] if 0 < label_dim <= 10 else None
    return save_image_grid(x[:size], path, nrow=columns, scale=max(1, 64 // x.shape[-1]), column_labels=labels)


def write_samples(out_dir: str | Path, x: Tensor, labels: Tensor | None, grid_size: int = 100) -> tuple[Path, Path]:
    """``out_dir/samples.npz`` (``images``: uint8 NCHW, ``labels``: class indices) and ``out_dir/grid.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = {"images": to_uint8(x)}
    if labels is not None:
        arrays["labels"] = labels.argmax(1).numpy()
    with atomic_path(out_dir / "samples.npz") as tmp, open(tmp, "xb") as f:  # never through a planted link
        np.savez(f, **arrays)
    label_dim = 0 if labels is None else labels.shape[1]
    return out_dir / "samples.npz", write_grid(x, label_dim, out_dir / "grid.png", grid_size)
