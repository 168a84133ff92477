"""Which family a teacher belongs to, decided once: from its path when it is opened, from a checkpoint's
record when a run is reloaded. A new family adds its adapter module and one line to each function here."""

from __future__ import annotations

from pathlib import Path

from fdistill.teachers.base import Teacher
from fdistill.teachers.image_teacher import ImageTeacher
from fdistill.teachers.loading import is_flow_pipeline_folder, is_pipeline_folder


def open_teacher(path: str | Path, resolution: int | None = None, text=None) -> Teacher:
    """The teacher at ``path``: a Stable Diffusion (XL) pipeline folder or an SD3 / FLUX.1 one (flow matching),
    at ``resolution`` pixels (default the pipeline's), or an image denoiser (``teachers.loading.load_network``: a
    fdistill teacher file or run folder, an NVlabs/edm .pkl, a diffusers UNet folder). Text-to-image code is
    imported only for a pipeline. ``text`` (the run's ``TextConfig``) sets a flow teacher's T5 length, FLUX.1-dev
    guidance and discriminator tap; the other families ignore it."""
    if is_flow_pipeline_folder(path):
        from fdistill.teachers.flow_matching import FlowMatchingTeacher

        return FlowMatchingTeacher.open(path, resolution, text)
    if is_pipeline_folder(path):
        from fdistill.teachers.stable_diffusion import StableDiffusionTeacher

        return StableDiffusionTeacher.open(path, resolution)
    return ImageTeacher.open(path)


def teacher_from_info(info: dict, where: str = "the checkpoint") -> Teacher:
    """The teacher a checkpoint's ``info`` records (its ``precond`` names the family)."""
    if info.get("precond") == "flow_matching":
        from fdistill.teachers.flow_matching import FlowMatchingTeacher

        return FlowMatchingTeacher.from_info(info, where)
    if info.get("precond") == "stable_diffusion":
        from fdistill.teachers.stable_diffusion import StableDiffusionTeacher

        return StableDiffusionTeacher.from_info(info, where)
    return ImageTeacher.from_info(info, where)
