"""Tiny Stable Diffusion 3 and FLUX.1-dev-like pipelines with random weights, written by diffusers' own
save_pretrained (the layouts of the real folders): the real CLIP BPE vocabulary open_clip ships and a T5
tokenizer built in memory from a character vocabulary (no sentencepiece file). Transformer configs after
diffusers' own pipeline tests; 16 x 16 images, 8 x 8 latents (4 channels), a 4 x 4 token grid."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from t2i_pipelines import VOCAB, _text_config, _vae  # noqa: E402

from fdistill.evaluation.clip_tokenizer import clip_tokenizer  # noqa: E402

T5_PIECES = ["<pad>", "</s>", "<unk>", "\u2581"]
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,'"


def t5_tokenizer():
    """A T5 tokenizer (unigram) of single characters and word-initial characters: pad 0, eos 1, unk 2."""
    from transformers import T5Tokenizer

    vocab = [(p, 0.0) for p in T5_PIECES] + [(p, -1.0) for c in CHARS for p in (c, "\u2581" + c)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _t5(width: int):
    from transformers import T5Config, T5EncoderModel

    n = len(T5_PIECES) + 2 * len(CHARS)
    return T5EncoderModel(T5Config(vocab_size=n, d_model=width, d_kv=8, d_ff=2 * width, num_layers=2, num_heads=2,
                                   relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=1))


def _flow_vae(scaling: float, shift: float):
    vae = _vae()
    vae.register_to_config(scaling_factor=scaling, shift_factor=shift)
    return vae


def sd3(folder, seed: int = 0):
    """A tiny SD3 pipeline folder: CLIP-L/G stand-ins of widths 16 and 16 (pooled 32), T5 of width 48 (>= 32,
    else the pipeline crops the CLIP states), a 2-layer MMDiT on 8 x 8 latents (patch 2, 32 wide)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=48,
                                        caption_projection_dim=32, pooled_projection_dim=32, pos_embed_max_size=16,
                                        qk_norm="rms_norm")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=_flow_vae(1.5305, 0.0609), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=CLIPTextModelWithProjection(_text_config(16, 16)), tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(16, 16)), tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5(48), tokenizer_3=t5_tokenizer())
    pipe.save_pretrained(folder)
    return folder


def flux(folder, seed: int = 0, guidance_embeds: bool = True):
    """A tiny FLUX.1-dev-like pipeline folder (``guidance_embeds``; False: schnell-like): CLIP of width 32 (its
    pooled output), T5 of width 32, 2 joint + 2 single blocks on packed 8 x 8 latents (16 tokens of 16)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, out_channels=16, num_layers=2,
                                         num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=32, pooled_projection_dim=32,
                                         guidance_embeds=guidance_embeds, axes_dims_rope=[4, 4, 8])
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, vae=_flow_vae(0.3611, 0.1159), scheduler=scheduler,
                        text_encoder=CLIPTextModel(_text_config(32)), tokenizer=clip_tokenizer(),
                        text_encoder_2=_t5(32), tokenizer_2=t5_tokenizer())
    pipe.save_pretrained(folder)
    return folder


__all__ = ["VOCAB", "flux", "sd3", "t5_tokenizer"]


def latent_shards(folder, sd, n=6):
    """``n`` random latents with encoded captions as fdistill's latent shards (what prepare-latents writes)."""
    from fdistill.data.latent_shards import LatentShardWriter

    captions = [f"a shape number {i}" for i in range(n)]
    cond = sd.text(captions)
    g = torch.Generator().manual_seed(0)
    with LatentShardWriter(folder, shard_size=4) as w:
        w.add_batch([f"s{i}" for i in range(n)], torch.randn(n, *sd.latent_shape, generator=g), cond.tensors(),
                    captions)
    return folder
