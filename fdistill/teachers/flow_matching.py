"""Flow-matching transformer teachers from local diffusers folders: Stable Diffusion 3 / 3.5
(``StableDiffusion3Pipeline``, Esser et al. 2024) and FLUX.1 dev / schnell (``FluxPipeline``), their DiT as a
denoiser D(x, sigma, cond), their frozen text encoders and VAE.

Rectified flow (diffusers' ``FlowMatchEulerDiscreteScheduler``) noises latents as x_t = (1 - t) x0 + t eps and the
transformer predicts v = eps - x0, so x0 = x_t - t v. Dividing by 1 - t gives EDM's x = x0 + sigma eps with

    sigma = t / (1 - t),   t = sigma / (1 + sigma),   x_t = x / (1 + sigma),
    D(x; sigma) = x_t - t v(x_t, t),

(c_skip = c_in = 1 / (1 + sigma), c_out = -sigma / (1 + sigma)); D is affine in v, so classifier-free guidance of
D (``teachers.guidance.GuidedDenoiser``) is guidance of v. The range is t in [0.001, 0.999] (NVlabs/FastGen's
``max_t``), sigma in [0.001 / 0.999, 999]; t = 1 is sigma = inf. Timestep units: SD3's transformer takes 1000 t,
FLUX's takes t (it multiplies by 1000 inside, as the FLUX pipeline passes timestep / 1000).

Guidance: SD3 uses classifier-free guidance with the encoded empty prompt as its null condition. FLUX.1-dev is
guidance-distilled: its "guidance" is one pass with the embedded value g (``guidance``, default 3.5, the FLUX
pipeline's and FastGen's), fed alike to teacher, generator and fake score (FastGen's choice; SenseFlow feeds the
students no guidance input); classifier-free guidance is refused for FLUX (run with guidance=1). schnell has no
guidance input.

Noise levels: train with ``distill.sigmas.schedule=flow`` (t uniform on a grid in [t_min, t_max], sigma =
shift t / (1 - t)); a VP schedule (scaled_linear) tops out at sigma 14.6, t = 0.936, and is warned about.

Export (``export_flow_pipeline``): the teacher's folder with the student's transformer and a one-step
FlowMatchEulerDiscreteScheduler (Karras sigmas with sigma_max = t_gen, so one step runs from t_gen to 0);
``StableDiffusion3Pipeline`` / ``FluxPipeline.from_pretrained(out)(prompt, num_inference_steps=1)`` with CFG off
then returns the student's sample for the same latent noise. The settings a run opens its teacher with
(``text.max_sequence_length``, ``text.flux_guidance``, ``text.tap_block``) reach ``load_flow_pipeline`` through
``FlowMatchingTeacher.open(..., text=cfg.text)`` and are rebuilt from the checkpoint's record.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from fdistill.core.protocols import DenoiserDefaults
from fdistill.data.conditions import TextCondition
from fdistill.io import read_json_object, temp_name
from fdistill.networks.attention import twice_differentiable
from fdistill.networks.taps import FeatureTaps
from fdistill.teachers.diffusers_unet import _StopForward
from fdistill.teachers.stable_diffusion import (
    LatentCodec,
    StableDiffusion,
    StableDiffusionTeacher,
    _modules,
    _quiet,
    copy_regular_files,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a stray hub call fails fast instead of hanging

FAMILIES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
COMPONENTS = {
    "sd3": ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
            "tokenizer_3", "scheduler"),
    "flux": ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
}
LAYOUT = ("a diffusers StableDiffusion3Pipeline or FluxPipeline folder: model_index.json, transformer/, vae/, "
          "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/ (SD3 also text_encoder_3/, "
          "tokenizer_3/), as save_pretrained writes")
T_MIN, T_MAX = 0.001, 0.999  # NVlabs/FastGen's range of t for rectified-flow teachers
MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}  # the pipelines' T5 defaults
FLUX_GUIDANCE = 3.5  # the FLUX pipeline's default embedded guidance (and FastGen's)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def sigma_of_t(t: Tensor | float) -> Tensor | float:
    """sigma = t / (1 - t): the EDM noise level of rectified-flow time t."""
    return t / (1 - t)


def t_of_sigma(sigma: Tensor | float) -> Tensor | float:
    """t = sigma / (1 + sigma)."""
    return sigma / (1 + sigma)


# -- FLUX's 2x2 latent packing (as FluxPipeline._pack_latents / _unpack_latents) -----------------------------------
def pack_latents(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: each 2x2 patch one token, row-major over the patch grid."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """The inverse of ``pack_latents``: [B, (h/2)(w/2), 4C] -> [B, C, h, w] (h, w: the latent size)."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> Tensor:
    """FLUX's positions of the packed tokens, [(h/2)(w/2), 3]: (0, row, col) on the packed grid."""
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


