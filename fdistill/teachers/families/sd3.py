"""Stable Diffusion 3 / 3.5 teachers (``StableDiffusion3Pipeline``, Esser et al. 2024) from local diffusers folders:
the MMDiT (``SD3Transformer2DModel``) as a rectified-flow denoiser (``teachers.flow_matching``), CLIP-L, CLIP-G and
T5 text encoders, the VAE with its shift. Guidance is classifier-free, with the encoded empty prompt as the null
condition; the transformer takes 1000 t."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from fdistill.data.conditions import TextCondition
from fdistill.teachers import pipeline_folders as pf
from fdistill.teachers.base import register
from fdistill.teachers.flow_matching import (
    FlowMatchingTeacher,
    FlowOptions,
    FlowTextEncoder,
    FlowTransformerDenoiser,
    check_resolution,
    scheduler_shift,
    token_ids,
)
from fdistill.teachers.latent_t2i import LatentCodec, LatentPipeline

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
              "tokenizer_3", "scheduler")
LAYOUT = ("a diffusers StableDiffusion3Pipeline folder: model_index.json, transformer/, vae/, text_encoder/, "
          "text_encoder_2/, text_encoder_3/, tokenizer/, tokenizer_2/, tokenizer_3/, scheduler/, as save_pretrained "
          "writes")
MAX_SEQUENCE_LENGTH = 256  # the pipeline's T5 default


class SD3Denoiser(FlowTransformerDenoiser):
    """``SD3Transformer2DModel`` as D(x; sigma, TextCondition(embeds, pooled)), called as the SD3 pipeline calls it."""

    def _call(self, x_t: Tensor, t: Tensor, cond: TextCondition) -> Tensor:
        dtype = self._dtype(cond)
        if cond.pooled is None:
            raise ValueError("an SD3 transformer needs the pooled CLIP embedding (TextCondition.pooled)")
        return self.transformer(hidden_states=x_t.to(dtype), encoder_hidden_states=cond.embeds.to(dtype),
                                pooled_projections=cond.pooled.to(dtype), timestep=self.timestep(t).to(dtype),
                                return_dict=False)[0]


class SD3TextEncoder(FlowTextEncoder):
    """SD3's frozen text encoders, as its pipeline's encode_prompt (no attention masks): CLIP-L and CLIP-G
    penultimate hidden states concatenated along features, zero-padded to T5's width, then T5's last hidden state
    appended along the sequence (77 + max_sequence_length tokens); pooled = both projected embeddings concatenated."""

    @property
    def sequence_length(self) -> int:
        return int(self.tokenizers[0].model_max_length) + self.max_sequence_length

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextCondition:
        device = next(self.encoders.parameters()).device
        t5 = self.encoders[2](token_ids(self.tokenizers[2], prompts, self.max_sequence_length, device))[0].float()
        states, pooled = [], []
        for tokenizer, encoder in zip(self.tokenizers[:2], self.encoders[:2]):
            out = encoder(token_ids(tokenizer, prompts, tokenizer.model_max_length, device), output_hidden_states=True)
            states.append(out.hidden_states[-2].float())
            pooled.append(out[0].float())
        clip = torch.cat(states, -1)
        if clip.shape[-1] > t5.shape[-1]:  # the pipeline's F.pad would silently crop
            raise ValueError(f"SD3's CLIP states are {clip.shape[-1]} wide, wider than its T5's {t5.shape[-1]}")
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return TextCondition(torch.cat([clip, t5], 1), torch.cat(pooled, -1))


@register
class SD3Teacher(FlowMatchingTeacher):
    kind, title = "sd3", "SD3"
    preset = "sd35"
    pipeline_classes = ("StableDiffusion3Pipeline",)

    @classmethod
    def load(cls, folder: str | Path, resolution: int | None = None, options: FlowOptions | None = None,
             dtype: torch.dtype = torch.float32) -> LatentPipeline:
        """A local SD3 / SD3.5 folder; ``resolution`` defaults to the transformer's sample_size times the VAE's
        downsampling."""
        options = cls.checked(options)
        diffusers, transformers = pf.libraries()
        folder = pf.open_folder(folder, cls.pipeline_classes, COMPONENTS, LAYOUT)
        shift = scheduler_shift(*cls.scheduler_config(folder))
        transformer = pf.load_network(diffusers.SD3Transformer2DModel, folder / "transformer", dtype)
        codec = LatentCodec.load(diffusers.AutoencoderKL, folder)
        tokenizers = [pf.load_tokenizer(transformers.CLIPTokenizer, folder / "tokenizer"),
                      pf.load_tokenizer(transformers.CLIPTokenizer, folder / "tokenizer_2"),
                      pf.load_tokenizer(transformers.T5Tokenizer, folder / "tokenizer_3")]
        encoders = [pf.load_text_model(transformers.CLIPTextModelWithProjection, folder / "text_encoder"),
                    pf.load_text_model(transformers.CLIPTextModelWithProjection, folder / "text_encoder_2"),
                    pf.load_text_model(transformers.T5EncoderModel, folder / "text_encoder_3")]
        step = codec.downsample * 2
        resolution = int(transformer.config["sample_size"]) * codec.downsample if resolution is None else resolution
        check_resolution(resolution, step, codec.downsample)
        msl = options.max_sequence_length or MAX_SEQUENCE_LENGTH
        text = SD3TextEncoder(tokenizers, encoders, msl)
        config = transformer.config
        denoiser = SD3Denoiser(transformer, resolution // codec.downsample, int(config["in_channels"]),
                               int(config["num_attention_heads"]) * int(config["attention_head_dim"]), text([""]),
                               options.tap_block, shift, int(config["patch_size"]))
        return LatentPipeline(denoiser.eval(), text, codec,
                              cls.record(folder, cls.kind, resolution, msl, denoiser, transformer))

    def call_arguments(self) -> list[str]:
        return ["guidance_scale=1", *super().call_arguments()]
