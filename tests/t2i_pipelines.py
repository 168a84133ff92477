"""Tiny Stable Diffusion v1.5 and SDXL pipelines with random weights, written by diffusers' own
save_pretrained (the layouts of the real folders), with the real CLIP BPE vocabulary open_clip ships.
Configs after diffusers' own pipeline tests; the UNets work on 8x8 latents of 16x16 images."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fdistill.evaluation.clip_tokenizer import clip_tokenizer  # noqa: E402

VOCAB = 49408  # the CLIP BPE vocabulary; start 49406, end 49407


def _text_config(hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=hidden,
                          intermediate_size=2 * hidden, layer_norm_eps=1e-5, num_attention_heads=2,
                          num_hidden_layers=2, vocab_size=VOCAB, projection_dim=projection or hidden,
                          max_position_embeddings=77)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[8, 8], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=2, sample_size=16)


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def sd15(folder, seed: int = 0, prediction_type: str = "epsilon"):
    """A tiny SD1.5 pipeline folder: UNet (8, 16) on 8x8 latents, CLIP text encoder of width 16."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4)
    pipe = StableDiffusionPipeline(unet=unet, vae=_vae(), text_encoder=CLIPTextModel(_text_config(16)),
                                   tokenizer=clip_tokenizer(), scheduler=_scheduler(prediction_type),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def sdxl(folder, seed: int = 0):
    """A tiny SDXL pipeline folder: two text encoders (widths 16 and 16, projection 16), text_time
    conditioning (6 time ids of 8 channels + the pooled 16), UNet (8, 16) on 8x8 latents."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
                                projection_class_embeddings_input_dim=6 * 8 + 16, cross_attention_dim=32,
                                norm_num_groups=4)
    pipe = StableDiffusionXLPipeline(unet=unet, vae=_vae(), text_encoder=CLIPTextModel(_text_config(16)),
                                     text_encoder_2=CLIPTextModelWithProjection(_text_config(16, 16)),
                                     tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(),
                                     scheduler=_scheduler(), force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(folder)
    return folder
