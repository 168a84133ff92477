"""Wan2.1 / Wan2.2 text-to-video teachers (``WanPipeline``, diffusers 0.42) from local diffusers folders: the video
DiT (``WanTransformer3DModel``, patches (1, 2, 2) of 5-D latents [B, C, F, H, W]) as a rectified-flow denoiser
(``teachers.flow_matching``), umT5 as the text encoder, the Wan VAE (``AutoencoderKLWan``) as the codec.

The denoiser (``WanDenoiser``): D(x; sigma) = x_t - t v(x_t, 1000 t) with t = sigma / (1 + sigma),
x_t = x / (1 + sigma), the transformer given 1000 t as the pipeline gives it (its scheduler's timesteps,
sigma_sched x num_train_timesteps) and no text mask (pipeline_wan.py, the denoising loop). Wan2.2-TI2V-5B's folder
sets ``expand_timesteps``: the pipeline then gives one timestep per latent token (``mask[0][0][:, ::2, ::2] * t``
flattened), all equal for text-to-video; the denoiser does the same, so that its D is the pipeline's.

Wan2.2-T2V-A14B has two experts, ``transformer`` for high noise and ``transformer_2`` for low noise: the pipeline
uses ``transformer`` while its timestep t_sched >= ``boundary_ratio`` x num_train_timesteps (0.875 x 1000), else
``transformer_2`` (pipeline_wan.py, the denoising loop); loaded as a teacher, the denoiser routes each sample by its
own 1000 t the same way (the batch split between the two and put back in order, features included). It is distilled
one student per expert, one run each (NVlabs/FastGen issue #22: its maintainer advises distilling the two
separately "by adjusting the time sampling", with noised data rather than backward simulation from noise),
``teacher_options.expert: high | low`` (required for an A14B folder, refused for a one-transformer one;
``distill_settings``):

* the teacher of the run is that expert alone (``transformer`` or ``transformer_2``, loaded without the other): every
  t of the run lies in its range, where the routed pair would call it anyway, so it is the same D at half the
  weights; a t outside the range is refused in one line (``WanDenoiser._check_range``). Generator and fake score are
  copies of it (LoRA and ``text.shared_base`` as for any Wan), the discriminator reads its taps;
* the expert's range: high t >= boundary_ratio (up to t_max 0.999), low t < boundary_ratio (from t_min 0.001), t
  computed in float32 as the denoiser computes it (``in_expert_range``). ``distill.sigmas`` is clipped to it: its
  ``index_range`` cut to the grid levels inside the range (the preset's t grid on [0.001, 0.999] becomes indices
  875..999 for high, 0..874 for low); clipping rather than refusing, so that one preset serves both runs. A range
  left empty is refused;
* the student's levels: explicit ``distill.student_sigmas`` must lie in the range (else one line); by default k
  equal steps of the schedule's unshifted t from the top down towards the range's far end, that end left out
  (``few_step.default_levels`` ending there): high from t_max (or ``generator_sigma``) towards the boundary
  (0.999 / 0.958 / 0.916 for k = 3), low from the last grid level below the boundary (0.874) towards 0.
  ``generator_sigma`` caps the top from above (the preset's 999 is the high top and leaves the low top alone); one
  below the high range is refused. The levels are written into the run's saved config (``student_sigmas``), so that
  ``read_run`` gives them back;
* the low expert's student never starts from pure noise: at sampling its first input is the high stage's output
  moved to its first level. The cheapest correct training input is real latents noised to that level (forward
  noising, FastGen's ``student_input: forward``; the backward simulation's pure-noise start does not exist for it),
  so its first level always gets that (``Distiller(first_input="forward")``), whatever ``distill.student_input``,
  which then picks the input of its later levels as for any k-step student (backward: its own steps from there);
* the pair: ``fdistill export --checkpoint HIGH --checkpoint-low LOW --diffusers OUT`` (``apps.distill
  .load_expert_pair``, ``expert_pair``) checks that the two runs are the high and the low expert of the same folder
  and options with the same sampler, and that their distillation ranges meet at the boundary; it writes one
  WanPipeline with ``transformer`` the high student, ``transformer_2`` the low one, the scheduler config whose
  ``set_timesteps(k_high + k_low)`` gives the concatenated levels (``steps_config``: one level each always, more on
  one Karras / exponential / beta ramp) and a ``boundary_ratio`` that routes each step to its student (the teacher's
  own when the scheduler's float32 timesteps allow, else the midpoint between the two students' levels:
  ``pair_boundary``). ``fdistill sample --checkpoint HIGH --checkpoint-low LOW`` runs the same two stages
  (``few_step.run_steps`` on the routed pair), the pipeline's video for the same seed (tests/test_wan_experts.py).

Noise levels: WanPipeline's UniPCMultistepScheduler (``use_flow_sigmas``, ``flow_shift`` 3.0 for 480p, 5.0 for
720p per diffusers' Wan docs) shifts t -> s t / (1 + (s - 1) t), i.e. sigma -> s sigma; the teacher's own schedule
(``default_sigmas``) is t uniform on 1000 levels in [0.001, 0.999] with sigma = s t / (1 - t). A
FlowMatchEulerDiscreteScheduler folder's static ``shift`` counts the same way.

Text, as the pipeline's ``_get_t5_prompt_embeds``: the prompt cleaned (``clean_prompt``), tokenized to
``max_sequence_length`` (512, ``__call__``'s default) with the mask given to umT5, the last hidden state kept at
the valid tokens and zero after them; the transformer takes no mask.

Guidance: true classifier-free guidance, v_neg + w (v_c - v_neg) (the pipeline's, default w = 5.0), through
``teachers.guidance.GuidedDenoiser`` in x0 space (D is affine in v), the null condition being the encoded negative
prompt: by default the Wan authors' English negative prompt (``NEGATIVE_PROMPT``, which NVlabs/FastGen's Wan
recipes use, ``neg_prompt_wan``); ``teacher_options.negative_prompt: ""`` gives the pipeline's default (its
``negative_prompt or ""``). A14B's separate ``guidance_scale_2`` for the low-noise expert: a routed A14B teacher
(``fdistill sample --teacher``) uses one scale for both; distilled, each expert's run has its own ``guidance``.

Video size: ``teacher_options.num_frames`` (81, the pipeline's), ``height`` and ``width`` (480 x 832); the sample
shape is (C, (frames - 1) / 4 + 1, H / s, W / s) with the VAE's temporal factor 4 and spatial factor s (8; 16 for
Wan2.2-TI2V's 48-channel VAE), frames 4n + 1 and H, W multiples of s x 2 (the transformer's 2 x 2 patches).

Discriminator features: block ``blocks.{i}``'s tokens [B, F' H' W', D] laid out on their grid [B, D, F', H', W']
(F' = F, H' = H / 2, W' = W / 2), read by the heads frame by frame (``networks.heads.map_logits``). The tap's key
is the token grid's shorter spatial side, min(H', W') (30 at 480 x 832): the size the heads' halvings run on, so
that their final kernel fits both sides.
"""