class FlowTransformerDenoiser(DenoiserDefaults, FeatureTaps):
    """An SD3 (``SD3Transformer2DModel``) or FLUX (``FluxTransformer2DModel``) transformer as a latent-space
    denoiser D(x; sigma, TextCondition), x of shape [B, C, r, r] (the VAE's latents; FLUX's are packed here).

    Discriminator features: the image tokens a transformer block outputs (its ``output[1]``), [B, N, D] reshaped
    onto the token grid [B, D, r/2, r/2], captured by a transient forward hook; ``features()`` stops the forward
    after that block. The tap is one block (``tap_block``) of the concatenated list (SD3's ``transformer_blocks``;
    FLUX's ``transformer_blocks`` then ``single_transformer_blocks``), by default the middle one (num_blocks // 2,
    FastGen's default: FLUX.1's single block 9 of 19 + 38). Its key is the token-grid resolution, the one
    encoder resolution (``disc_resolutions=[mid]``).

    ``sigma_data`` only sets the fake score's ``edm`` loss weight 1/sigma^2 + 1/sigma_data^2; with 1 it meets the
    weight that gives v unit weight, (1 + sigma)^2 / sigma^2 = 1/sigma^2 + 2/sigma + 1, at both ends of the range
    (FastGen trains flow fake scores on x0-MSE, ``fake_score_weighting=none``).
    """

    sigma_data = 1.0

    def __init__(self, transformer: nn.Module, family: str, resolution: int, guidance: float | None = None,
                 null_embeds: Tensor | None = None, null_pooled: Tensor | None = None,
                 tap_block: int | None = None) -> None:
        super().__init__()
        if family not in COMPONENTS:
            raise ValueError(f"unknown flow-matching family {family!r}; expected sd3 or flux")
        cfg = transformer.config
        self.transformer, self.family, self.label_dim = transformer, family, 0
        self.img_resolution = int(resolution)  # the latent side
        self.patch = 2 if family == "flux" else int(cfg["patch_size"])
        if self.img_resolution % self.patch:
            raise ValueError(f"latent size {self.img_resolution} is not a multiple of the transformer's "
                             f"{self.patch} x {self.patch} patches")
        self.img_channels = int(cfg["in_channels"]) // 4 if family == "flux" else int(cfg["in_channels"])
        self.guidance_embeds = bool(cfg.get("guidance_embeds", False)) if family == "flux" else False
        if self.guidance_embeds:
            self.guidance = float(FLUX_GUIDANCE if guidance is None else guidance)
        elif guidance is not None:
            raise ValueError(f"guidance={guidance} given, but this {family} transformer has no guidance embedding "
                             "(FLUX.1-schnell, SD3: use classifier-free guidance, cfg guidance, for SD3)")
        else:
            self.guidance = None
        for name, t in (("null_embeds", null_embeds), ("null_pooled", null_pooled)):
            if t is not None:  # SD3's unconditional condition: the encoded empty prompt
                self.register_buffer(name, t.detach().float(), persistent=False)
        self.sigma_min = float(sigma_of_t(T_MIN))
        self.sigma_max = float(sigma_of_t(T_MAX))
        self.blocks = [f"transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks))]
        if family == "flux":
            self.blocks += [f"single_transformer_blocks.{i}" for i in range(len(transformer.single_transformer_blocks))]
        tap_block = len(self.blocks) // 2 if tap_block is None else tap_block
        if not (isinstance(tap_block, int) and 0 <= tap_block < len(self.blocks)):
            raise ValueError(f"tap_block must be a block index in [0, {len(self.blocks) - 1}], got {tap_block!r}")
        self.tap_block = tap_block
        grid = self.img_resolution // self.patch
        self._taps = {grid: self.blocks[tap_block]}
        self._tap_channels = {grid: int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])}
        self._init_taps()

    def prior_std(self, sigma: float) -> float:
        """1 + sigma: the generator's input x = (1 + sigma) z is x_t = z, pure unit-variance noise, at
        t = sigma / (1 + sigma) (0.999 at sigma_max; FastGen feeds 0.999 z at t = 0.999, the same x_t
        up to 0.1%)."""
        return 1 + sigma

    def null_condition(self, cond: TextCondition) -> TextCondition:
        """SD3's unconditional condition for classifier-free guidance: the encoded empty prompt."""
        if self.family == "flux":
            raise ValueError("FLUX.1 teachers are guidance-distilled: no classifier-free guidance (set guidance=1; "
                             "FLUX.1-dev's embedded guidance g is the denoiser's `guidance`)")
        if not hasattr(self, "null_embeds"):
            raise ValueError("this SD3 denoiser has no empty-prompt embedding (load it with load_flow_pipeline)")
        n = len(cond)
        return TextCondition(self.null_embeds.to(cond.embeds).expand(n, -1, -1),
                             self.null_pooled.to(cond.pooled).expand(n, -1))

    def timestep(self, t: Tensor) -> Tensor:
        """What the transformer is given for flow time t: 1000 t for SD3, t for FLUX."""
        return t if self.family == "flux" else 1000 * t

    def _call(self, x_t: Tensor, t: Tensor, cond: TextCondition) -> Tensor:
        """v(x_t, t) as the diffusers pipeline calls the transformer, [B, C, r, r] in the transformer's dtype."""
        if not isinstance(cond, TextCondition) or cond.pooled is None:
            raise ValueError(f"a {self.family} transformer is conditioned on text (a TextCondition with embeds and "
                             f"pooled), got {type(cond).__name__}")
        dtype = next(self.transformer.parameters()).dtype
        embeds, pooled, tt = cond.embeds.to(dtype), cond.pooled.to(dtype), self.timestep(t).to(dtype)
        if self.family == "sd3":
            return self.transformer(hidden_states=x_t.to(dtype), encoder_hidden_states=embeds,
                                    pooled_projections=pooled, timestep=tt, return_dict=False)[0]
        h, w = x_t.shape[-2:]
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((x_t.shape[0],), self.guidance, device=x_t.device, dtype=dtype)
        out = self.transformer(hidden_states=pack_latents(x_t.to(dtype)), encoder_hidden_states=embeds,
                               pooled_projections=pooled, timestep=tt, guidance=guidance,
                               img_ids=image_ids(h, w, x_t.device, dtype),
                               txt_ids=torch.zeros(embeds.shape[1], 3, device=x_t.device, dtype=dtype),
                               return_dict=False)[0]
        return unpack_latents(out, h, w)

    def _tap_output(self, output) -> Tensor:
        """A block's image tokens [B, N, D] as a map [B, D, sqrt N, sqrt N] (row-major token grid)."""
        tokens = output[1] if isinstance(output, tuple) else output
        b, n, d = tokens.shape
        r = int(round(n**0.5))
        return tokens.transpose(1, 2).reshape(b, d, r, n // r)

    def forward(self, x: Tensor, sigma: Tensor | float, cond=None, return_features: bool | str = False):
        """D(x; sigma), float32 [B, C, r, r]; with ``return_features``: ``(D, {grid: [B, D, g, g]})``; with
        ``return_features="only"``: ``(None, features)``, stopping after the tapped block."""
        x = x.to(torch.float32)
        s = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1)
        if s.shape[0] == 1 and x.shape[0] != 1:
            s = s.expand(x.shape[0])
        t = t_of_sigma(s)
        x_t = x / (1 + s).reshape(-1, 1, 1, 1)
        features: dict[int, Tensor] = {}
        wanted = self._wanted_taps(bool(return_features))
        if return_features == "only" and not wanted:
            return None, features
        handles = []

        def tap(name: str):
            def hook(module, args, output) -> None:
                features[wanted[name]] = self._tap_output(output).to(torch.float32)
                if return_features == "only" and len(features) == len(wanted):
                    raise _StopForward
            return hook

        twice = bool(wanted) and torch.is_grad_enabled() and x.requires_grad  # R1: a double backward
        try:
            for name in wanted:
                handles.append(self.transformer.get_submodule(name).register_forward_hook(tap(name)))
            with twice_differentiable() if twice else contextlib.nullcontext():
                v = self._call(x_t, t, cond)
        except _StopForward:
            v = None
        finally:
            for h in handles:
                h.remove()
        if v is None or return_features == "only":
            return None, features
        d = x_t - t.reshape(-1, 1, 1, 1) * v.to(torch.float32)
        return (d, features) if return_features else d

    def features(self, x: Tensor, sigma: Tensor | float, cond=None) -> dict[int, Tensor]:
        """The discriminator's features alone, running the transformer only up to the tapped block."""
        return self.forward(x, sigma, cond, return_features="only")[1]


