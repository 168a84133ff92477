"""SANA teachers (``SanaPipeline``, Xie et al. 2025: SANA 600M / 1600M, SANA 1.5) from local diffusers folders: the
linear-attention DiT (``SanaTransformer2DModel``) as a rectified-flow denoiser (``teachers.flow_matching``), the
Gemma-2 text encoder with its attention mask, the DC-AE (``AutoencoderDC``, 32x, 32 channels) as the codec.

Everything is computed as ``SanaPipeline.__call__`` computes it, so that the exported pipeline reproduces
fdistill's samples:

- Prompts: lower-cased and stripped (the pipeline's ``clean_caption=False`` preprocessing). The pipeline's *complex
  human instruction* (CHI, its ``__call__`` default, read from the installed ``SanaPipeline``) is prepended; the
  text is tokenized right-padded to ``n_CHI + max_sequence_length - 2`` tokens (n_CHI counting <bos>), Gemma-2
  encodes it with its attention mask, and <bos> plus the last ``max_sequence_length - 1`` positions are kept, for
  the states and the mask alike. The kept window holds the prompt's own tokens (and padding), not the CHI's, but
  their states attend to the CHI, so it must be run: fdistill always does, as the pipeline's default call does
  (a pipeline called with ``complex_human_instruction=None`` would see other embeddings). The condition is
  ``TextCondition(embeds [B, L, 2304], mask=[B, L])``, L = ``max_sequence_length`` (300, the pipeline's).
- The null condition (CFG) is the pipeline's negative prompt "" as it encodes it: without the CHI, ``L`` tokens,
  ``[<bos>, <pad>, ...]`` with mask ``[1, 0, ...]``. Guidance is true CFG (``guidance``, the pipeline's 4.5),
  in x0 space, which equals the pipeline's CFG of the velocity (x0 is affine in v).
- The transformer is called as the pipeline calls it: latents, Gemma states, ``encoder_attention_mask`` (the 0/1
  mask, turned into a cross-attention bias inside), ``timestep`` = 1000 t * ``timestep_scale`` (1 for SANA) as a
  float32 tensor; it predicts v = eps - x0, so D = x_t - t v (``FlowTransformerDenoiser``). fdistill feeds the
  continuous 1000 t. The folders' own scheduler (DPM-Solver++ with flow sigmas) feeds ``int64(1000 sigma)``, a
  truncation by less than one unit that its update ignores (it uses the float sigma; on the tiny random test
  teacher its one-step sample, fed 999 at sigma 0.99967, is 4e-2 from fdistill's); a FlowMatchEuler scheduler feeds
  the float, as fdistill.
- Noise levels: the teacher's shift is its scheduler's ``flow_shift`` (3 for the 512 / 1024 px models): sigma =
  3 t / (1 - t) over t in [0.001, 0.999]. The top level t = 0.999 shifts to 3 * 0.999 / (1 + 2 * 0.999) =
  0.99967, the pipeline's own first sigma.
- The codec (``LatentCodec``): latents = ``vae.encode(x).latent * scaling_factor`` (deterministic, no posterior),
  decoded by ``vae.decode(z / scaling_factor)``; no shift.

Export: the teacher's folder with the student's transformer and a one-step ``FlowMatchEulerDiscreteScheduler``
(``flow_matching.one_step_scheduler_config``: one Karras step from t_gen to 0, shift = the teacher's flow_shift so
that the folder reopens as the same teacher) in place of the DPM-Solver: SanaPipeline takes any scheduler whose
``set_timesteps(n)`` and ``step`` it calls, and FlowMatchEuler feeds the transformer 1000 t_gen as a float, as
fdistill does. DPM-Solver++ cannot serve: its first step would feed ``int64(1000 t_gen)`` (999 for 0.99967) while
stepping with the float t_gen. ``SanaPipeline.from_pretrained(out)(prompt, num_inference_steps=1,
guidance_scale=1, use_resolution_binning=False, height=r, width=r, max_sequence_length=L)`` then returns the
student's sample for the same latent noise (``guidance_scale=1`` turns CFG off; without
``use_resolution_binning=False`` the pipeline snaps sizes other than its bins', and refuses sample sizes other than
16 / 32 / 64 / 128). A k-step student: ``flow_matching.steps_scheduler_config`` (shift 1, so that the call's
``sigmas=`` are its flow times; such a folder reopens as a teacher of shift 1), called with ``sigmas=[t_1, ...,
t_k]`` in place of ``num_inference_steps=1``. SanaPipeline hands its generator to the scheduler's ``step``, so an
sde student's fresh noise is fdistill's stream too (one prompt, on the CPU).
"""