from __future__ import annotations

import dataclasses
import html
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fdistill.core import few_step
from fdistill.data.conditions import TextCondition
from fdistill.data.video import WAN_FPS, WAN_FRAMES, check_frame_count
from fdistill.io import read_json_object
from fdistill.teachers import pipeline_folders as pf
from fdistill.teachers.base import register
from fdistill.teachers.flow_matching import (
    FlowMatchingTeacher,
    FlowOptions,
    FlowTextEncoder,
    FlowTransformerDenoiser,
    flow_times,
    scheduler_shift,
    steps_scheduler_config,
    t_of_sigma,
)
from fdistill.teachers.latent_t2i import LatentCodec, LatentPipeline

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
EXPERTS = ("high", "low")  # teacher_options.expert: Wan2.2-A14B's high-noise or low-noise expert
EXPERT_COMPONENTS = {"high": "transformer", "low": "transformer_2"}  # WanPipeline's names of the two
LAYOUT = ("a diffusers WanPipeline folder: model_index.json, transformer/, vae/, text_encoder/, tokenizer/, "
          "scheduler/ (Wan2.2-A14B: also transformer_2/), as save_pretrained writes")
MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s default
NUM_FRAMES, HEIGHT, WIDTH = WAN_FRAMES, 480, 832  # WanPipeline.__call__'s defaults
# frames per second: WanPipeline's example writes export_to_video(output, "output.mp4", fps=16)
# (diffusers/pipelines/wan/pipeline_wan.py, EXAMPLE_DOC_STRING)
FPS = WAN_FPS
TIMESTEPS = 1000  # the transformer is trained on t in [0, 1000] (the schedulers' num_train_timesteps)
# The Wan authors' English negative prompt: NVlabs/FastGen's PRESET_CONSTANTS["neg_prompt_wan"]
# (fastgen/datasets/wds_dataloaders.py), the same text as the negative_prompt of diffusers' WanPipeline example
# (diffusers/pipelines/wan/pipeline_wan.py, EXAMPLE_DOC_STRING).
NEGATIVE_PROMPT = ("Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, "
                   "static, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, "
                   "extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, "
                   "fused fingers, still picture, messy background, three legs, many people in the background, "
                   "walking backwards")


def clean_prompt(text: str) -> str:
    """WanPipeline's ``prompt_clean``: ftfy's ``fix_text`` when ftfy is installed, HTML entities unescaped twice,
    every run of whitespace one space, stripped."""
    try:
        import ftfy
    except ImportError:
        pass
    else:
        text = ftfy.fix_text(text)
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


def in_expert_range(sigma: Tensor, expert: str, boundary: float) -> Tensor:
    """Whether each EDM level ``sigma`` lies in A14B expert ``expert``'s range: the high-noise expert's where
    1000 t >= boundary_ratio x 1000, the low-noise expert's below, with t = sigma / (1 + sigma) computed in float32
    exactly as ``WanDenoiser`` computes it (so that the clipped levels are the ones it routes to that expert)."""
    s = torch.as_tensor(sigma).to(torch.float32)
    high = TIMESTEPS * t_of_sigma(s) >= boundary * TIMESTEPS
    return high if expert == "high" else ~high


def wan_shift(config: dict, where: str) -> float:
    """The static shift s (sigma -> s sigma) of a Wan folder's scheduler: UniPCMultistepScheduler's ``flow_shift``
    (with ``use_flow_sigmas`` and ``prediction_type: flow_prediction``, as the Wan folders ship it), or
    FlowMatchEulerDiscreteScheduler's ``shift``; dynamic shifting is refused (WanPipeline passes no ``mu``), and so
    is a ``num_train_timesteps`` other than 1000 (the transformer's timestep scale)."""
    if config.get("num_train_timesteps", TIMESTEPS) != TIMESTEPS:
        raise ValueError(f"{where}: num_train_timesteps must be {TIMESTEPS} (Wan's timesteps are 1000 t), got "
                         f"{config.get('num_train_timesteps')!r:.40}")
    if config.get("use_dynamic_shifting"):
        raise ValueError(f"{where}: use_dynamic_shifting needs a mu, which WanPipeline never passes; expected a "
                         "static shift (flow_shift)")
    if config.get("_class_name") == "UniPCMultistepScheduler" or "flow_shift" in config:
        if not config.get("use_flow_sigmas") or config.get("prediction_type") != "flow_prediction":
            raise ValueError(f"{where}: a Wan scheduler must predict flow (use_flow_sigmas: true, prediction_type: "
                             f"flow_prediction), got use_flow_sigmas={config.get('use_flow_sigmas')!r:.20}, "
                             f"prediction_type={config.get('prediction_type')!r:.40}")
        return scheduler_shift({"shift": config.get("flow_shift", 1.0)}, where)
    return scheduler_shift(config, where)


