"""What the rectified-flow transformer families share (SD3 / SD3.5, FLUX.1, SANA, Qwen-Image, Wan;
``teachers.families``): the flow time <-> EDM noise level conversion, the transformer as an EDM denoiser, the
flow families' options, and the one-step export with a flow-matching scheduler.

Rectified flow (diffusers' ``FlowMatchEulerDiscreteScheduler``) noises latents as x_t = (1 - t) x0 + t eps and the
transformer predicts v = eps - x0, so x0 = x_t - t v. Dividing by 1 - t gives EDM's x = x0 + sigma eps with

    sigma = t / (1 - t),   t = sigma / (1 + sigma),   x_t = x / (1 + sigma),
    D(x; sigma) = x_t - t v(x_t, t),

(c_skip = c_in = 1 / (1 + sigma), c_out = -sigma / (1 + sigma)); D is affine in v, so classifier-free guidance of
D (``teachers.guidance.GuidedDenoiser``) is guidance of v. The range is t in [0.001, 0.999] (NVlabs/FastGen's
``max_t``), sigma in [0.001 / 0.999, 999]; t = 1 is sigma = inf. Each family says what its transformer takes for t
(``timestep``: SD3 1000 t, FLUX t) and how it is called (``_call``).

Noise levels: the teacher's own schedule (``default_sigmas``) is t uniform on 1000 levels in [t_min, t_max] with
sigma = shift t / (1 - t), the shift of the folder's scheduler (``distill.sigmas.schedule: flow``).

Export (``FlowMatchingTeacher.export_pipeline``): the teacher's folder with the student's transformer and a one-step
FlowMatchEulerDiscreteScheduler (Karras sigmas with sigma_max = t_gen, so one step runs from t_gen to 0); the
pipeline's call with one step and CFG off then returns the student's sample for the same latent noise. A k-step
student: an unshifted FlowMatchEulerDiscreteScheduler (``steps_scheduler_config``) called with ``sigmas=`` its
flow times, stochastic for the sde sampler.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from fdistill.core.diffusion import append_dims
from fdistill.core.few_step import StudentSteps
from fdistill.core.protocols import DenoiserDefaults
from fdistill.data.conditions import TextCondition
from fdistill.networks.taps import HookedTaps
from fdistill.teachers import pipeline_folders as pf
from fdistill.teachers.latent_t2i import LatentPipeline, LatentTextToImageTeacher

T_MIN, T_MAX = 0.001, 0.999  # NVlabs/FastGen's range of t for rectified-flow teachers


def sigma_of_t(t: Tensor | float) -> Tensor | float:
    """sigma = t / (1 - t): the EDM noise level of rectified-flow time t."""
    return t / (1 - t)


def t_of_sigma(sigma: Tensor | float) -> Tensor | float:
    """t = sigma / (1 + sigma)."""
    return sigma / (1 + sigma)


# -- 2x2 latent packing (FluxPipeline._pack_latents / _unpack_latents; Qwen-Image packs the same way) ---------------
def pack_latents(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: each 2x2 patch one token, row-major over the patch grid."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """The inverse of ``pack_latents``: [B, (h/2)(w/2), 4C] -> [B, C, h, w] (h, w: the latent size)."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def _positive_int(name: str, value, hi: int) -> None:
    if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= hi):
        raise ValueError(f"teacher_options.{name} must be null or an integer in [1, {hi}], got {value!r:.40}")


@dataclass
class FlowOptions:
    """The options of a flow-transformer teacher (the config's ``teacher_options:``)."""

    max_sequence_length: int | None = None  # text tokens; None: the pipeline's (SD3 256, FLUX 512, SANA 300, ...)
    tap_block: int | None = None  # the transformer block the discriminator reads; None: the middle one
    guidance: float | None = None  # FLUX.1-dev's embedded guidance of teacher and students; None: 3.5

    def __post_init__(self) -> None:
        _positive_int("max_sequence_length", self.max_sequence_length, 4096)
        tap = self.tap_block
        if tap is not None and not (isinstance(tap, int) and not isinstance(tap, bool) and tap >= 0):
            raise ValueError(f"teacher_options.tap_block must be null (the middle block) or a block index >= 0, "
                             f"got {tap!r:.40}")
        g = self.guidance
        if g is not None and not (isinstance(g, (int, float)) and not isinstance(g, bool) and math.isfinite(g)
                                  and g > 0):
            raise ValueError(f"teacher_options.guidance must be null or a positive number (FLUX.1-dev's embedded "
                             f"guidance, 3.5 by default), got {g!r:.40}")


