"""Text-to-image results and data: images for prompts (a one-step student or its guided teacher), their PNG
files, and latent shards encoded once (``fdistill prepare-latents``). Distillation is ``apps.distill``'s, with
the Stable Diffusion family's Teacher (``teachers.families.stable_diffusion``): the teacher guided at a fixed scale
(Table 5: SD1.5 1.75 or 5, SDXL 8), the students unguided, heads on the mid block (App. B).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fdistill.apps.distill import load_generator, sample_maker
from fdistill.data.captions import open_captions
from fdistill.data.datasets import to_float, to_uint8
from fdistill.data.latent_shards import LatentShardWriter
from fdistill.data.writers import encode_png
from fdistill.io import write_bytes, write_text
from fdistill.teachers.base import Teacher
from fdistill.teachers.open import open_teacher, teacher_from_info
from fdistill.training import checkpoint


def generate(make, prompts: list[str], seed: int = 0, progress: bool = False, batch_size: int = 16) -> Tensor:
    """One image per prompt from ``make`` (``apps.distill.sample_maker``), in [-1, 1] (CPU), prompt i from seed
    ``seed + i``."""
    return torch.cat([make(prompts[i:i + batch_size], list(range(seed + i, seed + min(i + batch_size, len(prompts)))))
                      for i in tqdm(range(0, len(prompts), batch_size), desc="sampling", disable=not progress,
                                    leave=False)])


def generate_images(generator: nn.Module, student, teacher: Teacher, prompts: list[str], seed: int = 0,
                    progress: bool = False, batch_size: int = 16) -> Tensor:
    """``generate`` with the ``generator`` run as ``student`` (its levels, or one sigma): k network calls and one
    VAE decode per prompt."""
    return generate(sample_maker(generator, teacher, student, device=next(generator.parameters()).device), prompts,
                    seed, progress, batch_size)


def image_maker(run: str | Path, device, teacher_steps: int | None = None, guidance: float = 1.0):
    """``make(prompts, seeds) -> images in [-1, 1]`` for a text-to-image run: its (one- or few-step) student, or
    with ``teacher_steps`` its teacher sampled by EDM's Heun sampler (2 steps - 1 evaluations, each guided)."""
    if teacher_steps is None:
        generator, student, teacher = load_generator(run, device)
        return sample_maker(generator, teacher, student, device=device)
    teacher = teacher_from_info(checkpoint.read_meta(run)["info"], str(run)).to(device)
    return sample_maker(teacher.denoiser, teacher, None, teacher_steps, guidance, device)


def write_pngs(images: Tensor, prompts: list[str], out: str | Path, seed: int) -> list[Path]:
    """``out/000000.png`` ... and ``out/prompts.txt`` (index, seed, prompt per line)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(to_uint8(images)):
        paths.append(out / f"{i:06d}.png")
        write_bytes(paths[-1], encode_png(img))  # fdistill.io: a link planted at the name is replaced
    write_text(out / "prompts.txt", "".join(f"{i:06d}\t{seed + i}\t{p}\n" for i, p in enumerate(prompts)))
    return paths


def prepare_latents_as_configured(cfg, teacher_folder: str | Path, source: str | Path, out: str | Path,
                                 resolution: int | None = None, batch_size: int = 16, shard_size: int = 1024,
                                 device: str = "auto", on_error: str = "skip", progress: bool = True) -> str:
    """``fdistill prepare-latents``: ``prepare_latents`` with the teacher settings of ``cfg`` (an ImageConfig: its
    ``teacher_options``, and its ``text.resolution`` unless ``resolution`` is given); returns the line saying
    what was written and how to train from it (with the same teacher options)."""
    from fdistill.device import pick_device

    resolution = cfg.text.resolution if resolution is None else resolution
    out = prepare_latents(teacher_folder, source, out, resolution, batch_size, shard_size, pick_device(device),
                          on_error, progress=progress, options=cfg.teacher_options)
    same = "".join(f" teacher_options.{k}={v if isinstance(v, str) else json.dumps(v)}"
                   for k, v in cfg.teacher_options.items())
    return f"wrote {out}; train from it with `fdistill distill --teacher {teacher_folder} data={out}{same} ...`"


def prepare_latents(teacher_folder: str | Path, source: str | Path, out: str | Path, resolution: int | None = None,
                    batch_size: int = 16, shard_size: int = 1024, device: str | torch.device = "cpu",
                    on_error: str = "skip", progress: bool = True, options: dict | None = None) -> Path:
    """Encode a captioned dataset once into latent shards (VAE latents and text embeddings), resumable: samples
    already in ``out``'s index are skipped. Training reads the folder as its data (SDXL recipes do). Any
    text-to-image teacher folder encodes with its own VAE and text encoders; ``options`` (a run's
    ``teacher_options``) sets e.g. a flow teacher's text length, which training must then use too."""
    device = torch.device(device)
    teacher = open_teacher(teacher_folder, resolution, options)
    if not teacher.text_to_image:
        raise ValueError(f"prepare-latents needs a text-to-image pipeline folder (Stable Diffusion v1.5 / XL, SD3, "
                         f"FLUX.1, SANA, Qwen-Image), but {teacher_folder} is an image denoiser")
    codec, encoder = teacher.codec.to(device), teacher.text.to(device)  # the denoiser stays where it was loaded
    data = open_captions(source, resolution=teacher.info["network"]["resolution"],
                         on_error=on_error.replace("error", "raise"))
    writer = LatentShardWriter(out, shard_size=shard_size, source=str(source))
    bar = tqdm(total=len(data), initial=writer.written, desc="prepare-latents", disable=not progress)
    batch = []

    def encode() -> None:
        images = to_float(np.stack([b[0] for b in batch]))
        latents = codec.encode(images.to(device)).cpu()
        cond = encoder([b[1] for b in batch]).to("cpu")
        writer.add_batch([b[2] for b in batch], latents, cond.tensors(), [b[1] for b in batch])
        bar.update(len(batch))
        batch.clear()

    for sample in data:  # in order; a bad sample is skipped with a warning, or stops with on_error="raise"
        if not writer.done(sample[2]):
            batch.append(sample)
        if len(batch) == batch_size:
            encode()
    if batch:
        encode()
    writer.close()
    bar.close()
    return Path(out)
