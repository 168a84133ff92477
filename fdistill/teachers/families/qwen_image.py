"""Qwen-Image teachers (``QwenImagePipeline``, diffusers 0.42) from local diffusers folders: the 20B MMDiT
(``QwenImageTransformer2DModel``, on 2x2-packed latents, all 60 blocks double-stream) as a rectified-flow
denoiser (``teachers.flow_matching``), Qwen2.5-VL-7B as the text encoder, the Qwen-Image VAE (5-D, one frame)
with per-channel latent statistics. The transformer takes t in [0, 1] (it multiplies by 1000 inside; the
pipeline passes timestep / 1000).

Text, as the pipeline's ``_get_qwen_prompt_embeds`` / ``encode_prompt``: each prompt goes into the pipeline's
chat template, Qwen2.5-VL's last hidden state (after its final norm) is taken at the valid tokens, the first 34
(the template's system turn and ``<|im_start|>user\\n``) are dropped, the rest (the prompt and the 5-token
assistant suffix) truncated to ``max_sequence_length`` (512, ``__call__``'s default). The pipeline then pads a
batch to its longest prompt; here every prompt is zero-padded to exactly ``max_sequence_length`` tokens with its
mask (``TextCondition.mask``), so that conditions of different batches concatenate, shard and store as latent
shards. The transformer masks the padding in its joint attention: padded with its mask, a prompt gives the
velocity of the pipeline's unpadded call (mask None) to float rounding (tests/test_qwen_image.py).

Guidance is true classifier-free guidance with the encoded empty prompt as the negative (FastGen's
``empty_string``). fdistill distills from ``teachers.guidance.GuidedDenoiser``: D_null + w (D_c - D_null), i.e.
v_null + w (v_c - v_null), as NVlabs/FastGen's distillation does. QwenImagePipeline additionally rescales the
guided velocity, per packed token (2x2 patch x 16 channels), to the norm of the conditional one; that rescale
is not linear in D, so by default the teacher fdistill distills from differs from the pipeline's guided sampler by
it (on the tiny test model the per-token ratio is 0.96-1.01). ``teacher_options.cfg_rescale: true`` distills
from the pipeline's own rescaled guidance instead (``TrueCFGDenoiser``, equal to the pipeline's step to float
rounding), for teacher and multi-step sampling alike.

Noise levels: the pipeline's scheduler shifts dynamically by image size: t -> e^mu t / (1 + (e^mu - 1) t), with
mu linear in the number of image tokens (``calculate_shift``: 0.5 at 256 tokens, 0.9 at 8192); in EDM terms
that is the static shift sigma -> e^mu sigma. The teacher's own schedule (``distill.sigmas.schedule: teacher``)
uses e^mu at the loaded resolution (2.0008 at 1024 px, 2.3033 at 1328 px). ``shift_terminal`` (0.02) stretches
the pipeline's few-step schedules; with one step it is 0/0 (NaN sigmas).

Export: the teacher's folder with the student's transformer and ``flow_matching.one_step_scheduler_config``'s
scheduler (``shift_terminal`` dropped, one Karras step at sigma_max = t_gen). ``QwenImagePipeline`` passes
sigmas = [1] and the dynamic mu; the exponential shift leaves 1 at 1 and the Karras conversion turns it into
t_gen, so ``pipe(prompt, num_inference_steps=1, true_cfg_scale=1, height=r, width=r, max_sequence_length=L)``
calls the student once at t_gen on its noise latents and returns x_t - t_gen v, ``fdistill sample``'s image for
the same seed. A k-step student: ``flow_matching.steps_scheduler_config`` (no dynamic shift, so the pipeline's mu
is ignored), called with ``sigmas=[t_1, ..., t_k]``: an ode student's image; an sde student's noise comes from
torch's global RNG (the pipeline calls ``scheduler.step`` without its generator).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fdistill.data.conditions import TextCondition
from fdistill.io import read_json_object
from fdistill.teachers import pipeline_folders as pf
from fdistill.teachers.base import register
from fdistill.teachers.flow_matching import (
    FlowMatchingTeacher,
    FlowOptions,
    FlowTextEncoder,
    FlowTransformerDenoiser,
    check_resolution,
    pack_latents,
    scheduler_shift,
    unpack_latents,
)
from fdistill.teachers.guidance import GuidedDenoiser
from fdistill.teachers.latent_t2i import LatentCodec, LatentPipeline

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
LAYOUT = ("a diffusers QwenImagePipeline folder: model_index.json, transformer/, vae/, text_encoder/, tokenizer/, "
          "scheduler/, as save_pretrained writes")
# QwenImagePipeline.__init__ (diffusers/pipelines/qwenimage/pipeline_qwenimage.py): prompt_template_encode,
# prompt_template_encode_start_idx, tokenizer_max_length, default_sample_size.
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")
DROP_TOKENS = 34  # the template's prefix, up to and including "user\n", in the Qwen2 tokenizer's tokens
TOKENIZER_MAX_LENGTH = 1024  # the pipeline tokenizes at most 1024 + 34 tokens; max_sequence_length <= 1024
MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline.__call__'s default
DEFAULT_SAMPLE_SIZE = 128  # latents: the pipeline's default image is 128 x the VAE's 8 = 1024 px
# The pipeline's fallbacks when the scheduler config lacks a key (config.get(key, default)).
SHIFT_DEFAULTS = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}


def _number(config: dict, key: str, where: str) -> float:
    value = config.get(key, SHIFT_DEFAULTS[key])
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        raise ValueError(f"{where}: {key} must be a finite number, got {value!r:.40}")
    return float(value)


def equivalent_shift(config: dict, tokens: int, where: str) -> float:
    """The static shift (sigma -> shift * sigma) equal to the scheduler's at an image of ``tokens`` packed tokens:
    e^mu for the exponential dynamic shift (mu = the pipeline's ``calculate_shift``), mu for the linear one, the
    config's ``shift`` when it shifts statically; every value checked finite (a NaN base_shift would make every
    sigma of the pipeline NaN) and the result positive."""
    if not config.get("use_dynamic_shifting"):
        return scheduler_shift(config, where)
    base_len, max_len = _number(config, "base_image_seq_len", where), _number(config, "max_image_seq_len", where)
    base, top = _number(config, "base_shift", where), _number(config, "max_shift", where)
    if max_len == base_len:
        raise ValueError(f"{where}: max_image_seq_len must differ from base_image_seq_len ({base_len:g}): the "
                         "shift is interpolated between them")
    mu = base + (top - base) * (tokens - base_len) / (max_len - base_len)
    kind = config.get("time_shift_type", "exponential")
    if kind not in ("exponential", "linear"):
        raise ValueError(f"{where}: time_shift_type must be 'exponential' or 'linear', got {kind!r:.40}")
    shift = mu if kind == "linear" else math.exp(mu) if mu < 709 else math.inf  # e^709: about the largest float
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"{where}: the dynamic shift at {tokens} image tokens is {shift!r}, not a finite positive "
                         "number")
    return shift


class QwenLatentCodec(LatentCodec):
    """The Qwen-Image VAE (``AutoencoderKLQwenImage``) as a codec of [B, C, H, W] latents: it takes and returns
    [B, C, T, H, W] video latents, here T = 1 (the axis is added and removed around it); the latents are
    (z - latents_mean) / latents_std per channel, decoded z * std + mean (the pipeline's decoding; its
    img2img encoding). The downsampling is the VAE's ``spatial_compression_ratio``, 2 ** len(temperal_downsample)
    = 8, as the pipeline's ``vae_scale_factor``."""

    per_channel_statistics = True

    def _encode(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        return self.vae.encode(images.unsqueeze(2)).latent_dist.sample(generator).squeeze(2)

    def _decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(z.unsqueeze(2)).sample.squeeze(2)


class QwenImageDenoiser(FlowTransformerDenoiser):
    """``QwenImageTransformer2DModel`` as D(x; sigma, TextCondition(embeds, mask)), called as the pipeline calls
    it: packed latents, ``img_shapes`` = [(1, h/2, w/2)] per sample, t in [0, 1], the text mask (the masked
    padding makes a fixed-length prompt the pipeline's unpadded one). Its blocks return (text, image) states:
    the tap reads the image tokens."""

    def timestep(self, t: Tensor) -> Tensor:
        return t

    def _call(self, x_t: Tensor, t: Tensor, cond: TextCondition) -> Tensor:
        dtype = self._dtype(cond)
        b, _, h, w = x_t.shape
        out = self.transformer(hidden_states=pack_latents(x_t.to(dtype)), encoder_hidden_states=cond.embeds.to(dtype),
                               encoder_hidden_states_mask=cond.mask, timestep=self.timestep(t).to(dtype),
                               img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return unpack_latents(out, h, w)


def rescale_to_conditional(x_t: Tensor, d_cond: Tensor, d_guided: Tensor) -> Tensor:
    """QwenImagePipeline's norm rescale in x0 space: with t v = x_t - D, the guided t v scaled per packed token
    (its 2x2 patch of all channels, the pipeline's ``dim=-1``) to the conditional t v's norm; t cancels."""
    h, w = x_t.shape[-2:]
    cond, guided = pack_latents(x_t - d_cond), pack_latents(x_t - d_guided)
    ratio = cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True)
    return x_t - unpack_latents(guided * ratio, h, w)


class TrueCFGDenoiser(GuidedDenoiser):
    """QwenImagePipeline's true CFG as a denoiser: v = v_null + w (v_c - v_null), rescaled per packed token to
    the norm of v_c (pipeline_qwenimage.py, ``comb_pred * (cond_norm / noise_norm)``), as D = x_t - t v. Off
    (the conditional D) for w <= 1, as the pipeline's ``do_true_cfg``. The teacher's guidance with
    ``teacher_options.cfg_rescale: true`` (``QwenImageTeacher.guided``)."""

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None, return_features: bool = False):
        out = self.net(x, sigma, cond, return_features=return_features)
        if self.scale <= 1.0 or cond is None:
            return out
        d_cond, features = out if return_features else (out, None)
        with torch.no_grad():
            d_null = self.net(x, sigma, self.net.null_condition(cond))
        s = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1, 1, 1, 1)
        x_t = x.to(torch.float32) / (1 + s)
        d = rescale_to_conditional(x_t, d_cond, d_null + self.scale * (d_cond - d_null))
        return (d, features) if return_features else d


