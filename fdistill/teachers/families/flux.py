"""FLUX.1 dev / schnell teachers (``FluxPipeline``) from local diffusers folders: the transformer
(``FluxTransformer2DModel``, on 2x2-packed latents) as a rectified-flow denoiser (``teachers.flow_matching``), CLIP-L
(pooled) and T5 text encoders, the VAE with its shift. The transformer takes t (it multiplies by 1000 inside, as the
pipeline passes timestep / 1000).

Guidance: FLUX.1-dev is guidance-distilled: its "guidance" is one pass with the embedded value g
(``teacher_options.guidance``, default 3.5, the pipeline's and FastGen's), fed alike to teacher, generator and fake
score (FastGen's choice; SenseFlow feeds the students no guidance input); classifier-free guidance is refused (run
with guidance=1). schnell has no guidance input.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from fdistill.data.conditions import TextCondition
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
    token_ids,
    unpack_latents,
)
from fdistill.teachers.latent_t2i import LatentCodec, LatentPipeline

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
LAYOUT = ("a diffusers FluxPipeline folder: model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/, "
          "tokenizer/, tokenizer_2/, scheduler/, as save_pretrained writes")
MAX_SEQUENCE_LENGTH = 512  # the pipeline's T5 default
GUIDANCE = 3.5  # the FLUX pipeline's default embedded guidance (and FastGen's)


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> Tensor:
    """FLUX's positions of the packed tokens, [(h/2)(w/2), 3]: (0, row, col) on the packed grid."""
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


class FluxDenoiser(FlowTransformerDenoiser):
    """``FluxTransformer2DModel`` as D(x; sigma, TextCondition(T5 embeds, CLIP pooled)); ``guidance``: FLUX.1-dev's
    embedded guidance (None for schnell). Its blocks: the double-stream ``transformer_blocks``, then the
    single-stream ``single_transformer_blocks``."""

    block_lists = ("transformer_blocks", "single_transformer_blocks")

    def __init__(self, *args, guidance: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.guidance = guidance

    def null_condition(self, cond: TextCondition) -> TextCondition:
        raise ValueError("FLUX.1 teachers are guidance-distilled: no classifier-free guidance (set guidance=1; "
                         "FLUX.1-dev's embedded guidance is teacher_options.guidance)")

    def timestep(self, t: Tensor) -> Tensor:
        return t

    def _call(self, x_t: Tensor, t: Tensor, cond: TextCondition) -> Tensor:
        dtype = self._dtype(cond)
        if cond.pooled is None:
            raise ValueError("a FLUX transformer needs the pooled CLIP embedding (TextCondition.pooled)")
        h, w = x_t.shape[-2:]
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((x_t.shape[0],), self.guidance, device=x_t.device, dtype=dtype)
        out = self.transformer(hidden_states=pack_latents(x_t.to(dtype)), encoder_hidden_states=cond.embeds.to(dtype),
                               pooled_projections=cond.pooled.to(dtype), timestep=self.timestep(t).to(dtype),
                               guidance=guidance, img_ids=image_ids(h, w, x_t.device, dtype),
                               txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=x_t.device, dtype=dtype),
                               return_dict=False)[0]
        return unpack_latents(out, h, w)


class FluxTextEncoder(FlowTextEncoder):
    """FLUX's frozen text encoders, as its pipeline's encode_prompt (no attention mask): embeds = T5's last hidden
    state (max_sequence_length tokens), pooled = CLIP-L's pooler output."""

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextCondition:
        device = next(self.encoders.parameters()).device
        t5 = self.encoders[1](token_ids(self.tokenizers[1], prompts, self.max_sequence_length, device))[0].float()
        clip = token_ids(self.tokenizers[0], prompts, self.tokenizers[0].model_max_length, device)
        pooled = self.encoders[0](clip, output_hidden_states=False).pooler_output
        return TextCondition(t5, pooled.float())


@register
class FluxTeacher(FlowMatchingTeacher):
    kind, title = "flux", "FLUX.1"
    preset = "flux"
    pipeline_classes = ("FluxPipeline",)
    guidance_input = True  # FLUX.1-dev's (schnell's transformer has none: refused in ``load``)

    @classmethod
    def load(cls, folder: str | Path, resolution: int | None = None, options: FlowOptions | None = None,
             dtype: torch.dtype = torch.float32) -> LatentPipeline:
        """A local FLUX.1 folder; ``resolution`` defaults to 1024 (128 times the VAE's downsampling)."""
        options = cls.checked(options)
        diffusers, transformers = pf.libraries()
        folder = pf.open_folder(folder, cls.pipeline_classes, COMPONENTS, LAYOUT)
        shift = scheduler_shift(*cls.scheduler_config(folder))
        transformer = pf.load_network(diffusers.FluxTransformer2DModel, folder / "transformer", dtype)
        codec = LatentCodec.load(diffusers.AutoencoderKL, folder)
        tokenizers = [pf.load_tokenizer(transformers.CLIPTokenizer, folder / "tokenizer"),
                      pf.load_tokenizer(transformers.T5Tokenizer, folder / "tokenizer_2")]
        encoders = [pf.load_text_model(transformers.CLIPTextModel, folder / "text_encoder"),
                    pf.load_text_model(transformers.T5EncoderModel, folder / "text_encoder_2")]
        config = transformer.config
        embedded = bool(config.get("guidance_embeds", False))
        if options.guidance is not None and not embedded:
            raise ValueError(f"teacher_options.guidance={options.guidance} given, but this FLUX transformer has no "
                             "guidance embedding (FLUX.1-schnell)")
        guidance = float(options.guidance or GUIDANCE) if embedded else None
        resolution = 128 * codec.downsample if resolution is None else resolution
        check_resolution(resolution, codec.downsample * 2, codec.downsample)
        msl = options.max_sequence_length or MAX_SEQUENCE_LENGTH
        text = FluxTextEncoder(tokenizers, encoders, msl)
        denoiser = FluxDenoiser(transformer, resolution // codec.downsample, int(config["in_channels"]) // 4,
                                int(config["num_attention_heads"]) * int(config["attention_head_dim"]), None,
                                options.tap_block, shift, guidance=guidance)
        return LatentPipeline(denoiser.eval(), text, codec,
                              cls.record(folder, cls.kind, resolution, msl, denoiser, transformer, guidance))

    def check_config(self, cfg) -> None:
        super().check_config(cfg)
        if getattr(cfg, "guidance", 1.0) != 1.0:
            raise ValueError(f"guidance={cfg.guidance}: FLUX.1 teachers are guidance-distilled, not guided by CFG; "
                             "set guidance=1 (FLUX.1-dev's embedded guidance is teacher_options.guidance)")

    def call_arguments(self) -> list[str]:
        guidance = self.info["network"].get("guidance")
        return [*([f"guidance_scale={guidance:g}"] if guidance is not None else []), *super().call_arguments()]
