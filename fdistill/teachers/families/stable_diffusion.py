"""Stable Diffusion v1.5 and SDXL teachers from local diffusers folders (Rombach et al. 2022; Podell et al.
2023): the latent UNet as a denoiser D(x, sigma, cond) with text conditioning, the frozen text encoders,
the VAE, and a distilled one- or k-step generator written back as a standard diffusers pipeline (one step at the
top: a one-step DDIM; otherwise the student's timesteps, ``timesteps=``, run by ``steps_scheduler``).

The UNet (``UNet2DConditionModel``, epsilon or v prediction on the scaled_linear DDPM schedule) becomes an
EDM denoiser through the VP conversion of ``teachers.diffusers_unet``, in the VAE's latent space. Its
condition is a ``TextCondition``: CLIP token embeddings (SD1.5: the text encoder's last hidden state;
SDXL: both encoders' penultimate hidden states, concatenated) and for SDXL the pooled embedding and the
size/crop ``time_ids``. Classifier-free guidance uses each variant's unconditional condition: the encoded
empty prompt for SD1.5, zeros for SDXL (its pipeline's ``force_zeros_for_empty_prompt``).
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from fdistill.core.few_step import StudentSteps
from fdistill.data.conditions import TextCondition
from fdistill.io import read_json_object
from fdistill.teachers import pipeline_folders as pf
from fdistill.teachers.base import register
from fdistill.teachers.diffusers_unet import VPUNetDenoiser, alphas_cumprod, check_scheduler_config, check_unet_config
from fdistill.teachers.latent_t2i import LatentCodec, LatentPipeline, LatentTextToImageTeacher

GRID_TOLERANCE = 1e-5  # |log sigma - log sigma_t| of a student level exported as timestep t (steps are >= 6e-3 apart)
LAYOUT = ("a diffusers StableDiffusionPipeline or StableDiffusionXLPipeline folder: model_index.json, unet/, vae/, "
          "text_encoder/, tokenizer/, scheduler/ (SDXL also text_encoder_2/, tokenizer_2/), as save_pretrained writes")


class LatentUNetDenoiser(VPUNetDenoiser):
    """A Stable Diffusion v1.5 ``UNet2DConditionModel`` as a latent-space denoiser D(x, sigma, TextCondition).

    Discriminator features (App. B; FastGen and DMD2 read the mid block): at each encoder resolution the
    output of the last block there, the down blocks' last full-resolution layer and, at the lowest
    resolution, the mid block (SD1.5 at 512 px: 64, 32, 16 and 8 = the mid block's 1280 x 8 x 8; SDXL at
    1024 px: 128, 64 and 32 = the mid block's 1280 x 32 x 32).
    """

    family = "sd15"
    null_is_empty_prompt = True  # the unconditional condition is the encoded "" (its embeddings, loaded once)

    def __init__(self, unet: nn.Module, scheduler_config: dict, null_embeds: Tensor | None = None,
                 sigma_data: float | None = None) -> None:
        super().__init__(unet, alphas_cumprod(scheduler_config), scheduler_config.get("prediction_type", "epsilon"),
                         sigma_data)
        self.label_dim, self.scheduler_config = 0, dict(scheduler_config)
        if null_embeds is not None:  # SD1.5's unconditional condition: the encoded empty prompt (1, 77, D)
            self.register_buffer("null_embeds", null_embeds.detach().float(), persistent=False)
        channels = list(unet.config["block_out_channels"])
        n = len(unet.down_blocks)
        self._taps = {self.img_resolution >> i: f"down_blocks.{i}" for i in range(n - 1)}
        self._tap_channels = {self.img_resolution >> i: int(channels[i]) for i in range(n - 1)}
        self._taps[self.img_resolution >> (n - 1)] = "mid_block"
        self._tap_channels[self.img_resolution >> (n - 1)] = int(channels[-1])
        self._init_taps()

    def default_sigmas(self) -> dict:
        """The teacher's own noise levels: its training timesteps (a linear or scaled_linear DDPM schedule),
        index uniform in [1, T - 1] as FastGen and DMD2 draw them for Stable Diffusion; another beta schedule:
        EDM's Karras levels over its sigma range."""
        c = self.scheduler_config
        if c.get("beta_schedule", "linear") in ("linear", "scaled_linear") and c.get("trained_betas") is None:
            steps = int(c.get("num_train_timesteps", 1000))
            return {"schedule": c.get("beta_schedule", "linear"), "beta_start": c.get("beta_start", 0.0001),
                    "beta_end": c.get("beta_end", 0.02), "num_levels": steps, "index_range": [1, steps - 1]}
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}

    def prior_std(self, sigma: float) -> float:
        """The std of x = x0 + sigma eps at the top of the schedule, sqrt(1 + sigma^2) for unit-variance
        latents: the one-step generator's input is z times this, so the UNet sees pure N(0, I) noise at
        t = T, as a diffusers scheduler starts (DMD2's one-step input; FastGen feeds sigma z, 0.23% less)."""
        return (1 + sigma**2) ** 0.5

    def null_condition(self, cond: TextCondition) -> TextCondition:
        """SD1.5's unconditional condition for classifier-free guidance: the encoded empty prompt."""
        if not hasattr(self, "null_embeds"):
            raise ValueError("this SD1.5 denoiser has no empty-prompt embedding (load it with load_stable_diffusion)")
        return TextCondition(self.null_embeds.to(cond.embeds).expand_as(cond.embeds))

    def _check(self, cond) -> torch.dtype:
        if not isinstance(cond, TextCondition):
            raise ValueError(f"a Stable Diffusion UNet is conditioned on text (a TextCondition), got "
                             f"{type(cond).__name__}")
        return next(self.unet.parameters()).dtype

    def _call(self, x_t: Tensor, t: Tensor, cond: TextCondition) -> Tensor:
        dtype = self._check(cond)
        return self.unet(x_t.to(dtype), t, encoder_hidden_states=cond.embeds.to(dtype), return_dict=False)[0]