class QwenTextEncoder(FlowTextEncoder):
    """Qwen2.5-VL-7B, frozen, as the pipeline's ``encode_prompt`` (see the module's docstring): the template,
    the last hidden state at the valid tokens, the first 34 dropped, at most ``max_sequence_length`` kept, then
    zero-padded to exactly ``max_sequence_length`` with the mask (1 at the kept tokens). Only the language
    model runs (``encoder.model``: its ``last_hidden_state`` is the pipeline's ``hidden_states[-1]``, without
    the vocabulary logits the pipeline computes and drops)."""

    def __init__(self, tokenizer, encoder: nn.Module, max_sequence_length: int) -> None:
        super().__init__([tokenizer], [encoder], max_sequence_length)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextCondition:
        (tokenizer,), (encoder,) = self.tokenizers, self.encoders
        device = next(encoder.parameters()).device
        tokens = tokenizer([TEMPLATE.format(p) for p in prompts], max_length=TOKENIZER_MAX_LENGTH + DROP_TOKENS,
                           padding=True, truncation=True, return_tensors="pt").to(device)
        states = encoder.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        n, length = len(prompts), self.max_sequence_length
        embeds = torch.zeros(n, length, states.shape[-1], device=device)
        mask = torch.zeros(n, length, dtype=torch.long, device=device)
        for i in range(n):
            kept = states[i][tokens.attention_mask[i].bool()][DROP_TOKENS:DROP_TOKENS + length]
            embeds[i, :len(kept)] = kept.float()
            mask[i, :len(kept)] = 1
        return TextCondition(embeds, mask=mask)