class FlowTextEncoder(nn.Module):
    """The frozen text encoders, prompts -> TextCondition(embeds, pooled), as the pipelines' encode_prompt (no
    attention masks). SD3: CLIP-L and CLIP-G (``CLIPTextModelWithProjection``) penultimate hidden states
    concatenated along features, zero-padded to T5's width, then T5's last hidden state appended along the
    sequence (77 + max_sequence_length tokens); pooled = both projected embeddings concatenated. FLUX: embeds =
    T5's last hidden state, pooled = CLIP-L's pooler output."""

    def __init__(self, family: str, tokenizers: list, encoders: list[nn.Module], max_sequence_length: int) -> None:
        super().__init__()
        self.family, self.tokenizers, self.max_sequence_length = family, tokenizers, int(max_sequence_length)
        self.encoders = nn.ModuleList(encoders).eval().requires_grad_(False)

    def _ids(self, tokenizer, prompts: list[str], length: int, device) -> Tensor:
        return tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids.to(device)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextCondition:
        device = next(self.encoders.parameters()).device
        clip_ids = [self._ids(tok, prompts, tok.model_max_length, device) for tok in self.tokenizers[:-1]]
        t5 = self.encoders[-1](self._ids(self.tokenizers[-1], prompts, self.max_sequence_length, device))[0].float()
        if self.family == "flux":
            pooled = self.encoders[0](clip_ids[0], output_hidden_states=False).pooler_output
            return TextCondition(t5, pooled.float())
        states, pooled = [], []
        for ids, encoder in zip(clip_ids, self.encoders[:2]):
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2].float())
            pooled.append(out[0].float())
        clip = torch.cat(states, -1)
        if clip.shape[-1] > t5.shape[-1]:  # the pipeline's F.pad would silently crop
            raise ValueError(f"SD3's CLIP states are {clip.shape[-1]} wide, wider than its T5's {t5.shape[-1]}")
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return TextCondition(torch.cat([clip, t5], 1), torch.cat(pooled, -1))