class SDXLUNetDenoiser(LatentUNetDenoiser):
    """SDXL's UNet: also conditioned on the pooled text embedding and the size/crop ``time_ids``; its null condition
    is zeros (the pipeline's ``force_zeros_for_empty_prompt``), with the same time ids."""

    family = "sdxl"
    null_is_empty_prompt = False

    def null_condition(self, cond: TextCondition) -> TextCondition:
        return TextCondition(torch.zeros_like(cond.embeds), torch.zeros_like(cond.pooled), cond.time_ids)

    def _call(self, x_t: Tensor, t: Tensor, cond: TextCondition) -> Tensor:
        dtype = self._check(cond)
        added = {"text_embeds": cond.pooled.to(dtype), "time_ids": cond.time_ids.to(dtype)}
        return self.unet(x_t.to(dtype), t, encoder_hidden_states=cond.embeds.to(dtype), added_cond_kwargs=added,
                         return_dict=False)[0]


class TextEncoder(nn.Module):
    """SD1.5's frozen CLIP text encoder: prompts -> TextCondition(its last hidden state), no attention mask, as the
    diffusers pipeline calls it."""

    length_setting = "CLIP's 77 tokens"

    def __init__(self, tokenizers: list, encoders: list[nn.Module], resolution: int) -> None:
        super().__init__()
        self.tokenizers, self.resolution = tokenizers, resolution
        self.encoders = nn.ModuleList(encoders).eval().requires_grad_(False)

    @property
    def sequence_length(self) -> int:
        return int(self.tokenizers[0].model_max_length)

    def _ids(self, tokenizer, prompts: list[str], device) -> Tensor:
        return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(device)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextCondition:
        device = next(self.encoders.parameters()).device
        return TextCondition(self.encoders[0](self._ids(self.tokenizers[0], prompts, device))[0].float())


