"""Stable Diffusion v1.5 and SDXL teachers from local diffusers folders (Rombach et al. 2022; Podell et al.
2023): the latent UNet as a denoiser D(x, sigma, cond) with text conditioning, the frozen text encoders,
the VAE, and a distilled one-step generator written back as a standard diffusers pipeline.

The UNet (``UNet2DConditionModel``, epsilon or v prediction on the scaled_linear DDPM schedule) becomes an
EDM denoiser through the VP conversion of ``teachers.diffusers_unet``, in the VAE's latent space. Its
condition is a ``TextCondition``: CLIP token embeddings (SD1.5: the text encoder's last hidden state;
SDXL: both encoders' penultimate hidden states, concatenated) and for SDXL the pooled embedding and the
size/crop ``time_ids``. Classifier-free guidance uses each family's unconditional condition: the encoded
empty prompt for SD1.5, zeros for SDXL (its pipeline's ``force_zeros_for_empty_prompt``).

Everything is read from local folders with ``HF_HUB_OFFLINE=1``: a missing file is an error naming it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from fdistill.data.conditions import TextCondition
from fdistill.io import read_json_object, temp_name
from fdistill.teachers.base import Teacher
from fdistill.teachers.diffusers_unet import (
    INSTALL_HINT,
    VPUNetDenoiser,
    alphas_cumprod,
    check_scheduler_config,
    check_unet_config,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a stray hub call fails fast instead of hanging

FAMILIES = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl"}
COMPONENTS = {"sd15": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
              "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")}
LAYOUT = ("a diffusers StableDiffusionPipeline or StableDiffusionXLPipeline folder: model_index.json, unet/, vae/, "
          "text_encoder/, tokenizer/, scheduler/ (SDXL also text_encoder_2/, tokenizer_2/), as save_pretrained writes")


def _modules():
    try:
        import diffusers
        import transformers
    except ImportError as e:
        raise ImportError(f"Stable Diffusion teachers need diffusers and transformers: {INSTALL_HINT} "
                          f"(or 'fdistill[t2i]'); {e}") from None
    return diffusers, transformers


@contextlib.contextmanager
def _quiet():
    """diffusers and transformers without their info logs and progress bars while loading local files."""
    diffusers, transformers = _modules()
    levels = diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers.utils.logging.set_verbosity(levels[0])
        transformers.utils.logging.set_verbosity(levels[1])
        diffusers.utils.logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()


class LatentUNetDenoiser(VPUNetDenoiser):
    """A Stable Diffusion (XL) ``UNet2DConditionModel`` as a latent-space denoiser D(x, sigma, TextCondition).

    Discriminator features (App. B; FastGen and DMD2 read the mid block): at each encoder resolution the
    output of the last block there, the down blocks' last full-resolution layer and, at the lowest
    resolution, the mid block (SD1.5 at 512 px: 64, 32, 16 and 8 = the mid block's 1280 x 8 x 8; SDXL at
    1024 px: 128, 64 and 32 = the mid block's 1280 x 32 x 32).
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: Tensor, prediction_type: str = "epsilon",
                 family: str = "sd15", null_embeds: Tensor | None = None, sigma_data: float | None = None) -> None:
        super().__init__(unet, alphas_cumprod, prediction_type, sigma_data)
        if family not in COMPONENTS:
            raise ValueError(f"unknown Stable Diffusion family {family!r}; expected sd15 or sdxl")
        self.family = family
        self.label_dim = 0
        if null_embeds is not None:  # SD1.5's unconditional condition: the encoded empty prompt (1, 77, D)
            self.register_buffer("null_embeds", null_embeds.detach().float(), persistent=False)
        channels = list(unet.config["block_out_channels"])
        n = len(unet.down_blocks)
        self._taps = {self.img_resolution >> i: f"down_blocks.{i}" for i in range(n - 1)}
        self._tap_channels = {self.img_resolution >> i: int(channels[i]) for i in range(n - 1)}
        self._taps[self.img_resolution >> (n - 1)] = "mid_block"
        self._tap_channels[self.img_resolution >> (n - 1)] = int(channels[-1])
        self._init_taps()

    def prior_std(self, sigma: float) -> float:
        """The std of x = x0 + sigma eps at the top of the schedule, sqrt(1 + sigma^2) for unit-variance
        latents: the one-step generator's input is z times this, so the UNet sees pure N(0, I) noise at
        t = T, as a diffusers scheduler starts (DMD2's one-step input; FastGen feeds sigma z, 0.23% less)."""
        return (1 + sigma**2) ** 0.5

    def null_condition(self, cond: TextCondition) -> TextCondition:
        """The unconditional condition for classifier-free guidance: SD1.5's empty prompt, SDXL's zeros
        (same time ids)."""
        if self.family == "sdxl":
            return TextCondition(torch.zeros_like(cond.embeds), torch.zeros_like(cond.pooled), cond.time_ids)
        if not hasattr(self, "null_embeds"):
            raise ValueError("this SD1.5 denoiser has no empty-prompt embedding (load it with load_stable_diffusion)")
        return TextCondition(self.null_embeds.to(cond.embeds).expand_as(cond.embeds))

    def _call(self, x_t: Tensor, t: Tensor, cond: TextCondition) -> Tensor:
        if not isinstance(cond, TextCondition):
            raise ValueError(f"a Stable Diffusion UNet is conditioned on text (a TextCondition), got "
                             f"{type(cond).__name__}")
        dtype = next(self.unet.parameters()).dtype
        added = None
        if self.family == "sdxl":
            added = {"text_embeds": cond.pooled.to(dtype), "time_ids": cond.time_ids.to(dtype)}
        return self.unet(x_t.to(dtype), t, encoder_hidden_states=cond.embeds.to(dtype), added_cond_kwargs=added,
                         return_dict=False)[0]