class FlowPipeline(StableDiffusion):
    """A loaded SD3 / FLUX folder: ``denoiser`` (FlowTransformerDenoiser), ``text`` (FlowTextEncoder), ``codec``
    (LatentCodec with the shift); ``kwargs`` is its JSON record. The same container as Stable Diffusion's."""


def _check_layout(folder: Path, family: str) -> None:
    for name in COMPONENTS[family]:
        d = folder / name
        if name.startswith("tokenizer"):
            if (d / "tokenizer.json").is_file() or (d / "spiece.model").is_file():
                continue
            t5 = name == ("tokenizer_3" if family == "sd3" else "tokenizer_2")
            needed = [d / "tokenizer.json"] if t5 else [d / "vocab.json", d / "merges.txt"]
        elif name == "scheduler":
            needed = [d / "scheduler_config.json"]
        else:
            needed = [d / "config.json"]
            weights = [p for p in d.glob("*") if p.suffix in (".safetensors", ".bin")] if d.is_dir() else []
            if not weights and not list(d.glob("*.safetensors.index.json")):
                needed.append(d / ("diffusion_pytorch_model.safetensors" if name in ("transformer", "vae")
                                   else "model.safetensors"))
        missing = [p for p in needed if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} lacks {missing[0].relative_to(folder)}; expected {LAYOUT}")