class FlowTransformerDenoiser(DenoiserDefaults, HookedTaps):
    """A flow-matching transformer as a latent-space denoiser D(x; sigma, TextCondition), x of shape [B, C, r, r]
    (the VAE's latents). A family subclass says how the transformer is called (``_call``: v(x_t, t) as its
    pipeline calls it) and what it takes for t (``timestep``).

    Discriminator features: the image tokens a transformer block outputs, [B, N, D] laid out on the token grid
    [B, D, g, g] (``_tap_output``), captured by a hook (``networks.taps.HookedTaps``); ``features()`` stops the
    forward after that block. The tap is one block (``tap_block``) of ``block_names`` (the concatenated block
    lists), by default the middle one (num_blocks // 2, FastGen's default: FLUX.1's single block 9 of 19 + 38).
    Its key is the token-grid resolution, the one encoder resolution (``disc_resolutions=[mid]``). A video family
    (``families.wan``) gives 5-D latents [B, C, F, H, W] and features [B, D, F', H', W'] (``_token_grid``).

    ``sigma_data`` only sets the fake score's ``edm`` loss weight 1/sigma^2 + 1/sigma_data^2; with 1 it meets the
    weight that gives v unit weight, (1 + sigma)^2 / sigma^2 = 1/sigma^2 + 2/sigma + 1, at both ends of the range
    (FastGen trains flow fake scores on x0-MSE, ``fake_score_weighting=none``).
    """

    sigma_data = 1.0
    block_lists: ClassVar[tuple[str, ...]] = ("transformer_blocks",)  # the transformer's block lists, in order
    guidance: float | None = None  # an embedded guidance value the transformer takes (FLUX.1-dev's)

    def __init__(self, transformer: nn.Module, resolution: int, channels: int, width: int,
                 null: TextCondition | None = None, tap_block: int | None = None, shift: float = 1.0,
                 patch: int = 2) -> None:
        super().__init__()
        self.transformer, self.label_dim, self.patch = transformer, 0, int(patch)
        self.img_resolution, self.img_channels = int(resolution), int(channels)  # the latent side and channels
        if self.img_resolution % self.patch:
            raise ValueError(f"latent size {self.img_resolution} is not a multiple of the transformer's "
                             f"{self.patch} x {self.patch} patches")
        if null is not None:  # the unconditional condition: the encoded empty prompt
            for name, t in null.tensors().items():
                self.register_buffer(f"null_{name}", t.detach(), persistent=False)
        self.sigma_min = float(sigma_of_t(T_MIN))
        self.sigma_max = float(sigma_of_t(T_MAX))
        self.shift = float(shift)
        self.block_names = [f"{lst}.{i}" for lst in self.block_lists for i in range(len(getattr(transformer, lst)))]
        tap_block = len(self.block_names) // 2 if tap_block is None else tap_block
        if not (isinstance(tap_block, int) and 0 <= tap_block < len(self.block_names)):
            raise ValueError(f"tap_block must be a block index in [0, {len(self.block_names) - 1}], got {tap_block!r}")
        self.tap_block = tap_block
        grid = self.img_resolution // self.patch
        self._taps = {grid: self.block_names[tap_block]}
        self._tap_channels = {grid: int(width)}
        self._init_taps()

    def prior_std(self, sigma: float) -> float:
        """1 + sigma: the generator's input x = (1 + sigma) z is x_t = z, pure unit-variance noise, at
        t = sigma / (1 + sigma) (0.999 at sigma_max; FastGen feeds 0.999 z at t = 0.999, the same x_t
        up to 0.1%)."""
        return 1 + sigma

    def null_condition(self, cond: TextCondition) -> TextCondition:
        """The unconditional condition for classifier-free guidance: the encoded empty prompt."""
        if not hasattr(self, "null_embeds"):
            raise ValueError(f"this {type(self).__name__} has no empty-prompt embedding (load it from its folder)")
        return TextCondition(**{name: getattr(self, f"null_{name}").to(value).expand_as(value)
                                for name, value in cond.tensors().items()})

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks: the units FSDP shards."""
        return [self.transformer.get_submodule(name) for name in self.block_names]

    def default_sigmas(self) -> dict:
        """The teacher's own noise levels: t uniform on 1000 levels in [0.001, 0.999], sigma = shift t / (1 - t)
        with the shift of its scheduler (``core.diffusion.flow_sigmas``; FastGen's t range)."""
        return {"schedule": "flow", "t_min": T_MIN, "t_max": T_MAX, "shift": self.shift, "index_range": [0, 999]}

    def timestep(self, t: Tensor) -> Tensor:
        """What the transformer is given for flow time t."""
        return 1000 * t

    def _call(self, x_t: Tensor, t: Tensor, cond: TextCondition) -> Tensor:
        """v(x_t, t) as the family's pipeline calls the transformer, [B, C, r, r]."""
        raise NotImplementedError

    def _dtype(self, cond) -> torch.dtype:
        if not isinstance(cond, TextCondition):
            raise ValueError(f"a {type(self).__name__} is conditioned on text (a TextCondition), got "
                             f"{type(cond).__name__}")
        return next(self.transformer.parameters()).dtype

    def _token_grid(self, n: int) -> tuple[int, ...]:
        """The token grid of ``n`` image tokens, row-major: (sqrt N, sqrt N) for the square images of the image
        families; a video family's is (F', H', W') (``families.wan``)."""
        r = int(round(n**0.5))
        return (r, n // r)

    def _tap_output(self, name: str, module: nn.Module, output) -> Tensor:
        """A block's image tokens [B, N, D] as a map [B, D, *grid] on the token grid (``_token_grid``: [B, D, g, g]
        for images, [B, D, F', H', W'] for video): a block returning (text, image) states hands its second
        element."""
        tokens = output[1] if isinstance(output, tuple) else output
        b, n, d = tokens.shape
        return tokens.transpose(1, 2).reshape(b, d, *self._token_grid(n))

    def forward(self, x: Tensor, sigma: Tensor | float, cond=None, return_features: bool | str = False):
        """D(x; sigma), float32 [B, C, r, r] (a video family's [B, C, F, H, W]: sigma and t broadcast over every
        axis after the batch); with ``return_features``: ``(D, {grid: [B, D, g, g]})``; with
        ``return_features="only"``: ``(None, features)``, stopping after the tapped block."""
        x = x.to(torch.float32)
        s = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1)
        if s.shape[0] == 1 and x.shape[0] != 1:
            s = s.expand(x.shape[0])
        t = t_of_sigma(s)
        x_t = x / append_dims(1 + s, x.ndim)
        v, features = self._velocity(x_t, t, cond, x, return_features)
        if v is None:
            return None, features
        d = x_t - append_dims(t, x.ndim) * v.to(torch.float32)
        return (d, features) if return_features else d

    def _velocity(self, x_t: Tensor, t: Tensor, cond, x: Tensor, return_features: bool | str
                  ) -> tuple[Tensor | None, dict]:
        """(v(x_t, t), the tapped features) from the one transformer (``HookedTaps._run_tapped``); a family with
        several experts routes the samples among them (``families.wan``)."""
        return self._run_tapped(self.transformer, lambda: self._call(x_t, t, cond), x, return_features)

    def features(self, x: Tensor, sigma: Tensor | float, cond=None) -> dict[int, Tensor]:
        """The discriminator's features alone, running the transformer only up to the tapped block."""
        return self.forward(x, sigma, cond, return_features="only")[1]


class FlowTextEncoder(nn.Module):
    """The frozen text encoders of a flow family: prompts -> TextCondition (``forward``, the family's), their token
    sequence ``max_sequence_length`` long (the family's default, or ``teacher_options.max_sequence_length``)."""

    def __init__(self, tokenizers: list, encoders: list[nn.Module], max_sequence_length: int) -> None:
        super().__init__()
        self.tokenizers, self.max_sequence_length = tokenizers, int(max_sequence_length)
        self.encoders = nn.ModuleList(encoders).eval().requires_grad_(False)

    @property
    def sequence_length(self) -> int:
        """The length of the embeddings: what latent shards must hold."""
        return self.max_sequence_length

    @property
    def length_setting(self) -> str:
        return f"teacher_options.max_sequence_length={self.max_sequence_length}"


def token_ids(tokenizer, prompts: list[str], length: int, device) -> Tensor:
    """Token ids of ``prompts`` padded and truncated to ``length``, as the pipelines tokenize them."""
    return tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def check_resolution(resolution, step: int, downsample: int) -> None:
    """Refuse an image size the VAE and the transformer's patches cannot take (``step`` pixels a token)."""
    if not (isinstance(resolution, int) and not isinstance(resolution, bool) and resolution > 0
            and resolution % step == 0):
        raise ValueError(f"resolution must be a positive multiple of {step} pixels (VAE x {downsample}, "
                         f"{step // downsample} x {step // downsample} patches), got {resolution!r:.40}")


def scheduler_shift(config: dict, where: str) -> float:
    """The static shift of a FlowMatchEulerDiscreteScheduler config (1 when it shifts dynamically, by image size),
    checked: a finite positive number."""
    shift = 1.0 if config.get("use_dynamic_shifting") else config.get("shift", 1.0)
    if not (isinstance(shift, (int, float)) and not isinstance(shift, bool) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"{where}: shift must be a finite positive number, got {shift!r:.40}")
    return float(shift)


def one_step_scheduler_config(teacher_config: dict, t_gen: float) -> dict:
    """The teacher's FlowMatchEulerDiscreteScheduler config made to take its one step from t_gen to 0.

    With ``num_inference_steps=1`` the scheduler's sigmas are [1, 0] whatever its (static or dynamic) shift,
    and FLUX's pipeline passes sigmas=[1] itself. ``use_karras_sigmas`` then maps them onto the Karras ramp
    (sigma_max^(1/rho) + ramp (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, which for one step (ramp = [0]) is
    sigma_max exactly; the conversion reads ``sigma_max`` from the config when it is there (diffusers warns at
    loading that the key is unexpected, but ``_convert_to_karras`` reads it). So the pipeline calls the
    transformer once at timestep 1000 t_gen on its noise latents z = x_t, and its Euler step to sigma 0 returns
    x_t - t_gen v: the student's D. ``shift_terminal`` is dropped (it stretches sigma 1 to 0/0)."""
    cfg = {k: v for k, v in teacher_config.items() if not k.startswith("_")}
    return {**cfg, "use_karras_sigmas": True, "use_exponential_sigmas": False, "use_beta_sigmas": False,
            "sigma_max": float(t_gen), "shift_terminal": None, "invert_sigmas": False, "stochastic_sampling": False}


class FlowMatchingTeacher(LatentTextToImageTeacher):
    """A flow-transformer pipeline folder as a teacher; ``info["network"]``: its folder, variant, resolution,
    text length, guidance, tap and transformer config. A family subclass loads its folder (``load``) and names
    the arguments of its pipeline's one-step call (``call_arguments``)."""

    Options = FlowOptions
    title: ClassVar[str] = "this transformer"  # the family's name in messages
    guidance_input: ClassVar[bool] = False  # whether the transformer can take an embedded guidance value
    sde_noise_matches: ClassVar[bool] = False  # whether the pipeline's stochastic steps draw from its generator
    backbone = "transformer"
    lora_targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]

    @classmethod
    def options_of(cls, record: dict) -> FlowOptions:
        return FlowOptions(record["max_sequence_length"], record["tap_block"], record.get("guidance"))

    @classmethod
    def checked(cls, options: FlowOptions | None) -> FlowOptions:
        """``options`` (None: the defaults), ``guidance`` refused for a transformer without a guidance input."""
        options = options or cls.Options()
        if options.guidance is not None and not cls.guidance_input:
            raise ValueError(f"teacher_options.guidance={options.guidance}: {cls.title} has no guidance embedding (its "
                             "guidance is classifier-free guidance: the config's guidance)")
        return options

    @staticmethod
    def record(folder: Path, family: str, resolution: int, msl: int, denoiser: FlowTransformerDenoiser,
               transformer: nn.Module, guidance: float | None = None) -> dict:
        """The JSON record that rebuilds a loaded flow pipeline (the checkpoint's ``info["network"]``)."""
        return {"folder": str(folder.resolve()), "family": family, "resolution": resolution,
                "max_sequence_length": msl, "guidance": guidance, "tap_block": denoiser.tap_block,
                "transformer_config": {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")},
                "img_resolution": denoiser.img_resolution, "img_channels": denoiser.img_channels, "label_dim": 0}

    def check_config(self, cfg) -> None:
        schedule = cfg.distill.sigmas.schedule
        if schedule not in ("flow", "teacher"):
            warnings.warn(f"distill.sigmas.schedule={schedule} with a flow-matching teacher; its noise levels are "
                          "t in [0.001, 0.999], sigma = t / (1 - t): use distill.sigmas.schedule=flow "
                          "(or teacher, its own)", stacklevel=2)

    def call_arguments(self) -> list[str]:
        """The pipeline call's arguments beyond the prompt and one step (CFG off, the trained size and text length)."""
        r = self.info["network"]["resolution"]
        return [f"height={r}", f"width={r}", f"max_sequence_length={self.info['network']['max_sequence_length']}"]

    def export_scheduler(self, teacher_folder: Path) -> dict:
        """The FlowMatchEulerDiscreteScheduler config the export starts from: the teacher's own."""
        return self.scheduler_config(teacher_folder)[0]

    def student_scheduler(self, teacher_folder: Path, student: StudentSteps):
        """The FlowMatchEulerDiscreteScheduler that runs ``student``. One step (``one_step_scheduler_config``): one
        step from t_gen = sigma / (1 + sigma) to 0; fdistill's generator input (1 + sigma) z is x_t = z at t_gen,
        the pipeline's own noise latents, so the pipeline's one-step call (CFG off) returns fdistill's one-step
        sample for the same latent noise. k steps: ``steps_scheduler_config``, run at the levels the call's
        ``sigmas=`` gives (``pipeline_call``)."""
        diffusers, _ = pf.libraries()
        if student.steps == 1:
            config = one_step_scheduler_config(self.export_scheduler(teacher_folder), t_of_sigma(student.sigmas[0]))
        else:
            config = steps_scheduler_config(self.export_scheduler(teacher_folder), student.sampler)
        with pf.quiet():  # diffusers' "sigma_max is not expected and will be ignored": it is read (see above)
            return diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)

    def pipeline_call(self, folder: Path, student: StudentSteps) -> str:
        name = self.pipeline_classes[0]
        if student.steps == 1:
            args = ", ".join(["prompt", "num_inference_steps=1", *self.call_arguments()])
            return (f"{name}.from_pretrained('{folder}')({args}) evaluates the student once at "
                    f"t = {float(t_of_sigma(student.sigmas[0])):.6g} and gives fdistill sample's image for the same "
                    "seed (diffusers' warning that the scheduler's sigma_max is ignored is wrong: its Karras "
                    "conversion reads it)")
        args = ", ".join(["prompt", f"sigmas={flow_times(student)}", *self.call_arguments()])
        call = f"{name}.from_pretrained('{folder}')({args})"
        times = f"the student's t_i = sigma_i / (1 + sigma_i), its {student.steps} {student.sampler} steps"
        if student.sampler == "ode":
            return f"{call} gives fdistill sample's image for the same seed ({times}: FlowMatchEuler's Euler steps)"
        if self.sde_noise_matches:
            return (f"{call} gives fdistill sample's image for the same seed ({times}: FlowMatchEuler's stochastic "
                    "steps, their fresh noise drawn from generator as fdistill sample draws it for one prompt on the "
                    "CPU)")
        return (f"{call} runs {times} (FlowMatchEuler's stochastic steps), but {name} draws their noise from torch's "
                "global RNG, not from generator: not fdistill sample's image (only its ode students' are)")