class WanLatentCodec(LatentCodec):
    """The Wan VAE (``AutoencoderKLWan``) as a codec of videos [B, 3, F, H, W] in [-1, 1] <-> latents
    [B, C, (F - 1) / 4 + 1, H / s, W / s]: (z - latents_mean) / latents_std per channel, decoded z * std + mean
    (WanPipeline's decoding). ``temporal``: the VAE's ``scale_factor_temporal`` (4; the first frame is its own
    latent frame, so F must be 4n + 1); ``downsample``: its ``scale_factor_spatial`` (8; Wan2.2-TI2V's 16)."""

    per_channel_statistics = True

    def __init__(self, vae: nn.Module, default_scaling: float = 1.0, where: str = "the VAE config") -> None:
        super().__init__(vae, default_scaling, where)
        temporal = vae.config.get("scale_factor_temporal") or 4
        if not (isinstance(temporal, int) and not isinstance(temporal, bool) and temporal >= 1):
            raise ValueError(f"{where}: scale_factor_temporal must be a positive integer, got {temporal!r:.40}")
        self.temporal = temporal

    def latent_frames(self, frames: int, what: str = "num_frames") -> int:
        """(frames - 1) / temporal + 1, or one line refusing a frame count that is not temporal n + 1."""
        return (check_frame_count(frames, self.temporal, what) - 1) // self.temporal + 1

    def _encode(self, videos: Tensor, generator: torch.Generator | None) -> Tensor:
        if videos.dim() != 5:
            raise ValueError(f"the Wan VAE encodes videos [B, 3, F, H, W], got a tensor of shape {tuple(videos.shape)}")
        self.latent_frames(videos.shape[2], "frames")
        return super()._encode(videos, generator)


class WanPipelineParts(LatentPipeline):
    """A loaded Wan folder (``LatentPipeline``) whose sample is a video latent (C, F', H', W')."""

    def __init__(self, denoiser: nn.Module, text: nn.Module, codec: LatentCodec, kwargs: dict,
                 shape: tuple[int, int, int, int]) -> None:
        super().__init__(denoiser, text, codec, kwargs)
        self.shape = tuple(shape)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.shape


class WanTextEncoder(FlowTextEncoder):
    """umT5, frozen, as WanPipeline's ``_get_t5_prompt_embeds``: the cleaned prompt tokenized to exactly
    ``max_sequence_length`` tokens (padding, truncation, the end token), umT5's last hidden state with the mask,
    kept at the valid tokens and zero after them (the pipeline's ``u[:v]`` then zeros; the tokenizer pads on the
    right). No mask is handed on: the transformer takes none."""

    def __init__(self, tokenizer, encoder: nn.Module, max_sequence_length: int) -> None:
        super().__init__([tokenizer], [encoder], max_sequence_length)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextCondition:
        (tokenizer,), (encoder,) = self.tokenizers, self.encoders
        device = next(encoder.parameters()).device
        tokens = tokenizer([clean_prompt(p) for p in prompts], padding="max_length",
                           max_length=self.max_sequence_length, truncation=True, add_special_tokens=True,
                           return_attention_mask=True, return_tensors="pt")
        mask = tokens.attention_mask.to(device)
        states = encoder(tokens.input_ids.to(device), mask).last_hidden_state.float()
        return TextCondition(torch.where(mask.bool()[..., None], states, torch.zeros_like(states)))