from __future__ import annotations

import inspect
import math
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
)
from fdistill.teachers.latent_t2i import LatentCodec, LatentPipeline

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
LAYOUT = ("a diffusers SanaPipeline folder: model_index.json, transformer/, vae/, text_encoder/, tokenizer/, "
          "scheduler/, as save_pretrained writes")
MAX_SEQUENCE_LENGTH = 300  # the pipeline's Gemma default
PIPELINE_STEP = 32  # SanaPipeline refuses heights and widths that are not multiples of 32


def complex_human_instruction() -> list[str]:
    """The complex human instruction ``SanaPipeline.__call__`` prepends to prompts by default (its lines)."""
    diffusers, _ = pf.libraries()
    return list(inspect.signature(diffusers.SanaPipeline.__call__).parameters["complex_human_instruction"].default)


class SanaDenoiser(FlowTransformerDenoiser):
    """``SanaTransformer2DModel`` as D(x; sigma, TextCondition(embeds, mask)), called as SanaPipeline calls it: the
    timestep 1000 t * ``timestep_scale`` in float32, the Gemma mask as ``encoder_attention_mask``. Its blocks,
    ``transformer_blocks``, each return the image tokens [B, N, D] (row-major over the patch grid)."""

    def __init__(self, *args, timestep_scale: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.timestep_scale = float(timestep_scale)

    def timestep(self, t: Tensor) -> Tensor:
        return 1000 * t * self.timestep_scale

    def _call(self, x_t: Tensor, t: Tensor, cond: TextCondition) -> Tensor:
        dtype = self._dtype(cond)
        if cond.mask is None:
            raise ValueError("a SANA transformer needs the Gemma attention mask (TextCondition.mask); latent shards "
                             "for it are prepared by a SANA teacher (fdistill prepare-latents)")
        return self.transformer(x_t.to(dtype), encoder_hidden_states=cond.embeds.to(dtype),
                                encoder_attention_mask=cond.mask, timestep=self.timestep(t).to(torch.float32),
                                return_dict=False)[0]


class SanaTextEncoder(FlowTextEncoder):
    """SANA's frozen Gemma-2, as SanaPipeline's ``__call__`` encodes prompts (see the module's docstring): the
    complex human instruction prepended, <bos> and the last ``max_sequence_length - 1`` states kept, with the
    attention mask; ``negative`` encodes without the instruction (the pipeline's negative prompt)."""

    def __init__(self, tokenizer, encoder: nn.Module, max_sequence_length: int, instruction: list[str]) -> None:
        super().__init__([tokenizer], [encoder], max_sequence_length)
        tokenizer.padding_side = "right"  # as the pipeline sets it
        self.instruction = "\n".join(instruction)
        self.instruction_tokens = len(tokenizer.encode(self.instruction))  # <bos> included, as the pipeline counts

    @torch.no_grad()
    def encode(self, prompts: list[str], instruction: bool = True) -> TextCondition:
        """The pipeline's ``_get_gemma_prompt_embeds`` (with or without the instruction) and, for prompts,
        ``encode_prompt``'s selection of <bos> and the last ``max_sequence_length - 1`` positions."""
        (tokenizer,), (encoder,) = self.tokenizers, self.encoders
        device = next(encoder.parameters()).device
        texts = [str(p).lower().strip() for p in prompts]
        length = self.max_sequence_length
        if instruction:
            texts = [self.instruction + p for p in texts]
            length = self.instruction_tokens + self.max_sequence_length - 2
        tokens = tokenizer(texts, padding="max_length", max_length=length, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        mask = tokens.attention_mask.to(device)
        embeds = encoder(tokens.input_ids.to(device), attention_mask=mask)[0].float()
        if instruction:
            keep = [0, *range(-self.max_sequence_length + 1, 0)]
            embeds, mask = embeds[:, keep], mask[:, keep]
        return TextCondition(embeds, mask=mask)

    def negative(self, prompts: list[str]) -> TextCondition:
        """``prompts`` encoded as the pipeline encodes its negative prompt: no instruction, no selection."""
        return self.encode(prompts, instruction=False)

    def forward(self, prompts: list[str]) -> TextCondition:
        return self.encode(list(prompts))


def flow_shift(config: dict, where: str) -> float:
    """The shift of a SANA folder's scheduler: ``flow_shift`` of a DPM-Solver with flow sigmas (the released
    folders'), or ``shift`` of a FlowMatchEulerDiscreteScheduler (an exported folder's); checked finite positive."""
    if config.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
        return scheduler_shift(config, where)
    name, flow, prediction = config.get("_class_name"), config.get("use_flow_sigmas"), config.get("prediction_type")
    if not flow or prediction != "flow_prediction":
        raise ValueError(f"{where}: expected a flow scheduler (use_flow_sigmas true, prediction_type flow_prediction, "
                         f"as SANA's DPMSolverMultistepScheduler), got {name!r:.60} with use_flow_sigmas={flow!r:.20}, "
                         f"prediction_type={prediction!r:.40}")
    shift = config.get("flow_shift", 1.0)
    if not (isinstance(shift, (int, float)) and not isinstance(shift, bool) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"{where}: flow_shift must be a finite positive number, got {shift!r:.40}")
    return float(shift)


@register
class SanaTeacher(FlowMatchingTeacher):
    kind, title = "sana", "SANA"
    preset = "sana"
    pipeline_classes = ("SanaPipeline",)
    lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]  # self- (linear) and cross-attention projections
    sde_noise_matches = True  # SanaPipeline hands its generator to scheduler.step (prepare_extra_step_kwargs)

    @classmethod
    def load(cls, folder: str | Path, resolution: int | None = None, options: FlowOptions | None = None,
             dtype: torch.dtype = torch.float32) -> LatentPipeline:
        """A local SANA folder; ``resolution`` defaults to the transformer's sample_size times the DC-AE's
        downsampling (1024 for the 1024 px models)."""
        options = cls.checked(options)
        diffusers, transformers = pf.libraries()
        folder = pf.open_folder(folder, cls.pipeline_classes, COMPONENTS, LAYOUT)
        shift = flow_shift(*cls.scheduler_config(folder))
        config_file = folder / "transformer" / "config.json"
        transformer = pf.load_network(diffusers.SanaTransformer2DModel, folder / "transformer", dtype)
        config = transformer.config
        if config.get("guidance_embeds"):
            raise ValueError(f"{config_file}: guidance_embeds is true, a SANA-Sprint transformer (SanaSprintPipeline), "
                             "which SanaPipeline cannot call")
        codec = LatentCodec.load(diffusers.AutoencoderDC, folder)
        channels = int(config["in_channels"])
        if channels != codec.channels or int(config.get("out_channels") or channels) != channels:
            raise ValueError(f"{config_file}: in_channels {channels} and out_channels {config.get('out_channels')} "
                             f"must both be the DC-AE's {codec.channels} latent channels")
        tokenizer = pf.load_tokenizer(transformers.GemmaTokenizerFast, folder / "tokenizer")
        encoder = pf.load_text_model(transformers.Gemma2Model, folder / "text_encoder")
        patch = int(config["patch_size"])
        step = math.lcm(PIPELINE_STEP, codec.downsample * patch)
        resolution = int(config["sample_size"]) * codec.downsample if resolution is None else resolution
        check_resolution(resolution, step, codec.downsample)
        msl = options.max_sequence_length or MAX_SEQUENCE_LENGTH
        text = SanaTextEncoder(tokenizer, encoder, msl, complex_human_instruction())
        denoiser = SanaDenoiser(transformer, resolution // codec.downsample, channels,
                                int(config["num_attention_heads"]) * int(config["attention_head_dim"]),
                                text.negative([""]), options.tap_block, shift, patch,
                                timestep_scale=float(config.get("timestep_scale") or 1.0))
        return LatentPipeline(denoiser.eval(), text, codec,
                              cls.record(folder, cls.kind, resolution, msl, denoiser, transformer))

    def call_arguments(self) -> list[str]:
        return ["guidance_scale=1", "use_resolution_binning=False", *super().call_arguments()]

    def export_scheduler(self, teacher_folder: Path) -> dict:
        """A FlowMatchEulerDiscreteScheduler of the teacher's shift in place of its DPM-Solver (see the module's
        docstring)."""
        diffusers, _ = pf.libraries()
        return dict(diffusers.FlowMatchEulerDiscreteScheduler(shift=self.denoiser.shift).config)
