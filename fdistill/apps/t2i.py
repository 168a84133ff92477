"""Text-to-image and text-to-video results and data: images or clips for prompts (a one-step student or its guided
teacher), their PNG / MP4 files, and latent shards encoded once (``fdistill prepare-latents``: captioned images, or
captioned clips for a text-to-video teacher such as Wan). Distillation is ``apps.distill``'s, with the family's
Teacher (e.g. ``teachers.families.stable_diffusion``): the teacher guided at a fixed scale (Table 5: SD1.5 1.75 or
5, SDXL 8), the students unguided, heads on the mid block (App. B).
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
from fdistill.teachers.open import family_of, open_teacher, teacher_from_info
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


STRIP_FRAMES = 9  # the most frames a clip's PNG strip shows (every k-th, k = strip_every): 0, 10, ..., 80 of 81


def strip_every(frames: int) -> int:
    """k such that frames 0, k, 2k, ... of a clip of ``frames`` frames are at most STRIP_FRAMES (and, for 8n + 1
    frames such as Wan's 81, end at the last frame)."""
    return max(1, -(-(frames - 1) // (STRIP_FRAMES - 1)))


def write_videos(clips: Tensor, prompts: list[str], out: str | Path, seed: int, fps: int) -> tuple[list[Path], int]:
    """``out/000000.mp4`` ... (clips [N, 3, F, H, W] in [-1, 1], at ``fps``; ``data.video.write_mp4``), each clip's
    PNG strip ``out/000000.png`` of frames 0, k, 2k, ... (k = ``strip_every``), and ``out/prompts.txt`` (index,
    seed, prompt per line); returns (the MP4 paths, k)."""
    from fdistill.data.video import save_frame_strip, write_mp4

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    every = strip_every(clips.shape[2])
    paths = []
    for i, clip in enumerate(clips):
        paths.append(write_mp4(out / f"{i:06d}.mp4", clip, fps=fps, layout="CFHW"))
        save_frame_strip(clip, out / f"{i:06d}.png", every=every, layout="CFHW", label_frames=True)
    write_text(out / "prompts.txt", "".join(f"{i:06d}\t{seed + i}\t{p}\n" for i, p in enumerate(prompts)))
    return paths, every


def prepare_latents_as_configured(cfg, teacher_folder: str | Path, source: str | Path, out: str | Path,
                                 resolution: int | None = None, batch_size: int = 16, shard_size: int = 1024,
                                 device: str = "auto", on_error: str = "skip", progress: bool = True,
                                 fps: float | None = None) -> str:
    """``fdistill prepare-latents``: ``prepare_latents`` with the teacher settings of ``cfg`` (an ImageConfig: its
    ``teacher_options``, and its ``text.resolution`` unless ``resolution`` is given); returns the line saying
    what was written and how to train from it (with the same teacher options; a video family's preset too)."""
    from fdistill.device import pick_device

    resolution = cfg.text.resolution if resolution is None else resolution
    out = prepare_latents(teacher_folder, source, out, resolution, batch_size, shard_size, pick_device(device),
                          on_error, progress=progress, options=cfg.teacher_options, fps=fps)
    same = "".join(f" teacher_options.{k}={v if isinstance(v, str) else json.dumps(v)}"
                   for k, v in cfg.teacher_options.items())
    family = family_of(teacher_folder)
    preset = f" --config {family.preset}" if family.video_fps and family.preset else ""
    return f"wrote {out}; train from it with `fdistill distill{preset} --teacher {teacher_folder} data={out}{same} ...`"


def open_clips(teacher: Teacher, source: str | Path, on_error: str = "skip", fps: float | None = None):
    """The captioned clips of ``source`` (``data.video.open_videos``) as a text-to-video ``teacher`` takes them:
    ``teacher_options.num_frames`` frames at ``fps`` (default the family's, Wan's 16), resized and center-cropped
    to its height x width."""
    from fdistill.data.video import open_videos

    n = teacher.info["network"]
    return open_videos(source, frames=n["num_frames"], fps=teacher.video_fps if fps is None else fps,
                       size=(n["height"], n["width"]), on_error=on_error.replace("error", "raise"))


def prepare_latents(teacher_folder: str | Path, source: str | Path, out: str | Path, resolution: int | None = None,
                    batch_size: int = 16, shard_size: int = 1024, device: str | torch.device = "cpu",
                    on_error: str = "skip", progress: bool = True, options: dict | None = None,
                    fps: float | None = None) -> Path:
    """Encode a captioned dataset once into latent shards (VAE latents and text embeddings), resumable: samples
    already in ``out``'s index are skipped. Training reads the folder as its data (SDXL recipes do). Any
    text-to-image teacher folder encodes with its own VAE and text encoders; ``options`` (a run's
    ``teacher_options``) sets e.g. a flow teacher's text length, which training must then use too. A text-to-video
    teacher (Wan) encodes captioned clips (``open_clips``: its frame count and size, at ``fps``) into latents
    [C, F', H', W']; a bad clip is skipped with one warning line (``on_error`` "skip") or stops the run."""
    device = torch.device(device)
    teacher = open_teacher(teacher_folder, resolution, options)
    if not teacher.text_to_image:
        raise ValueError(f"prepare-latents needs a text-to-image pipeline folder (Stable Diffusion v1.5 / XL, SD3, "
                         f"FLUX.1, SANA, Qwen-Image) or a text-to-video one (Wan2.1 / 2.2), but {teacher_folder} is "
                         "an image denoiser")
    if fps is not None and not teacher.video:
        raise ValueError(f"--fps {fps:g} sets the frame rate clips are sampled at, for a text-to-video teacher; "
                         f"{teacher_folder} is a text-to-image pipeline (its data are images)")
    codec, encoder = teacher.codec.to(device), teacher.text.to(device)  # the denoiser stays where it was loaded
    if teacher.video:
        data = open_clips(teacher, source, on_error, fps)
    else:
        data = open_captions(source, resolution=teacher.info["network"]["resolution"],
                             on_error=on_error.replace("error", "raise"))
    writer = LatentShardWriter(out, shard_size=shard_size, source=str(source))
    bar = tqdm(total=len(data), initial=writer.written, desc="prepare-latents", disable=not progress)
    batch = []

    def encode() -> None:
        pixels = torch.stack([b[0] for b in batch]) if teacher.video else to_float(np.stack([b[0] for b in batch]))
        latents = codec.encode(pixels.to(device)).cpu()
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