def load_flow_pipeline(folder: str | Path, resolution: int | None = None, max_sequence_length: int | None = None,
                       guidance: float | None = None, tap_block: int | None = None,
                       dtype: torch.dtype = torch.float32) -> FlowPipeline:
    """Load a local SD3 / FLUX pipeline folder with no network access. ``resolution`` (pixels) defaults to the
    pipeline's (SD3: the transformer's sample_size times the VAE's downsampling; FLUX: 128 times it, 1024);
    ``max_sequence_length``: T5 tokens (SD3 256, FLUX 512); ``guidance``: FLUX.1-dev's embedded guidance."""
    diffusers, transformers = _modules()
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"flow-matching pipeline folder not found: {folder}; expected {LAYOUT}")
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} lacks model_index.json; expected {LAYOUT}")
    class_name = read_json_object(folder / "model_index.json").get("_class_name")
    if not isinstance(class_name, str) or class_name not in FAMILIES:
        raise ValueError(f"{folder} holds a {str(class_name)[:80]}, not a StableDiffusion3Pipeline or FluxPipeline")
    family = FAMILIES[class_name]
    _check_layout(folder, family)
    msl = MAX_SEQUENCE_LENGTH[family] if max_sequence_length is None else max_sequence_length
    if not (isinstance(msl, int) and not isinstance(msl, bool) and 1 <= msl <= 512):
        raise ValueError(f"max_sequence_length must be an integer in [1, 512] (T5 tokens), got {msl!r:.40}")
    local = dict(local_files_only=True)
    low_mem = dict(low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
    model = diffusers.SD3Transformer2DModel if family == "sd3" else diffusers.FluxTransformer2DModel
    with _quiet():
        try:
            transformer = model.from_pretrained(folder / "transformer", torch_dtype=dtype, **local, **low_mem)
            vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32, **local, **low_mem)
            if family == "sd3":
                tokenizers = [transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer", **local),
                              transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer_2", **local),
                              transformers.T5Tokenizer.from_pretrained(folder / "tokenizer_3", **local)]
                encoders = [transformers.CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder", **local),
                            transformers.CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2",
                                                                                     **local),
                            transformers.T5EncoderModel.from_pretrained(folder / "text_encoder_3", **local)]
            else:
                tokenizers = [transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer", **local),
                              transformers.T5Tokenizer.from_pretrained(folder / "tokenizer_2", **local)]
                encoders = [transformers.CLIPTextModel.from_pretrained(folder / "text_encoder", **local),
                            transformers.T5EncoderModel.from_pretrained(folder / "text_encoder_2", **local)]
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
            raise ValueError(f"{folder} is not a loadable {class_name}: {' '.join(str(e).split())[:300]}") from None
    codec = LatentCodec(vae, default_scaling=1.0)
    step = codec.downsample * 2  # both DiTs work on 2 x 2 patches of latents
    if resolution is None:
        size = transformer.config.get("sample_size") if family == "sd3" else 128
        resolution = int(size) * codec.downsample
    if not (isinstance(resolution, int) and not isinstance(resolution, bool) and resolution > 0
            and resolution % step == 0):
        raise ValueError(f"resolution must be a positive multiple of {step} pixels (VAE x {codec.downsample}, "
                         f"2 x 2 patches), got {resolution!r:.40}")
    text = FlowTextEncoder(family, tokenizers, encoders, msl)
    null = text([""]) if family == "sd3" else None
    denoiser = FlowTransformerDenoiser(transformer, family, resolution // codec.downsample, guidance,
                                       None if null is None else null.embeds, None if null is None else null.pooled,
                                       tap_block)
    kwargs = {"folder": str(folder.resolve()), "family": family, "resolution": resolution,
              "max_sequence_length": msl, "guidance": denoiser.guidance, "tap_block": denoiser.tap_block,
              "transformer_config": {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")},
              "img_resolution": denoiser.img_resolution, "img_channels": denoiser.img_channels, "label_dim": 0}
    json.dumps(kwargs)  # checkpoint metadata must be JSON
    return FlowPipeline(denoiser.eval(), text, codec, kwargs)


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


def export_flow_pipeline(generator: FlowTransformerDenoiser, teacher_folder: str | Path, out: str | Path,
                         sigma_gen: float | None = None) -> Path:
    """Write the one-step generator as a diffusers pipeline folder: the teacher's folder with the generator's
    transformer and a FlowMatchEulerDiscreteScheduler that takes one step from t_gen = sigma_gen / (1 + sigma_gen)
    (``one_step_scheduler_config``; sigma_gen defaults to the generator's sigma_max, t_gen 0.999). fdistill's
    generator input (1 + sigma_gen) z is x_t = z at t_gen, the pipeline's own noise latents, so
    ``StableDiffusion3Pipeline`` / ``FluxPipeline.from_pretrained(out)(prompt, num_inference_steps=1)`` (CFG off)
    returns fdistill's one-step sample for the same latent noise."""
    diffusers, _ = _modules()
    teacher_folder, out = Path(teacher_folder), Path(out)
    sigma = float(generator.sigma_max if sigma_gen is None else sigma_gen)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma_gen must be a positive finite noise level, got {sigma_gen!r:.40}")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; give a new folder for the exported pipeline")
    tmp = temp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    copy_regular_files(teacher_folder, tmp, leave_out={"transformer", "scheduler"})
    generator.transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
    sched = read_json_object(teacher_folder / "scheduler" / "scheduler_config.json")
    with _quiet():  # diffusers' "sigma_max is not expected and will be ignored": it is read (see above)
        one_step = diffusers.FlowMatchEulerDiscreteScheduler.from_config(
            one_step_scheduler_config(sched, t_of_sigma(sigma)))
    one_step.save_pretrained(tmp / "scheduler")
    index = json.loads((tmp / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()
    os.rename(tmp, out)
    return out


def pipeline_call(kwargs: dict, folder: str | Path) -> str:
    """The call of the pipeline exported to ``folder`` that gives fdistill's one-step sample (CFG off;
    FLUX.1-dev's embedded guidance as trained; the trained size and T5 length)."""
    r, family = kwargs["resolution"], kwargs["family"]
    args = ["prompt", "num_inference_steps=1"]
    if family == "sd3":
        args.append("guidance_scale=1")
    elif kwargs.get("guidance") is not None:
        args.append(f"guidance_scale={kwargs['guidance']:g}")
    args += [f"height={r}", f"width={r}", f"max_sequence_length={kwargs['max_sequence_length']}"]
    name = "StableDiffusion3Pipeline" if family == "sd3" else "FluxPipeline"
    return f"{name}.from_pretrained('{folder}')({', '.join(args)})"


def add_lora(net: FlowTransformerDenoiser, rank: int, name: str = "default") -> None:
    """LoRA adapters (Hu et al. 2022) of ``rank`` on the transformer's attention projections (image and text
    streams), through peft; only they are trained. ``name``: the peft adapter's."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ImportError("text.lora_rank needs the peft package: pip install peft") from None
    net.transformer.requires_grad_(False)
    net.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                           target_modules=LORA_TARGETS), adapter_name=name)


def text_options(folder: str | Path, text) -> dict:
    """``load_flow_pipeline``'s options from a ``TextConfig``: T5 length, tap block, and the embedded guidance
    when the folder's transformer has a guidance embedding (``guidance_embeds``; ignored for SD3 and schnell)."""
    config = Path(folder) / "transformer" / "config.json"
    embeds = config.is_file() and bool(read_json_object(config).get("guidance_embeds", False))
    return {"max_sequence_length": text.max_sequence_length, "tap_block": text.tap_block,
            "guidance": float(text.flux_guidance) if embeds else None}


class FlowMatchingTeacher(StableDiffusionTeacher):
    """An SD3 / SD3.5 / FLUX.1 pipeline folder as a teacher; ``info`` = {"precond": "flow_matching", "network":
    the pipeline's record (folder, family, resolution, T5 length, guidance, tap, transformer config)}. Data,
    LoRA and student loading as Stable Diffusion's (a latent text-to-image teacher too)."""

    kind = "flow_matching"
    backbone = "transformer"
    lora = staticmethod(add_lora)

    @classmethod
    def open(cls, folder: str | Path, resolution: int | None = None, text=None, **options) -> FlowMatchingTeacher:
        """``load_flow_pipeline(folder, resolution, **options)``; ``text`` (a ``TextConfig``, the run's ``text:``)
        gives the options not given: its max_sequence_length, tap_block and, for a transformer with a guidance
        embedding (FLUX.1-dev), flux_guidance."""
        if text is not None:
            options = {**text_options(folder, text), **options}
        return cls._make(load_flow_pipeline(folder, resolution, **options), str(folder))

    @classmethod
    def from_info(cls, info: dict, where: str = "the checkpoint") -> FlowMatchingTeacher:
        kw = info["network"]
        if not Path(kw["folder"]).is_dir():
            raise FileNotFoundError(f"{where} was distilled from {kw['folder']}, which is not there any more: its "
                                    "text encoders and VAE are needed to sample (move the folder back)")
        pipe = load_flow_pipeline(kw["folder"], kw["resolution"], kw["max_sequence_length"], kw["guidance"],
                                  kw["tap_block"])
        return cls._make(pipe, kw["folder"])

    @classmethod
    def _make(cls, pipe: FlowPipeline, source: str) -> FlowMatchingTeacher:
        return cls(pipe.denoiser, pipe.latent_shape, {"precond": cls.kind, "network": pipe.kwargs}, source,
                   text=pipe.text, codec=pipe.codec, sigma_range=(pipe.denoiser.sigma_min, pipe.denoiser.sigma_max),
                   extra={"sd": pipe})

    @property
    def pipeline(self) -> FlowPipeline:
        return self.extra["sd"]

    def open_data(self, cfg, device: torch.device, dataset=None):
        """As Stable Diffusion's: latent shards or captioned images (``TextToImageData``, duck-typed on the
        pipeline's ``codec`` and ``text``); shards' text embeddings must be as long as this teacher's (SD3: 77
        CLIP + max_sequence_length T5 tokens; FLUX: the T5 tokens), as its null condition and prompts are."""
        data = super().open_data(cfg, device, dataset)
        if data.latents:
            kw = self.info["network"]
            clip = self.text.tokenizers[0].model_max_length if kw["family"] == "sd3" else 0
            want = kw["max_sequence_length"] + clip
            got = data.sampler.shards.tensors.get("embeds", ((None,),))[0][0]
            if got != want:
                raise ValueError(f"latent shards {cfg.data} hold {got}-token text embeddings, but this {kw['family']} "
                                 f"teacher's are {want} (text.max_sequence_length={kw['max_sequence_length']}): "
                                 "prepare the latents with the same text.max_sequence_length")
        return data

    def prepare_students(self, students: list[nn.Module], cfg) -> None:
        if self.info["network"]["family"] == "flux" and getattr(cfg, "guidance", 1.0) != 1.0:
            raise ValueError(f"guidance={cfg.guidance}: FLUX.1 teachers are guidance-distilled, not guided by CFG; "
                             "set guidance=1 (FLUX.1-dev's embedded guidance is the teacher's `guidance`)")
        schedule = cfg.distill.sigmas.schedule
        if schedule != "flow":
            warnings.warn(f"distill.sigmas.schedule={schedule} with a flow-matching teacher; its noise levels are "
                          "t in [0.001, 0.999], sigma = t / (1 - t): use distill.sigmas.schedule=flow", stacklevel=2)
        super().prepare_students(students, cfg)

    def export(self, generator: nn.Module, out, sigma_gen: float | None = None) -> str:
        """``export_flow_pipeline`` into ``out``; the line names the pipeline call that reproduces the student."""
        kw = self.info["network"]
        sigma = float(generator.sigma_max if sigma_gen is None else sigma_gen)
        out = export_flow_pipeline(generator, kw["folder"], out, sigma)
        return (f"wrote {out}: {pipeline_call(kw, out)} evaluates the "
                f"student once at t = {float(t_of_sigma(sigma)):.6g} and gives fdistill sample's image for the same "
                "seed (diffusers' warning that the scheduler's sigma_max is ignored is wrong: its Karras "
                "conversion reads it)")