class WanDenoiser(FlowTransformerDenoiser):
    """``WanTransformer3DModel`` as D(x; sigma, TextCondition(embeds)) on latents [B, C, F, H, W], called as
    WanPipeline calls it (the module's docstring): timestep 1000 t (one per token with ``expand_timesteps``), the
    text states without a mask; with ``transformer_2`` (Wan2.2-A14B) each sample goes to the expert its t selects
    (``boundary``: boundary_ratio, in units of t). Taps: ``blocks.{i}`` laid out as [B, D, F', H', W'], keyed by
    min(H', W')."""

    block_lists = ("blocks",)

    def __init__(self, transformer: nn.Module, latent_size: tuple[int, int, int], channels: int, width: int,
                 null: TextCondition | None = None, tap_block: int | None = None, shift: float = 1.0,
                 expand_timesteps: bool = False, transformer_2: nn.Module | None = None,
                 boundary: float | None = None, expert: str | None = None,
                 expert_boundary: float | None = None) -> None:
        frames, h, w = (int(n) for n in latent_size)
        patch = tuple(int(p) for p in transformer.config["patch_size"])
        super().__init__(transformer, h, channels, width, null, tap_block, shift, patch=patch[1])
        self.patch_size, self.latent_frames, self.latent_width = patch, frames, w
        pt, ph, pw = patch
        if frames % pt or w % pw:
            raise ValueError(f"latents of {frames} frames x {h} x {w} do not divide into the transformer's "
                             f"{pt} x {ph} x {pw} patches")
        self.expand_timesteps = bool(expand_timesteps)
        if (transformer_2 is None) != (boundary is None):
            raise ValueError("a second expert (transformer_2) needs its boundary (boundary_ratio), and a boundary its "
                             "expert")
        self.transformer_2, self.boundary = transformer_2, boundary
        if (expert is None) != (expert_boundary is None) or expert not in (None, *EXPERTS) or (
                expert is not None and transformer_2 is not None):
            raise ValueError("one expert alone (expert: high or low) needs its boundary (boundary_ratio) and no "
                             "second transformer")
        self.expert, self.expert_boundary = expert, expert_boundary
        key = min(h // ph, w // pw)  # the token grid's shorter spatial side (module docstring)
        self._taps = {key: self.block_names[self.tap_block]}
        self._tap_channels = {key: int(width)}
        self._init_taps()
        self._grid: tuple[int, int, int] | None = None  # the token grid of the running call

    def blocks(self) -> list[nn.Module]:
        experts = [self.transformer] + ([self.transformer_2] if self.transformer_2 is not None else [])
        return [e.get_submodule(name) for e in experts for name in self.block_names]

    def _token_grid(self, n: int) -> tuple[int, ...]:
        """(F', H', W') of the running call (row-major, as the transformer flattens its patch grid)."""
        if self._grid is None or math.prod(self._grid) != n:
            raise RuntimeError(f"{n} tokens do not fill the token grid {self._grid} of this call")
        return self._grid

    def _call(self, x_t: Tensor, t: Tensor, cond: TextCondition, expert: nn.Module | None = None) -> Tensor:
        dtype = self._dtype(cond)
        b, _, f, h, w = x_t.shape
        pt, ph, pw = self.patch_size
        self._grid = (f // pt, h // ph, w // pw)
        timestep = self.timestep(t).to(torch.float32)  # the scheduler's float timesteps, whatever the weights' dtype
        if self.expand_timesteps:  # one timestep per latent token (the pipeline's mask[0][0][:, ::2, ::2] * t)
            timestep = timestep[:, None].expand(b, math.prod(self._grid))
        expert = self.transformer if expert is None else expert
        return expert(hidden_states=x_t.to(dtype), timestep=timestep, encoder_hidden_states=cond.embeds.to(dtype),
                      return_dict=False)[0]

    def _check_range(self, t: Tensor) -> None:
        """Refuse, in one line, a t outside the range of the one expert this denoiser holds (the pipeline would
        give it to the other expert)."""
        high = self.timestep(t) >= self.expert_boundary * TIMESTEPS
        wrong = high != (self.expert == "high")
        if bool(wrong.any()):
            side = ">=" if self.expert == "high" else "<"
            raise ValueError(f"this Wan denoiser is Wan2.2-A14B's {self.expert}-noise expert alone "
                             f"(teacher_options.expert={self.expert}): it takes t {side} {self.expert_boundary:g} "
                             f"(boundary_ratio), got t = {float(t[wrong][0]):.6g}")

    def paired(self, low: WanDenoiser, boundary: float) -> WanDenoiser:
        """This (high-noise) network and ``low``'s as one two-expert denoiser routed at ``boundary`` (as the
        pipeline routes ``transformer`` / ``transformer_2``): the two students of an A14B pair."""
        null = TextCondition(self.null_embeds) if hasattr(self, "null_embeds") else None
        return WanDenoiser(self.transformer, (self.latent_frames, self.img_resolution, self.latent_width),
                           self.img_channels, next(iter(self._tap_channels.values())), null, self.tap_block,
                           self.shift, self.expand_timesteps, low.transformer, boundary)

    def _velocity(self, x_t: Tensor, t: Tensor, cond, x: Tensor, return_features: bool | str
                  ) -> tuple[Tensor | None, dict]:
        """One expert's v and features, or with two experts each sample's from the expert WanPipeline would use at
        its timestep: ``transformer`` while 1000 t >= boundary_ratio x 1000, else ``transformer_2``; a mixed batch
        is split, run as two calls and put back in order."""
        if self.transformer_2 is None:
            if self.expert is not None:
                self._check_range(t)
            return super()._velocity(x_t, t, cond, x, return_features)
        self._dtype(cond)
        high = self.timestep(t) >= self.boundary * TIMESTEPS
        groups = [(e, idx) for e, idx in ((self.transformer, high.nonzero().flatten()),
                                          (self.transformer_2, (~high).nonzero().flatten())) if len(idx)]
        if len(groups) == 1:
            expert = groups[0][0]
            return self._run_tapped(expert, lambda: self._call(x_t, t, cond, expert), x, return_features)
        outs = [self._run_tapped(e, lambda e=e, i=i: self._call(x_t[i], t[i], cond[i], e), x, return_features)
                for e, i in groups]
        inverse = torch.argsort(torch.cat([i for _, i in groups]))
        v = None if outs[0][0] is None else torch.cat([o[0] for o in outs])[inverse]
        return v, {k: torch.cat([o[1][k] for o in outs])[inverse] for k in outs[0][1]}


@dataclass
class WanOptions(FlowOptions):
    """A Wan teacher's options: the flow families' (``max_sequence_length`` 512, ``tap_block``) and the video's size
    and the negative prompt."""

    negative_prompt: str = NEGATIVE_PROMPT  # the CFG null condition; "" gives WanPipeline's default (the empty prompt)
    num_frames: int = NUM_FRAMES  # frames of a video: 4n + 1 (the pipeline's 81: 21 latent frames)
    height: int = HEIGHT  # pixels, a multiple of the VAE's factor x 2 (16; Wan2.2-TI2V: 32)
    width: int = WIDTH
    expert: str | None = None  # Wan2.2-A14B: the expert whose student is distilled, high or low (module docstring)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.expert is not None and self.expert not in EXPERTS:
            raise ValueError(f"teacher_options.expert must be null, high or low (Wan2.2-A14B's transformer or "
                             f"transformer_2), got {self.expert!r:.40}")
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"teacher_options.negative_prompt must be a string (\"\" for the pipeline's empty "
                             f"prompt), got {self.negative_prompt!r:.40}")
        for name in ("num_frames", "height", "width"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1 << 16):
                raise ValueError(f"teacher_options.{name} must be a positive integer, got {value!r:.40}")


def _check_class(d: Path, expected: str) -> None:
    """Refuse component folder ``d`` whose config names another class than ``expected``."""
    name = read_json_object(d / "config.json").get("_class_name")
    if name is not None and name != expected:
        raise ValueError(f"{d / 'config.json'} describes a {str(name)[:80]}, not a {expected}")


@register
class WanTeacher(FlowMatchingTeacher):
    kind, title = "wan", "Wan"
    preset = "wan"
    pipeline_classes = ("WanPipeline",)
    Options = WanOptions
    lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]  # WanAttention's projections (self- and cross-attention)
    video_fps = FPS

    @classmethod
    def options_of(cls, record: dict) -> WanOptions:
        return WanOptions(record["max_sequence_length"], record["tap_block"], None, record["negative_prompt"],
                          record["num_frames"], record["height"], record["width"], record.get("expert"))

    @classmethod
    def load(cls, folder: str | Path, resolution: int | None = None, options: WanOptions | None = None,
             dtype: torch.dtype = torch.float32) -> LatentPipeline:
        """A local Wan folder at ``teacher_options``' video size (``resolution`` is refused: a video's size is
        its height, width and frames). The cheap parts (model_index, scheduler, VAE, tokenizer, the transformers'
        configs and sizes) are checked before the large networks load."""
        options = cls.checked(options)
        if resolution is not None:
            raise ValueError(f"text.resolution={resolution!r:.40}: a Wan teacher's video size is "
                             "teacher_options.height, width and num_frames")
        msl = options.max_sequence_length or MAX_SEQUENCE_LENGTH
        diffusers, transformers = pf.libraries()
        folder = pf.open_folder(folder, cls.pipeline_classes, COMPONENTS, LAYOUT)
        index = read_json_object(folder / "model_index.json")
        boundary, expand = index.get("boundary_ratio"), index.get("expand_timesteps", False)
        where = str(folder / "model_index.json")
        if boundary is not None and not (isinstance(boundary, (int, float)) and not isinstance(boundary, bool)
                                         and 0 < boundary <= 1):
            raise ValueError(f"{where}: boundary_ratio must be null or a number in (0, 1], got {boundary!r:.40}")
        if not isinstance(expand, bool):
            raise ValueError(f"{where}: expand_timesteps must be true or false, got {expand!r:.40}")
        if boundary is not None:  # Wan2.2-A14B: the low-noise expert is required
            pf.open_folder(folder, cls.pipeline_classes, ("transformer_2",), LAYOUT)
        elif options.expert is not None:
            raise ValueError(f"teacher_options.expert={options.expert}: {folder} has one transformer (no "
                             "transformer_2, boundary_ratio null); the option picks one of Wan2.2-A14B's two experts, "
                             "expected null here")
        shift = wan_shift(*cls.scheduler_config(folder))
        _check_class(folder / "vae", "AutoencoderKLWan")
        codec = WanLatentCodec.load(diffusers.AutoencoderKLWan, folder)
        frames = codec.latent_frames(options.num_frames, "teacher_options.num_frames")
        step = codec.downsample * 2
        for name in ("height", "width"):
            if getattr(options, name) % step:
                raise ValueError(f"teacher_options.{name}={getattr(options, name)}: a Wan video's height and width "
                                 f"are multiples of {step} pixels (VAE x {codec.downsample}, 2 x 2 patches)")
        size = (frames, options.height // codec.downsample, options.width // codec.downsample)
        tokenizer = pf.load_tokenizer(transformers.T5Tokenizer, folder / "tokenizer")
        experts = ["transformer"] + (["transformer_2"] if boundary is not None else [])
        if options.expert is not None:  # one expert alone: the teacher of its student's run (module docstring)
            experts = [EXPERT_COMPONENTS[options.expert]]
        for name in experts:
            _check_class(folder / name, "WanTransformer3DModel")
            config_file = folder / name / "config.json"
            config = {k: v for k, v in read_json_object(config_file).items() if not k.startswith("_")}
            shape = [list(config.get("patch_size", [1, 2, 2])), config.get("in_channels", 16),
                     config.get("out_channels", 16)]
            if shape != [[1, 2, 2], codec.channels, codec.channels]:  # the class's defaults: the real models'
                raise ValueError(f"{config_file}: patch_size, in_channels and out_channels {shape} do not fit the "
                                 f"VAE's {codec.channels} latent channels in 1 x 2 x 2 patches (expected [[1, 2, 2], "
                                 f"{codec.channels}, {codec.channels}])")
            pf.check_size(diffusers.WanTransformer3DModel.from_config, config, str(config_file), dtype)
        encoder = pf.load_text_model(transformers.UMT5EncoderModel, folder / "text_encoder")
        networks = [pf.load_network(diffusers.WanTransformer3DModel, folder / name, dtype) for name in experts]
        config = networks[0].config
        text = WanTextEncoder(tokenizer, encoder, msl)
        routed = boundary is not None and options.expert is None
        denoiser = WanDenoiser(networks[0], size, codec.channels,
                               int(config["num_attention_heads"]) * int(config["attention_head_dim"]),
                               text([options.negative_prompt]), options.tap_block, shift, expand,
                               networks[1] if routed else None, boundary if routed else None, options.expert,
                               boundary if options.expert else None)
        record = {**cls.record(folder, cls.kind, None, msl, denoiser, networks[0]),
                  "num_frames": options.num_frames, "height": options.height, "width": options.width,
                  "negative_prompt": options.negative_prompt, "expand_timesteps": expand, "boundary_ratio": boundary,
                  "shift": shift, "expert": options.expert}
        return WanPipelineParts(denoiser.eval(), text, codec, record, (codec.channels, *size))

    @property
    def experts(self) -> int:
        """The transformers of the teacher's folder: 2 for Wan2.2-A14B, else 1."""
        return 1 if self.info["network"]["boundary_ratio"] is None else 2

    @property
    def expert(self) -> str | None:
        """``teacher_options.expert``: the A14B expert this teacher is (high or low), None for the routed pair and
        one-transformer folders."""
        return self.info["network"].get("expert")

    def check_config(self, cfg) -> None:
        self._require_expert()
        super().check_config(cfg)

    def _require_expert(self) -> None:
        """Refuse distilling an A14B folder without ``teacher_options.expert``, in one line."""
        if self.experts > 1 and self.expert is None:
            raise ValueError(f"{self.source} is a two-expert Wan2.2 pipeline (transformer for high noise, "
                             f"transformer_2 for low, switched at boundary_ratio "
                             f"{self.info['network']['boundary_ratio']}): it is distilled one student per expert; "
                             "expected teacher_options.expert=high or teacher_options.expert=low")

    def distill_settings(self, distill):
        """(the DistillConfig of a run of this teacher, the student's first input: ``Distiller(first_input=)``).
        One transformer: ``distill`` as it is, pure noise. An A14B expert (module docstring, "Wan2.2-A14B"): the
        distillation levels clipped to the expert's range of t, the student's levels written out (its default split
        or its checked ``student_sigmas``), and for the low expert a first input of real latents noised to its first
        level. Mistakes are refused in one line."""
        if self.experts == 1:
            return super().distill_settings(distill)
        self._require_expert()
        expert, b = self.expert, float(self.info["network"]["boundary_ratio"])
        side = f"t {'>=' if expert == 'high' else '<'} {b:g}"
        where = f"the {expert}-noise expert's range, {side} (teacher_options.expert={expert}, boundary_ratio {b:g})"
        sigmas = distill.sigmas.resolve(self.denoiser.default_sigmas())
        grid = sigmas.grid
        lo, hi = sigmas.index_range
        index = torch.arange(len(grid))
        keep = in_expert_range(grid, expert, b) & (index >= lo) & (index <= hi)
        if not keep.any():
            ends = sorted(float(t_of_sigma(grid[i])) for i in (lo, hi))
            raise ValueError(f"distill.sigmas: its levels (index_range [{lo}, {hi}], t in [{ends[0]:.6g}, "
                             f"{ends[1]:.6g}]) have none in {where}; expected an index_range reaching it")
        kept = index[keep]
        sigmas = dataclasses.replace(sigmas, index_range=(int(kept.min()), int(kept.max())))  # contiguous: monotone
        if distill.student_sigmas:
            levels = [float(x) for x in distill.student_sigmas]
            bad = [x for x, ok in zip(levels, in_expert_range(torch.tensor(levels), expert, b)) if not ok]
            if bad:
                raise ValueError(f"distill.student_sigmas={levels}: {bad[0]:.6g} (t = {t_of_sigma(bad[0]):.6g}) is "
                                 f"outside {where}; expected levels in it")
        else:
            largest = float(sigmas.support.max())
            g = distill.generator_sigma
            top = largest if g is None else min(float(g), largest)
            if not bool(in_expert_range(torch.tensor([top]), expert, b)[0]):
                raise ValueError(f"distill.generator_sigma={g:g} (t = {t_of_sigma(g):.6g}) is below {where}; "
                                 "expected null (its largest level) or a level in it")
            end = b / (1 - b) if expert == "high" else 0.0  # the boundary's sigma, or 0
            levels = few_step.default_levels(sigmas, distill.student_steps or 1, top, end)
        distill = dataclasses.replace(distill, sigmas=sigmas, student_sigmas=levels, student_steps=None,
                                      generator_sigma=None)
        return distill, "forward" if expert == "low" else "noise"

    def expert_pair(self, low: WanTeacher, high_net: nn.Module, low_net: nn.Module, high_student, low_student,
                    high_sigmas, low_sigmas, runs: tuple[str, str]):
        """(the two-expert student: ``high_net`` and ``low_net`` routed at boundary_ratio, the concatenated
        StudentSteps) of this high-expert run's teacher and ``low``'s. Refused in one line: runs of other teachers
        or teacher options, not the high and the low expert, samplers that differ, or training ranges that do not
        meet at the boundary (each run's distillation levels must reach the boundary from its side)."""
        mine, theirs = self.info["network"], low.info["network"]
        if low.kind != self.kind or mine.get("expert") is None or theirs.get("expert") is None:
            run = runs[0] if mine.get("expert") is None else runs[1]
            raise ValueError(f"--checkpoint-low pairs the students of Wan2.2-A14B's two experts; {run} is not an "
                             "expert's run (expected a distill run with teacher_options.expert=high or low)")
        if (mine["expert"], theirs["expert"]) != ("high", "low"):
            raise ValueError(f"--checkpoint {runs[0]} is the {mine['expert']}-noise expert's run and --checkpoint-low "
                             f"{runs[1]} the {theirs['expert']}-noise expert's; expected the high expert's run, then "
                             "the low expert's")
        for key in ("folder", "boundary_ratio", "num_frames", "height", "width", "max_sequence_length",
                    "negative_prompt", "shift", "expand_timesteps"):
            if mine.get(key) != theirs.get(key):
                raise ValueError(f"{runs[0]} and {runs[1]} were distilled from different teachers ({key} "
                                 f"{str(mine.get(key))[:80]!r} against {str(theirs.get(key))[:80]!r}); expected the "
                                 "same Wan2.2-A14B folder and teacher_options but the expert")
        if high_student.sampler != low_student.sampler:
            raise ValueError(f"{runs[0]}'s student steps with the {high_student.sampler} sampler and {runs[1]}'s with "
                             f"the {low_student.sampler}; expected the same distill.student_sampler")
        b = float(mine["boundary_ratio"])
        for run, expert, student, sigmas in ((runs[0], "high", high_student, high_sigmas),
                                             (runs[1], "low", low_student, low_sigmas)):
            if not bool(in_expert_range(torch.tensor(student.sigmas), expert, b).all()):
                raise ValueError(f"{run}'s student levels {list(student.sigmas)} leave the {expert}-noise expert's "
                                 f"range of t (boundary_ratio {b:g}); expected a run distilled by this fdistill")
            inside = in_expert_range(sigmas.grid, expert, b).nonzero().flatten()
            t = t_of_sigma(sigmas.grid.double())
            nearest = int(inside[t[inside].argmin() if expert == "high" else t[inside].argmax()])
            lo, hi = sigmas.index_range
            if not lo <= nearest <= hi:
                edge = t[lo:hi + 1].min() if expert == "high" else t[lo:hi + 1].max()
                raise ValueError(f"{run}'s distillation levels stop at t = {float(edge):.6g}, short of the boundary "
                                 f"{b:g} (its distill.sigmas.index_range {[lo, hi]}): the two experts' ranges do not "
                                 "meet; expected each run's levels to reach the boundary")
        pair = high_net.paired(low_net, b)
        return pair, few_step.StudentSteps(tuple(high_student.sigmas) + tuple(low_student.sigmas), high_student.sampler)

    def open_data(self, cfg, device: torch.device, dataset=None):
        """Latent shards of videos (``fdistill prepare-latents`` layout: per-sample latents of this teacher's
        sample shape and umT5 embeddings of its text length); captioned videos are not read yet."""
        from fdistill.data.latent_shards import LATENTS, LatentShards

        if not (Path(cfg.data) / "index.json").is_file():
            raise ValueError(f"data={cfg.data}: a Wan teacher trains on latent shards of videos (a folder with "
                             f"index.json holding latents {self.sample_shape}); captioned videos are not read yet")
        got = LatentShards(cfg.data).tensors.get(LATENTS, ((None,),))[0]
        if tuple(got) != tuple(self.sample_shape):
            raise ValueError(f"latent shards {cfg.data} hold latents of shape {tuple(got)}, but this Wan teacher's "
                             f"videos are {tuple(self.sample_shape)} (teacher_options num_frames "
                             f"{self.info['network']['num_frames']}, height {self.info['network']['height']}, width "
                             f"{self.info['network']['width']})")
        return super().open_data(cfg, device, dataset)

    def export(self, generator: nn.Module, out, student=None) -> str:
        """The student as a WanPipeline folder (``FlowMatchingTeacher.export``: its transformer and a
        FlowMatchEulerDiscreteScheduler). One step: at t_gen; the pipeline's one-step call with guidance_scale=1
        returns the student's latents for the same seed (tests/test_wan.py, tests/test_wan_cli.py). k steps: an
        ode student where a scheduler config alone gives its levels (``steps_config``), since WanPipeline's call
        takes no ``sigmas=``; an sde student is refused, since WanPipeline calls ``scheduler.step`` without its
        generator (pipeline_wan.py, the denoising loop): the steps' fresh noise would not be fdistill's.
        Wan2.2-A14B: the two experts' students together (``generator``: ``apps.distill.load_expert_pair``'s routed
        pair; ``export_pair``); one expert's alone is refused."""
        student = self.export_steps(generator, student)
        if self.experts > 1 and getattr(generator, "transformer_2", None) is None:
            raise ValueError(f"a Wan2.2-A14B {self.expert or ''}-noise expert's student exports with the other "
                             "expert's, as one WanPipeline: fdistill export --checkpoint HIGH_RUN --checkpoint-low "
                             "LOW_RUN --diffusers OUT (expected both runs)")
        self._refuse_sde(student)
        if self.experts > 1:
            return self.export_pair(generator, Path(out), student)
        if student.steps > 1:
            self.steps_config(student)  # refuses levels no config reproduces, before anything is written
        return super().export(generator, out, student)

    def high_steps(self, student) -> int:
        """How many of a pair's levels are the high-noise student's (those in its range of t)."""
        b = float(self.info["network"]["boundary_ratio"])
        return int(in_expert_range(torch.tensor(student.sigmas), "high", b).sum())

    def pair_boundary(self, student, config: dict) -> float:
        """A boundary_ratio at which WanPipeline's call of the exported scheduler (``config``) routes each of the
        pair's steps to its student: its timesteps (float32, as ``set_timesteps`` makes them) >= boundary_ratio x
        1000 for the high student's levels, below it for the low student's (pipeline_wan.py, the denoising loop).
        The teacher's own boundary_ratio when it does, else the midpoint between the two students' levels; one
        line when neither does."""
        diffusers, _ = pf.libraries()
        b, high = float(self.info["network"]["boundary_ratio"]), self.high_steps(student)
        with pf.quiet():
            scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
        scheduler.set_timesteps(student.steps)
        times = flow_times(student)
        want = torch.arange(student.steps) < high
        for ratio in (b, (times[high - 1] + times[high]) / 2):
            if all(bool(t >= ratio * TIMESTEPS) == bool(w) for t, w in zip(scheduler.timesteps, want)):
                return ratio
        raise ValueError(f"the exported scheduler's timesteps {[round(float(t), 4) for t in scheduler.timesteps]} "
                         f"cannot be split at one boundary_ratio into the high student's {high} steps and the low "
                         f"student's {student.steps - high}; expected levels further from the boundary {b:g}")

    def export_pair(self, pair: WanDenoiser, out: Path, student) -> str:
        """The two experts' students as one WanPipeline folder: ``transformer`` the high-noise student,
        ``transformer_2`` the low-noise one, the FlowMatchEulerDiscreteScheduler whose ``set_timesteps(k)`` gives
        the concatenated levels (``steps_config``), ``boundary_ratio`` routing each step to its student
        (``pair_boundary``); written whole or not at all (``pipeline_folders.write_pipeline``)."""
        try:
            config = self.steps_config(student)
        except ValueError:
            high = self.high_steps(student)
            raise ValueError(f"the pair's {student.steps} levels t = {flow_times(student)} ({high} of the high "
                             f"student, {student.steps - high} of the low) cannot be exported: WanPipeline's call "
                             "takes no sigmas=, and no FlowMatchEulerDiscreteScheduler config reproduces them (any "
                             "two levels, or more in Karras / exponential / beta spacing); expected one level each, "
                             "or distill.student_sigmas of both runs on one such ramp (or sample the pair with "
                             "fdistill sample --checkpoint-low)") from None
        ratio = self.pair_boundary(student, config)
        diffusers, _ = pf.libraries()
        with pf.quiet():
            scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
        pf.write_pipeline(self.info["network"]["folder"], out, {"transformer": pair.transformer,
                                                                "transformer_2": pair.transformer_2}, scheduler,
                          {"boundary_ratio": ratio})
        return f"wrote {out}: {self.pair_call(out, student, ratio)}"

    def pair_call(self, folder: Path, student, ratio: float) -> str:
        """The exported pair's WanPipeline call and what it runs."""
        times, high = flow_times(student), self.high_steps(student)
        args = ", ".join(["prompt", f"num_inference_steps={student.steps}", *self.call_arguments()])
        return (f"{self.pipeline_classes[0]}.from_pretrained('{folder}')({args}) runs the high-noise student "
                f"(transformer) at t = {times[:high]} and the low-noise student (transformer_2) at t = {times[high:]} "
                f"(boundary_ratio {ratio:.9g}; levels set by the scheduler config alone, Euler steps) and gives "
                "fdistill sample's video for the same seed (fdistill sample --checkpoint HIGH_RUN --checkpoint-low "
                f"LOW_RUN; export_to_video(frames, fps={FPS}) writes it as sample's MP4)")

    def steps_config(self, student) -> dict:
        """A FlowMatchEulerDiscreteScheduler config (``flow_matching.steps_scheduler_config``'s steps) whose
        ``set_timesteps(k)``, WanPipeline's only call of it (pipeline_wan.py, "Prepare timesteps"), gives the
        student's t_1 > ... > t_k: with sigma_max = t_1 and sigma_min = t_k in the config, the Karras (rho 7),
        exponential or beta (0.6, 0.6) conversion (diffusers 0.42, scheduling_flow_match_euler_discrete.py) puts k
        levels between them; any two levels are the ends of each, more must be spaced as one of them (to 1e-6).
        None fits: a ValueError in one line."""
        diffusers, _ = pf.libraries()
        times = flow_times(student)
        base = {**steps_scheduler_config({"num_train_timesteps": TIMESTEPS}, student.sampler),
                "sigma_max": times[0], "sigma_min": times[-1]}
        for name in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            config = {**base, name: True}
            with pf.quiet():  # "sigma_max / sigma_min are not expected": the conversions read them
                scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
            scheduler.set_timesteps(student.steps)
            got = scheduler.sigmas[:-1].double()
            if torch.allclose(got, torch.tensor(times, dtype=torch.float64), rtol=1e-6, atol=0):
                return config
        raise ValueError(f"a {student.steps}-step Wan student cannot be exported yet: WanPipeline's call takes no "
                         f"sigmas=, and no FlowMatchEulerDiscreteScheduler config reproduces its levels t = {times} "
                         "(any two levels, or more in Karras / exponential / beta spacing); export a one- or two-step "
                         "student, or sample it with fdistill sample")

    @staticmethod
    def _refuse_sde(student) -> None:
        """One line refusing a k-step sde student's export (``export``; also its LoRA file's scheduler)."""
        if student.steps > 1 and student.sampler != "ode":
            raise ValueError(f"a {student.steps}-step Wan student cannot be exported yet with its {student.sampler} "
                             "sampler: WanPipeline calls scheduler.step without its generator, so the fresh noise of "
                             "each step would come from torch's global RNG, not fdistill sample's; an ode student "
                             "(distill.student_sampler=ode) exports where its levels allow")

    def student_scheduler(self, teacher_folder: Path, student):
        if student.steps == 1:
            return super().student_scheduler(teacher_folder, student)
        self._refuse_sde(student)
        diffusers, _ = pf.libraries()
        with pf.quiet():
            return diffusers.FlowMatchEulerDiscreteScheduler.from_config(self.steps_config(student))

    def pipeline_call(self, folder: Path, student) -> str:
        """WanPipeline's call that gives ``fdistill sample``'s video (frames [F, H, W, 3] in [0, 1]; MP4 at 16 fps:
        ``diffusers.utils.export_to_video(frames, fps=16)``) for the same seed."""
        name, video = self.pipeline_classes[0], f"fdistill sample's video for the same seed (export_to_video(frames, " \
            f"fps={FPS}) writes it as sample's MP4)"
        args = ", ".join(["prompt", f"num_inference_steps={student.steps}", *self.call_arguments()])
        call = f"{name}.from_pretrained('{folder}')({args})"
        if student.steps == 1:
            return (f"{call} evaluates the student once at t = {float(t_of_sigma(student.sigmas[0])):.6g} and gives "
                    f"{video} (diffusers' warning that the scheduler's sigma_max is ignored is wrong: its Karras "
                    "conversion reads it)")
        return (f"{call} runs the student's t = {flow_times(student)} (set by the scheduler config alone; Euler "
                f"steps, its ode sampler) and gives {video}")

    def export_scheduler(self, teacher_folder: Path) -> dict:
        """A FlowMatchEulerDiscreteScheduler config with the teacher's shift (WanPipeline takes one; the folder's
        own is a UniPCMultistepScheduler)."""
        return {"num_train_timesteps": TIMESTEPS, "shift": self.info["network"]["shift"]}

    def call_arguments(self) -> list[str]:
        n = self.info["network"]
        return ["guidance_scale=1", f"height={n['height']}", f"width={n['width']}", f"num_frames={n['num_frames']}",
                f"max_sequence_length={n['max_sequence_length']}"]