class SDXLTextEncoder(TextEncoder):
    """SDXL's two CLIP encoders: their penultimate hidden states concatenated, the second's projected embedding as
    ``pooled``, and the ``time_ids`` of an uncropped image at the run's resolution."""

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextCondition:
        device = next(self.encoders.parameters()).device
        states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            out = encoder(self._ids(tokenizer, prompts, device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's projected text embedding
        r = self.resolution
        time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32, device=device).expand(len(prompts), 6)
        return TextCondition(torch.cat(states, dim=-1).float(), pooled.float(), time_ids)


class StableDiffusionTeacher(LatentTextToImageTeacher):
    """A Stable Diffusion v1.5 or SDXL pipeline folder as a teacher; ``info["network"]``: its folder, variant,
    resolution, UNet and scheduler configs."""

    components: ClassVar[tuple[str, ...]] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    denoiser_class: ClassVar[type] = LatentUNetDenoiser
    text_class: ClassVar[type] = TextEncoder

    @classmethod
    def text_encoders(cls, folder: Path) -> tuple[list, list[nn.Module]]:
        _, transformers = pf.libraries()
        return ([pf.load_tokenizer(transformers.CLIPTokenizer, folder / "tokenizer")],
                [pf.load_text_model(transformers.CLIPTextModel, folder / "text_encoder")])

    @classmethod
    def load(cls, folder: str | Path, resolution: int | None = None, options=None,
             dtype: torch.dtype = torch.float32) -> LatentPipeline:
        """A local SD1.5 / SDXL pipeline folder, with no network access. ``resolution`` (pixels) defaults to the
        UNet's sample_size times the VAE's downsampling (512 for SD1.5, 1024 for SDXL)."""
        diffusers, _ = pf.libraries()
        folder = pf.open_folder(folder, cls.pipeline_classes, cls.components, LAYOUT)
        check_unet_config(read_json_object(folder / "unet" / "config.json"), str(folder / "unet" / "config.json"))
        scheduler_config, where = cls.scheduler_config(folder)
        check_scheduler_config(scheduler_config, where)
        unet = pf.load_network(diffusers.UNet2DConditionModel, folder / "unet", dtype)
        codec = LatentCodec.load(diffusers.AutoencoderKL, folder, default_scaling=0.18215)
        resolution = resolution or int(unet.config["sample_size"]) * codec.downsample
        text = cls.text_class(*cls.text_encoders(folder), resolution)
        null = text([""]).embeds if cls.denoiser_class.null_is_empty_prompt else None
        unet_config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
        unet_config["sample_size"] = resolution // codec.downsample
        if unet_config["sample_size"] != unet.config["sample_size"]:
            unet.register_to_config(sample_size=unet_config["sample_size"])
        denoiser = cls.denoiser_class(unet, scheduler_config, null)
        kwargs = {"folder": str(folder.resolve()), "family": cls.kind, "resolution": resolution,
                  "unet_config": unet_config, "scheduler_config": scheduler_config,
                  "img_resolution": denoiser.img_resolution, "img_channels": denoiser.img_channels, "label_dim": 0}
        json.dumps(kwargs)  # checkpoint metadata must be JSON
        return LatentPipeline(denoiser.eval(), text, codec, kwargs)

    def student_scheduler(self, teacher_folder: Path, student: StudentSteps):
        """One step at the top timestep: the one-step trailing DDIM (``one_step_ddim``); any other student: its
        timesteps (``student_timesteps``, refused off the teacher's integer grid) run by ``steps_scheduler`` (sde:
        LCMScheduler, ode: EulerDiscreteScheduler)."""
        diffusers, _ = pf.libraries()
        sched, _ = self.scheduler_config(teacher_folder)
        if self.top_one_step(student):
            return one_step_ddim(diffusers, sched)
        return steps_scheduler(diffusers, sched, student.sampler, self.student_timesteps(student))

    def pipeline_call(self, folder: Path, student: StudentSteps) -> str:
        name = self.pipeline_classes[0]
        if self.top_one_step(student):
            return (f"{name}.from_pretrained('{folder}')(prompt, num_inference_steps=1, "
                    "guidance_scale=0) gives fdistill sample's image for the same seed")
        timesteps = self.student_timesteps(student)
        k = len(timesteps)
        if k == 1:
            how = "its one step, EulerDiscreteScheduler's step to sigma 0"
        elif student.sampler == "sde":
            how = (f"its {k} sde steps, LCMScheduler's: x0, then fresh noise from generator as fdistill sample "
                   "draws it for one prompt on the CPU")
        else:
            how = f"its {k} ode steps, EulerDiscreteScheduler's"
        return (f"{name}.from_pretrained('{folder}')(prompt, timesteps={timesteps}, guidance_scale=0) gives fdistill "
                f"sample's image for the same seed (the student's timesteps; {how})")

    def top_one_step(self, student: StudentSteps) -> bool:
        """A one-step student at the schedule's top (sigma_max, to 1e-4): exported as before, one DDIM step."""
        top = float(self.denoiser.sigma_max)
        return student.steps == 1 and abs(student.sigmas[0] - top) <= 1e-4 * top

    def student_timesteps(self, student: StudentSteps) -> list[int]:
        """The teacher's DDPM timesteps of the student's levels: each level must be an integer timestep's sigma
        (the denoiser's grid, ``log_sigmas``, to a relative 1e-5), since the pipeline feeds its UNet integer
        timesteps; else refused in one line naming the nearest."""
        grid = self.denoiser.log_sigmas.double()
        out = []
        for s in student.sigmas:
            t = int((grid - math.log(s)).abs().argmin())
            if abs(math.log(s) - float(grid[t])) > GRID_TOLERANCE:
                raise ValueError(f"the student's level sigma {s:.6g} (distill.generator_sigma or "
                                 "distill.student_sigmas) is not one of the teacher's timesteps, which a "
                                 f"{self.pipeline_classes[0]} feeds its UNet: the nearest is t = {t} (sigma "
                                 f"{math.exp(float(grid[t])):.6g}); train the student at timestep levels to export it")
            out.append(t)
        if student.sampler == "sde" and len(out) > 1 and out[-1] == 0:
            raise ValueError("the student's last level is timestep 0, where LCMScheduler's boundary condition returns "
                             "its input instead of the x0 prediction: export it with the ode sampler or other levels")
        return out


@register
class SD15Teacher(StableDiffusionTeacher):
    kind = "sd15"
    preset = "sd15"
    pipeline_classes = ("StableDiffusionPipeline",)


@register
class SDXLTeacher(StableDiffusionTeacher):
    kind = "sdxl"
    preset = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    components = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    denoiser_class = SDXLUNetDenoiser
    text_class = SDXLTextEncoder

    @classmethod
    def text_encoders(cls, folder: Path) -> tuple[list, list[nn.Module]]:
        _, transformers = pf.libraries()
        tokenizers, encoders = super().text_encoders(folder)
        tokenizers.append(pf.load_tokenizer(transformers.CLIPTokenizer, folder / "tokenizer_2"))
        encoders.append(pf.load_text_model(transformers.CLIPTextModelWithProjection, folder / "text_encoder_2"))
        return tokenizers, encoders


VARIANTS = {cls.pipeline_classes[0]: cls for cls in (SD15Teacher, SDXLTeacher)}


def load_stable_diffusion(folder: str | Path, resolution: int | None = None,
                          dtype: torch.dtype = torch.float32) -> LatentPipeline:
    """A local SD1.5 / SDXL pipeline folder (``StableDiffusionTeacher.load`` of its variant)."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"Stable Diffusion folder not found: {folder}; expected {LAYOUT}")
    name = pf.pipeline_class(folder)
    if name not in VARIANTS:
        pf.open_folder(folder, tuple(VARIANTS), (), LAYOUT)  # says why not
    return VARIANTS[name].load(folder, resolution, dtype=dtype)


def export_pipeline(generator: LatentUNetDenoiser, teacher_folder: str | Path, out: str | Path) -> Path:
    """Write the one-step generator as a diffusers pipeline folder: the teacher's folder with the generator's
    UNet and a one-step DDIM scheduler (trailing spacing, final alpha 1, so one step returns the predicted
    x0). ``StableDiffusionPipeline.from_pretrained(out)`` (or the XL one) then samples in one step with
    ``num_inference_steps=1, guidance_scale=0`` (the student is unguided): the image ``fdistill sample``
    gives for the same seed."""
    diffusers, _ = pf.libraries()
    sched, _ = StableDiffusionTeacher.scheduler_config(Path(teacher_folder))
    return pf.write_pipeline(teacher_folder, out, {"unet": generator.unet}, one_step_ddim(diffusers, sched))


def one_step_ddim(diffusers, teacher_config: dict):
    """The teacher's DDIM made to take one step from the top timestep to x0: trailing spacing, final alpha 1."""
    # steps_offset does nothing with trailing spacing; 1, as SD's own configs (the pipeline warns at any other)
    return diffusers.DDIMScheduler.from_config({k: v for k, v in teacher_config.items() if not k.startswith("_")},
                                               timestep_spacing="trailing", set_alpha_to_one=True,
                                               clip_sample=False, steps_offset=1)


def steps_scheduler(diffusers, teacher_config: dict, sampler: str, timesteps: list[int]):
    """The scheduler that runs a student at ``timesteps`` (the pipeline's ``timesteps=`` argument) on the teacher's
    training schedule (its betas, prediction type), in the EDM terms of ``core.few_step`` (x = x_t sqrt(1 + s^2)):

    * ``sde`` (k > 1): ``LCMScheduler``. Its step takes the x0 prediction, then x_{i+1} = sqrt(abar) x0 +
      sqrt(1 - abar) eps with eps = randn_tensor(shape, generator), the pipeline's generator (``step`` gets it
      through ``prepare_extra_step_kwargs``): x0 + sigma_{i+1} eps in EDM terms, eps the next draw of the stream
      that gave the latents, as ``sample_maker`` draws it (one prompt, on the CPU); the last step returns x0.
      Its boundary condition c_skip x_t + c_out x0 (c_skip = 0.25 / ((10^4 t)^2 + 0.25)) is x0 to float
      precision with ``timestep_scaling`` 10^4 at t >= 1; ``original_inference_steps`` = T so that every timestep
      is on its "training schedule" (diffusers still warns when t_1 is not T - 1; harmless). ``init_noise_sigma``
      is 1: the latents are x_t = z.
    * ``ode`` (and one step below the top): ``EulerDiscreteScheduler``, final sigma 0. Given integer timesteps it
      takes sigma_t = sqrt((1 - abar_t) / abar_t) of them (np.interp at integers: the grid values, as the
      denoiser's t(sigma)); its step x + (sigma_{i+1} - sigma_i) (x - x0) / sigma_i is the ode step, the last
      (to sigma 0) returns x0. ``timestep_spacing="leading"`` makes ``init_noise_sigma`` sqrt(sigma_1^2 + 1),
      fdistill's prior_std (linspace / trailing would give sigma_1), and ``scale_model_input`` feeds the UNet
      x / sqrt(sigma^2 + 1) = x_t, as the denoiser does; the spacing is otherwise unused with ``timesteps=``.
    """
    steps = int(teacher_config.get("num_train_timesteps", 1000))
    if sampler == "sde" and len(timesteps) > 1:
        cls = diffusers.LCMScheduler
        settings = dict(timestep_scaling=1e4, original_inference_steps=steps, clip_sample=False, thresholding=False)
    else:
        cls = diffusers.EulerDiscreteScheduler
        settings = dict(timestep_spacing="leading", final_sigmas_type="zero", interpolation_type="linear",
                        use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                        timestep_type="discrete")
    known = inspect.signature(cls.__init__).parameters
    schedule = {k: v for k, v in teacher_config.items() if k in known and not k.startswith("_")}
    return cls(**{**schedule, **settings, "steps_offset": 1})  # steps_offset: unused here; 1 keeps the pipeline quiet