@dataclass
class QwenOptions(FlowOptions):
    """A Qwen-Image teacher's options: the flow families' and ``cfg_rescale``."""

    cfg_rescale: bool = False  # guide as the pipeline does (the guided v rescaled per token); False: plain CFG

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.cfg_rescale, bool):
            raise ValueError(f"teacher_options.cfg_rescale must be true or false, got {self.cfg_rescale!r:.40}")


def _check_prefix(tokenizer, where: Path) -> None:
    prefix = TEMPLATE.split("{}")[0]
    n = len(tokenizer(prefix).input_ids)
    if n != DROP_TOKENS:
        warnings.warn(f"{where}: this tokenizer splits the prompt template's system turn into {n} tokens, but "
                      f"QwenImagePipeline drops the first {DROP_TOKENS} (the Qwen2 tokenizer's count); fdistill "
                      "drops the same (as the pipeline does), so the prompts' embeddings start elsewhere",
                      stacklevel=3)


@register
class QwenImageTeacher(FlowMatchingTeacher):
    kind, title = "qwen_image", "Qwen-Image"
    preset = "qwen_image"
    pipeline_classes = ("QwenImagePipeline",)
    Options = QwenOptions

    @classmethod
    def options_of(cls, record: dict) -> QwenOptions:
        return QwenOptions(record["max_sequence_length"], record["tap_block"], None, record.get("cfg_rescale", False))

    @classmethod
    def load(cls, folder: str | Path, resolution: int | None = None, options: QwenOptions | None = None,
             dtype: torch.dtype = torch.float32) -> LatentPipeline:
        """A local Qwen-Image folder; ``resolution`` defaults to the pipeline's 1024 (128 latents x the VAE's 8).
        The cheap parts (scheduler, VAE, tokenizer, the transformer's size) are checked before the two large
        networks load."""
        options = cls.checked(options)
        msl = options.max_sequence_length or MAX_SEQUENCE_LENGTH
        if msl > TOKENIZER_MAX_LENGTH:
            raise ValueError(f"teacher_options.max_sequence_length={msl}: QwenImagePipeline takes at most "
                             f"{TOKENIZER_MAX_LENGTH} text tokens")
        diffusers, transformers = pf.libraries()
        folder = pf.open_folder(folder, cls.pipeline_classes, COMPONENTS, LAYOUT)
        sched, sched_file = cls.scheduler_config(folder)
        codec = QwenLatentCodec.load(diffusers.AutoencoderKLQwenImage, folder)
        resolution = DEFAULT_SAMPLE_SIZE * codec.downsample if resolution is None else resolution
        check_resolution(resolution, codec.downsample * 2, codec.downsample)
        shift = equivalent_shift(sched, (resolution // (codec.downsample * 2)) ** 2, sched_file)
        tokenizer = pf.load_tokenizer(transformers.Qwen2Tokenizer, folder / "tokenizer")
        _check_prefix(tokenizer, folder / "tokenizer")
        config_file = folder / "transformer" / "config.json"
        config = {k: v for k, v in read_json_object(config_file).items() if not k.startswith("_")}
        shape = [config.get(k, d) for k, d in (("patch_size", 2), ("in_channels", 64), ("out_channels", 16))]
        if shape != [2, 4 * codec.channels, codec.channels]:  # the class's defaults: the real model's
            raise ValueError(f"{config_file}: patch_size, in_channels and out_channels {shape} do not fit the VAE's "
                             f"{codec.channels} latent channels in 2 x 2 patches (expected [2, {4 * codec.channels}, "
                             f"{codec.channels}])")
        # its size before the text encoder loads (load_network checks it again, as cheaply: one and two blocks)
        pf.check_size(diffusers.QwenImageTransformer2DModel.from_config, config, str(config_file), dtype)
        encoder = pf.load_text_model(transformers.Qwen2_5_VLForConditionalGeneration, folder / "text_encoder")
        transformer = pf.load_network(diffusers.QwenImageTransformer2DModel, folder / "transformer", dtype)
        config = transformer.config
        text = QwenTextEncoder(tokenizer, encoder, msl)
        denoiser = QwenImageDenoiser(transformer, resolution // codec.downsample, codec.channels,
                                     int(config["num_attention_heads"]) * int(config["attention_head_dim"]),
                                     text([""]), options.tap_block, shift)
        record = {**cls.record(folder, cls.kind, resolution, msl, denoiser, transformer),
                  "cfg_rescale": options.cfg_rescale}
        return LatentPipeline(denoiser.eval(), text, codec, record)

    def guided(self, net: nn.Module, scale: float) -> nn.Module:
        """Plain CFG (FastGen's), or with ``teacher_options.cfg_rescale`` the pipeline's rescaled true CFG."""
        return TrueCFGDenoiser(net, scale) if self.info["network"].get("cfg_rescale") else super().guided(net, scale)

    def call_arguments(self) -> list[str]:
        return ["true_cfg_scale=1", *super().call_arguments()]

