"""The image workflow's configuration (``ImageConfig``, the presets' schema for every teacher family), EDM
teacher training, and class-conditional sampling and its files. Distillation itself is family-agnostic:
``apps.distill`` (``make_distiller``, ``load_generator``, ``sample_maker``). ``configs/digits.yaml`` is the
CPU-sized preset."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fdistill import config
from fdistill.apps.distill import sample_maker
from fdistill.data.conditions import TextConfig
from fdistill.data.datasets import ImageDataset, load_dataset, to_uint8
from fdistill.data.sampler import ImageSampler
from fdistill.data.writers import save_image_grid
from fdistill.io import atomic_path
from fdistill.teachers.base import Teacher, one_hot
from fdistill.teachers.families.image import check_batch
from fdistill.teachers.loading import TEACHER_FILE, build_network, save_network
from fdistill.training.distiller import DistillConfig
from fdistill.training.loop import training_loop
from fdistill.training.teacher_training import TeacherConfig, TeacherTrainer


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
    text: TextConfig = field(default_factory=TextConfig)  # text-to-image (a pipeline teacher)
    teacher_options: dict[str, Any] = field(default_factory=dict)  # the teacher family's own (its Options)
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


# keys moved since they were written: old key -> (new key, its old default)
RENAMED = {"text.max_sequence_length": ("teacher_options.max_sequence_length", None),
           "text.flux_guidance": ("teacher_options.guidance", 3.5),
           "text.tap_block": ("teacher_options.tap_block", None)}


def load_config(path: str | Path, overrides: list[str] = ()) -> ImageConfig:
    """The image pipeline's config: a preset name, a YAML file or a run folder, then ``key=value`` overrides."""
    return config.load(ImageConfig, path, overrides, renamed=RENAMED)


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


# -- distillation -------------------------------------------------------------------------------
def sample_classes(n: int, label_dim: int) -> list[int]:
    """The classes in turn (all 0 for an unconditional model): sample i is of class i mod label_dim."""
    return [i % label_dim if label_dim else 0 for i in range(n)]


def generate(
    net: nn.Module, n: int, shape: tuple[int, int, int], label_dim: int, student=None,
    steps: int = 18, guidance: float = 1.0, batch_size: int = 256, seed: int = 0,
    device: str | torch.device = "cpu", progress: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """n samples in [-1, 1] (on the CPU) of a class-conditional (or unconditional) pixel network, by
    ``apps.distill.sample_maker``: sample i from seed ``seed + i`` and class i mod label_dim, and their one-hot
    labels. ``student``: the net's StudentSteps (or one sigma_gen); None: the teacher's Heun sampler in ``steps``.
    The same samples on any device and for any batch size."""
    make = sample_maker(net, Teacher(net, shape, {}, "", label_dim=label_dim), student, steps, guidance, device)
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