def flow_times(student: StudentSteps) -> list[float]:
    """The flow times t_i = sigma_i / (1 + sigma_i) of the student's levels, as the exported pipeline's ``sigmas=``
    (to 9 significant digits, more than the scheduler's float32 keeps)."""
    return [float(f"{t_of_sigma(s):.9g}") for s in student.sigmas]


def steps_scheduler_config(teacher_config: dict, sampler: str) -> dict:
    """The teacher's FlowMatchEulerDiscreteScheduler config made to run a k-step student at the times the call's
    ``sigmas=`` gives (diffusers 0.42, ``FlowMatchEulerDiscreteScheduler.set_timesteps``): given ``sigmas``, it
    shifts them (statically, or dynamically with the ``mu`` FLUX.1 and Qwen-Image pass), so ``shift`` 1 and no
    dynamic shifting leave them as they are (``mu`` is then ignored); no Karras / exponential / beta conversion,
    no terminal stretch, no inversion; the final sigma 0 is appended, and the transformer is fed 1000 t_i.

    ``step``: ode, x_t + (t_{i+1} - t_i) v, which is x0 + sigma_{i+1} (x - x0) / sigma_i in EDM terms (with
    x0 = x_t - t v and x = x_t / (1 - t)): the student's ode step exactly, the last one (to 0) returning x0.
    sde (``stochastic_sampling``): (1 - t_{i+1}) x0 + t_{i+1} eps, i.e. x0 + sigma_{i+1} eps, the student's sde
    step, with eps = randn_tensor(latents.shape, generator) drawn with the generator the pipeline passes to
    ``step``. SanaPipeline passes its generator (``prepare_extra_step_kwargs``) and its latents are unpacked
    [B, C, h, w], so for one prompt on the CPU the draws are ``sample_maker``'s stream. StableDiffusion3Pipeline,
    FluxPipeline and QwenImagePipeline call ``scheduler.step`` without it, so eps comes from torch's global RNG
    (FLUX and Qwen-Image would besides draw it in their packed [B, N, 4C] layout): same sampler, other noise."""
    cfg = {k: v for k, v in teacher_config.items() if not k.startswith("_") and k != "sigma_max"}
    return {**cfg, "shift": 1.0, "use_dynamic_shifting": False, "use_karras_sigmas": False,
            "use_exponential_sigmas": False, "use_beta_sigmas": False, "shift_terminal": None, "invert_sigmas": False,
            "stochastic_sampling": sampler == "sde"}


def load_flow_pipeline(folder: str | Path, resolution: int | None = None, max_sequence_length: int | None = None,
                       guidance: float | None = None, tap_block: int | None = None,
                       dtype: torch.dtype = torch.float32) -> LatentPipeline:
    """The flow pipeline at ``folder``, loaded by the family that recognises it (``FlowMatchingTeacher.load``)."""
    from fdistill.teachers.open import family_of

    if not Path(folder).is_dir():
        raise FileNotFoundError(f"flow-matching pipeline folder not found: {folder}")
    family = family_of(folder)
    if not issubclass(family, FlowMatchingTeacher):
        raise ValueError(f"{folder} holds a {pf.pipeline_class(folder) or 'folder with no pipeline class'}, not a "
                         "flow-matching pipeline")
    return family.load(folder, resolution, FlowOptions(max_sequence_length, tap_block, guidance), dtype=dtype)