class TextEncoder(nn.Module):
    """The frozen text encoder(s) of a Stable Diffusion family: prompts -> TextCondition (no attention mask,
    as the diffusers pipelines call SD1.5's and SDXL's CLIP encoders)."""

    def __init__(self, family: str, tokenizers: list, encoders: list[nn.Module], resolution: int) -> None:
        super().__init__()
        self.family, self.tokenizers, self.resolution = family, tokenizers, resolution
        self.encoders = nn.ModuleList(encoders).eval().requires_grad_(False)

    def _ids(self, tokenizer, prompts: list[str], device) -> Tensor:
        return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(device)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextCondition:
        device = next(self.encoders.parameters()).device
        if self.family == "sd15":
            return TextCondition(self.encoders[0](self._ids(self.tokenizers[0], prompts, device))[0].float())
        states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            out = encoder(self._ids(tokenizer, prompts, device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's projected text embedding
        r = self.resolution
        time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32, device=device).expand(len(prompts), 6)
        return TextCondition(torch.cat(states, dim=-1).float(), pooled.float(), time_ids)


class LatentCodec(nn.Module):
    """The frozen VAE: images in [-1, 1] <-> latents (z - shift_factor) * scaling_factor, decoded by
    z / scaling_factor + shift_factor, as the pipelines do (SD1.5 0.18215, SDXL 0.13025, no shift; SD3.5
    1.5305 / 0.0609, FLUX.1 0.3611 / 0.1159). ``default_scaling``: when the VAE's config names none. Encoding
    samples the posterior as FastGen does; the VAE always runs in fp32 (SDXL's needs it)."""

    def __init__(self, vae: nn.Module, default_scaling: float = 0.18215) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        scaling = vae.config.get("scaling_factor")
        self.scaling_factor = float(default_scaling if scaling is None else scaling)
        self.shift_factor = float(vae.config.get("shift_factor") or 0.0)
        self.downsample = 2 ** (len(vae.config["block_out_channels"]) - 1)
        self.channels = int(vae.config["latent_channels"])

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        with torch.autocast(images.device.type, enabled=False):
            z = self.vae.encode(images.float()).latent_dist.sample(generator)
            return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        with torch.autocast(latents.device.type, enabled=False):
            z = latents.float() / self.scaling_factor + self.shift_factor
            return self.vae.decode(z).sample.clamp(-1, 1)


class StableDiffusion(nn.Module):
    """A loaded Stable Diffusion (XL) folder: ``denoiser`` (LatentUNetDenoiser), ``text`` (TextEncoder),
    ``codec`` (LatentCodec); ``kwargs`` is the JSON that rebuilds the denoiser's architecture."""

    def __init__(self, denoiser: LatentUNetDenoiser, text: TextEncoder, codec: LatentCodec, kwargs: dict) -> None:
        super().__init__()
        self.denoiser, self.text, self.codec, self.kwargs = denoiser, text, codec, kwargs

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        r = self.kwargs["resolution"] // self.codec.downsample
        return (self.codec.channels, r, r)


def _check_layout(folder: Path, family: str) -> None:
    for name in COMPONENTS[family]:
        if name.startswith("tokenizer"):
            needed = [folder / name / "vocab.json", folder / name / "merges.txt"]
            if (folder / name / "tokenizer.json").is_file():
                continue
        elif name == "scheduler":
            needed = [folder / name / "scheduler_config.json"]
        else:
            needed = [folder / name / "config.json"]
            weights = [p for p in (folder / name).glob("*") if p.suffix in (".safetensors", ".bin")] \
                if (folder / name).is_dir() else []
            if not weights:
                needed.append(folder / name / ("diffusion_pytorch_model.safetensors" if name in ("unet", "vae")
                                               else "model.safetensors"))
        missing = [p for p in needed if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} lacks {missing[0].relative_to(folder)}; expected {LAYOUT}")


def load_stable_diffusion(folder: str | Path, resolution: int | None = None,
                          dtype: torch.dtype = torch.float32) -> StableDiffusion:
    """Load a local SD1.5 / SDXL pipeline folder with no network access. ``resolution`` (pixels) defaults to
    the UNet's sample_size times the VAE's downsampling (512 for SD1.5, 1024 for SDXL)."""
    diffusers, transformers = _modules()
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Stable Diffusion folder not found: {folder}; expected {LAYOUT}")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{folder} lacks model_index.json; expected {LAYOUT}")
    class_name = read_json_object(index_path).get("_class_name")
    if not isinstance(class_name, str) or class_name not in FAMILIES:
        raise ValueError(f"{folder} holds a {str(class_name)[:80]}, not a StableDiffusionPipeline or "
                         "StableDiffusionXLPipeline")
    family = FAMILIES[class_name]
    _check_layout(folder, family)
    check_unet_config(read_json_object(folder / "unet" / "config.json"), str(folder / "unet" / "config.json"))
    scheduler_config = read_json_object(folder / "scheduler" / "scheduler_config.json")
    check_scheduler_config(scheduler_config, str(folder / "scheduler" / "scheduler_config.json"))
    local = dict(local_files_only=True)
    low_mem = dict(low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
    with _quiet():
        unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype, **local, **low_mem)
        vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32, **local, **low_mem)
        tokenizers = [transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer", **local)]
        encoders = [transformers.CLIPTextModel.from_pretrained(folder / "text_encoder", **local)]
        if family == "sdxl":
            tokenizers.append(transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer_2", **local))
            encoders.append(transformers.CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2",
                                                                                     **local))
    codec = LatentCodec(vae)
    resolution = resolution or int(unet.config["sample_size"]) * codec.downsample
    text = TextEncoder(family, tokenizers, encoders, resolution)
    null = text([""]).embeds if family == "sd15" else None
    unet_config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    unet_config["sample_size"] = resolution // codec.downsample
    if unet_config["sample_size"] != unet.config["sample_size"]:
        unet.register_to_config(sample_size=unet_config["sample_size"])
    denoiser = LatentUNetDenoiser(unet, alphas_cumprod(scheduler_config),
                                  scheduler_config.get("prediction_type", "epsilon"), family, null)
    kwargs = {"folder": str(folder.resolve()), "family": family, "resolution": resolution,
              "unet_config": unet_config, "scheduler_config": scheduler_config,
              "img_resolution": denoiser.img_resolution, "img_channels": denoiser.img_channels, "label_dim": 0}
    json.dumps(kwargs)  # checkpoint metadata must be JSON
    return StableDiffusion(denoiser.eval(), text, codec, kwargs)


def _hub_blob(link: Path, root: Path) -> bool:
    """Whether ``link`` is a Hugging Face cache link: ``root`` is ``<repo>/snapshots/<revision>`` and the link
    resolves to a regular file in that repository's ``blobs/`` (how huggingface_hub stores every file)."""
    if root.parent.name != "snapshots":
        return False
    target = link.resolve()
    return target.parent == (root.parent.parent / "blobs").resolve() and target.is_file() and not target.is_symlink()


def copy_regular_files(src: str | Path, dst: str | Path, leave_out: set[str] = frozenset(), _root: Path | None = None
                       ) -> Path:
    """Copy the folder tree ``src`` to the new folder ``dst`` (names in ``leave_out`` at its top skipped), only
    the regular files inside it: a symlink (to a file or a folder) or a special file is left out with a warning
    naming it, so that nothing from outside the folder ends up in what is written. The one exception: in a
    Hugging Face cache snapshot, the links into the repository's own ``blobs/`` are copied as their files."""
    src, dst = Path(src), Path(dst)
    root = _root or src.resolve()
    dst.mkdir(parents=True)
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        path = Path(entry.path)
        if entry.name in leave_out:
            continue
        if entry.is_symlink():
            if _hub_blob(path, root):
                shutil.copyfile(path.resolve(), dst / entry.name)
            else:
                warnings.warn(f"left out {path}: a symlink (to {os.readlink(path)}); only the regular files inside "
                              f"{root} are copied", stacklevel=2)
        elif entry.is_dir(follow_symlinks=False):
            copy_regular_files(path, dst / entry.name, _root=root)
        elif entry.is_file(follow_symlinks=False):
            shutil.copyfile(path, dst / entry.name, follow_symlinks=False)
        else:
            warnings.warn(f"left out {path}: not a regular file or folder; only the regular files inside {root} are "
                          "copied", stacklevel=2)
    return dst


def export_pipeline(generator: LatentUNetDenoiser, teacher_folder: str | Path, out: str | Path) -> Path:
    """Write the one-step generator as a diffusers pipeline folder: the teacher's folder with the generator's
    UNet and a one-step DDIM scheduler (trailing spacing, final alpha 1, so one step returns the predicted
    x0). ``StableDiffusionPipeline.from_pretrained(out)`` (or the XL one) then samples in one step with
    ``num_inference_steps=1, guidance_scale=0`` (the student is unguided): the image ``fdistill sample``
    gives for the same seed."""
    diffusers, _ = _modules()
    teacher_folder, out = Path(teacher_folder), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; give a new folder for the exported pipeline")
    tmp = temp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    copy_regular_files(teacher_folder, tmp, leave_out={"unet", "scheduler"})
    generator.unet.save_pretrained(tmp / "unet", safe_serialization=True)
    sched = json.loads((teacher_folder / "scheduler" / "scheduler_config.json").read_text())
    # steps_offset does nothing with trailing spacing; 1, as SD's own configs (the pipeline warns at any other)
    one_step = diffusers.DDIMScheduler.from_config({k: v for k, v in sched.items() if not k.startswith("_")},
                                                   timestep_spacing="trailing", set_alpha_to_one=True,
                                                   clip_sample=False, steps_offset=1)
    one_step.save_pretrained(tmp / "scheduler")
    index = json.loads((tmp / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "DDIMScheduler"]
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()
    os.rename(tmp, out)
    return out


# -- the family's Teacher: what distillation, sampling and export dispatch on ---------------------------------------
class TextToImageData:
    """Alg. 1's real data and the generator's conditions in the teacher's latent space (``core.protocols.RealData``):
    captioned images encoded online by the VAE and text encoders, or latent shards encoded once
    (``fdistill prepare-latents``). Every rank draws the same n and encodes only its own part."""

    def __init__(self, sd: StableDiffusion, sampler, device: torch.device) -> None:
        from fdistill.data.latent_shards import LatentSampler

        self.sd, self.sampler, self.device = sd, sampler, device
        self.latents = isinstance(sampler, LatentSampler)  # else a CaptionSampler of images and captions

    def __call__(self, n: int, part: slice = slice(None)) -> tuple[Tensor, TextCondition]:
        if self.latents:
            latents, cond = self.sampler(n, part)
            return latents.to(self.device), TextCondition(**cond).to(self.device)
        images, captions = self.sampler(n, part)
        return self.sd.codec.encode(images.to(self.device)), self.sd.text(captions)

    def sample_cond(self, n: int, part: slice = slice(None)) -> TextCondition:
        if self.latents:
            return TextCondition(**self.sampler.sample_cond(n, part)).to(self.device)
        return self.sd.text(self.sampler.sample_prompts(n, part))

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def add_lora(net: LatentUNetDenoiser, rank: int, name: str = "default") -> None:
    """LoRA adapters (Hu et al. 2022) of ``rank`` on the UNet's attention projections, through peft, as DMD2's
    SDXL variant; only they are trained (the base weights are frozen). ``name``: the peft adapter's."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ImportError("text.lora_rank needs the peft package: pip install peft") from None
    net.unet.requires_grad_(False)
    net.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name=name)


class StableDiffusionTeacher(Teacher):
    """A Stable Diffusion v1.5 / SDXL pipeline folder as a teacher; ``info`` = {"precond": "stable_diffusion",
    "network": the pipeline's record (folder, family, resolution, UNet and scheduler configs)}."""

    kind = "stable_diffusion"
    backbone = "unet"  # the denoiser's diffusers model: where LoRA and gradient checkpointing go
    lora = staticmethod(add_lora)

    @classmethod
    def open(cls, folder: str | Path, resolution: int | None = None) -> StableDiffusionTeacher:
        return cls._make(load_stable_diffusion(folder, resolution), str(folder))

    @classmethod
    def from_info(cls, info: dict, where: str = "the checkpoint") -> StableDiffusionTeacher:
        kwargs = info["network"]
        if not Path(kwargs["folder"]).is_dir():
            raise FileNotFoundError(f"{where} was distilled from {kwargs['folder']}, which is not there any more: its "
                                    "text encoders and VAE are needed to sample (move the folder back)")
        return cls._make(load_stable_diffusion(kwargs["folder"], kwargs["resolution"]), kwargs["folder"])

    @classmethod
    def _make(cls, sd: StableDiffusion, source: str) -> StableDiffusionTeacher:
        return cls(sd.denoiser, sd.latent_shape, {"precond": cls.kind, "network": sd.kwargs}, source, text=sd.text,
                   codec=sd.codec, sigma_range=(sd.denoiser.sigma_min, sd.denoiser.sigma_max), extra={"sd": sd})

    @property
    def pipeline(self) -> StableDiffusion:
        return self.extra["sd"]

    def open_data(self, cfg, device: torch.device, dataset=None) -> TextToImageData:
        """Latent shards (a folder with index.json) or captioned images, with the generator's prompts from
        ``cfg.text.prompts`` when given."""
        from fdistill.data.captions import open_captions
        from fdistill.data.latent_shards import LatentSampler, LatentShards
        from fdistill.data.sampler import CaptionSampler

        seed = cfg.distill.seed
        if (Path(cfg.data) / "index.json").is_file():
            sampler = LatentSampler(LatentShards(cfg.data), seed=seed, device="cpu")
        else:
            on_error = cfg.text.on_bad_data.replace("error", "raise")
            data = open_captions(cfg.data, resolution=self.info["network"]["resolution"], on_error=on_error)
            prompts = open_captions(cfg.text.prompts) if cfg.text.prompts else None
            sampler = CaptionSampler(data, seed=seed, prompts=prompts, threads=cfg.text.decode_threads)
        return TextToImageData(self.pipeline, sampler, device)

    def prepare_students(self, students: list[nn.Module], cfg) -> None:
        for m in students:
            if cfg.text.lora_rank:
                self.lora(m, cfg.text.lora_rank)
            if cfg.text.gradient_checkpointing:
                getattr(m, self.backbone).enable_gradient_checkpointing()

    def shared_students(self, cfg) -> tuple[nn.Module, list[nn.Module]]:
        """``text.shared_base``: the teacher and the two students as views of this teacher's one denoiser
        (``networks.shared_base``): generator and fake score are LoRA adapters of rank ``text.lora_rank``."""
        from fdistill.networks.shared_base import SharedBase

        for flag, what in ((cfg.distill.fsdp, "distill.fsdp"), (cfg.distill.compile, "distill.compile")):
            if flag:
                raise ValueError(f"text.shared_base cannot be combined with {what}: the students' parameters live "
                                 "inside the teacher's network (use one or the other)")
        shared = SharedBase(self.denoiser, self.backbone, self.lora, cfg.text.lora_rank)
        return shared.teacher(), [shared.add("generator").train(), shared.add("fake_score").train()]

    def student_info(self, cfg) -> dict:
        return {"lora_rank": cfg.text.lora_rank, "shared_base": cfg.text.shared_base}

    def export(self, generator: nn.Module, out, sigma_gen: float | None = None) -> str:
        top = float(generator.sigma_max)
        if sigma_gen is not None and abs(sigma_gen - top) > 1e-4 * top:
            raise ValueError(f"this student was trained at sigma {sigma_gen:.4g} (distill.generator_sigma), but the "
                             f"exported one-step DDIM scheduler evaluates it at the top timestep (sigma {top:.4g}); "
                             "export supports students at the schedule's largest sigma only")
        out = export_pipeline(generator, self.info["network"]["folder"], out)
        family = "StableDiffusionXLPipeline" if self.info["network"]["family"] == "sdxl" else "StableDiffusionPipeline"
        return (f"wrote {out}: {family}.from_pretrained('{out}')(prompt, num_inference_steps=1, guidance_scale=0) "
                "gives fdistill sample's image for the same seed")

    def load_student(self, weights: dict[str, Tensor], info: dict) -> nn.Module:
        """The generator from its weights; LoRA adapters are folded into the base weights (a plain UNet again)."""
        net = self.student_network()
        if info.get("lora_rank"):
            self.lora(net, info["lora_rank"])
        if info.get("shared_base"):  # an adapter view's weights only: the base is the teacher's
            from fdistill.networks.shared_base import lora_state_dict

            missing, unexpected = net.load_state_dict(lora_state_dict(weights), strict=False)
            if unexpected or any(".lora_" in k for k in missing):
                raise RuntimeError(f"missing adapter weights {[k for k in missing if '.lora_' in k][:3]}, "
                                   f"unexpected {unexpected[:3]}")
        else:
            net.load_state_dict(weights)
        if info.get("lora_rank"):
            getattr(net, self.backbone).fuse_lora()
            getattr(net, self.backbone).unload_lora()
        return net
