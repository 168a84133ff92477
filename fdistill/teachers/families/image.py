"""The image family: EDM-style pixel denoisers (fdistill's own teachers, NVlabs/edm ``.pkl`` snapshots,
diffusers pixel UNets), class-conditional or not, trained against an image dataset (App. B). It is asked last
about a path and takes any: ``teachers.loading.load_network`` says in one line why a path is not a teacher."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from fdistill.data.datasets import ImageDataset, load_dataset
from fdistill.data.sampler import ImageSampler
from fdistill.teachers.base import Teacher, register
from fdistill.teachers.loading import build_network, load_network


def check_batch(data: ImageDataset, batch_size: int) -> None:
    if len(data) < batch_size:
        raise ValueError(f"{data.source} holds {len(data)} images, fewer than the batch of {batch_size}: every batch "
                         "would repeat images; give more data or a smaller batch_size")


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


def set_dropout(net: nn.Module, p: float) -> None:
    """Every dropout of a network to probability p: EDM's UNet blocks hold it as a number, torch's as
    ``nn.Dropout`` modules. The students train without dropout by default, as NVlabs/FastGen's networks:
    dropout in the fake score's estimate of s_fake would only add noise to Eq. (4)."""
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif isinstance(vars(m).get("dropout"), float):  # not getattr: diffusers' config attributes warn
            m.dropout = p


@register
class ImageTeacher(Teacher):
    """A pixel-space denoiser; ``info`` = {"family": "image", "precond": EDM preconditioning class or "diffusers",
    "network": its constructor kwargs} (``teachers.loading``)."""

    kind = "image"
    order = 100  # the catch-all

    @classmethod
    def recognises(cls, path: str | Path) -> bool:
        return True

    @classmethod
    def open(cls, path: str | Path, resolution: int | None = None, options: dict | None = None) -> ImageTeacher:
        """The denoiser at ``path``; its resolution is the network's own (``resolution`` is not used)."""
        cls.parse_options(options)
        net, precond, kwargs = load_network(path)
        return cls._make(net, precond, kwargs, str(path))

    @classmethod
    def from_info(cls, info: dict, where: str = "the checkpoint") -> ImageTeacher:
        """The architecture a checkpoint records, with fresh weights (sampling loads the generator's into it)."""
        return cls._make(build_network(info["precond"], info["network"]), info["precond"], info["network"], where)

    @classmethod
    def _make(cls, net: nn.Module, precond: str, kwargs: dict, source: str) -> ImageTeacher:
        r, c = kwargs["img_resolution"], kwargs["img_channels"]
        return cls(net.eval(), (c, r, r), {"family": cls.kind, "precond": precond, "network": kwargs}, source,
                   label_dim=kwargs.get("label_dim", 0))

    def open_data(self, cfg, device: torch.device, dataset: ImageDataset | None = None) -> ImageSampler:
        data = dataset if dataset is not None else load_dataset(cfg.data)
        check_batch(data, cfg.distill.batch_size)
        c, r, _ = self.sample_shape
        if (r, c) != (data.resolution, data.channels):
            raise ValueError(f"teacher {self.source} is for {c}x{r}x{r} images but {cfg.data} has "
                             f"{data.channels}x{data.resolution}x{data.resolution} (channels x height x width)")
        return ImageSampler(match_labels(data, self.label_dim, self.source), seed=cfg.distill.seed)

    def prepare_students(self, students: list[nn.Module], cfg) -> None:
        if cfg.student_dropout is not None:
            for m in students:
                set_dropout(m, cfg.student_dropout)
