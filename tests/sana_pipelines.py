"""A tiny SANA pipeline (diffusers ``SanaPipeline``) with random weights, written by diffusers' own
save_pretrained (the layout of the real Efficient-Large-Model/Sana_*_diffusers folders): a 2-layer ``Gemma2Model``
text encoder with a Gemma BPE tokenizer built in memory (byte fallback, so any text, the pipeline's complex human
instruction included, tokenizes; <bos> added, right padding), a 3-level ``AutoencoderDC`` (4x, 4 latent channels,
scaling factor 0.41407 as the real f32c32 DC-AE), a 2-layer ``SanaTransformer2DModel`` (patch 1, 16 wide) and the
real folders' scheduler, ``DPMSolverMultistepScheduler`` with flow sigmas (flow_shift 3, flow_prediction).
32 x 32 images (SanaPipeline wants multiples of 32), 8 x 8 latents, 64 tokens.

The transformer's ``sample_size`` is the true latent size, 8; SanaPipeline's resolution binning only knows sample
sizes 16/32/64/128 (512-4096 px), so call the pipeline with ``use_resolution_binning=False``."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # Gemma's ids: pad 0, eos 1, bos 2, unk 3, mask 4
WORD = "\u2581"  # Gemma's normalizer turns spaces into this
BYTES = [f"<0x{b:02X}>" for b in range(256)]  # byte fallback: any character outside the vocabulary
ASCII = [chr(c) for c in range(33, 127)]
MERGES = [(WORD, c) for c in "abcdefghijklmnopqrstuvwxyz"]
PIECES = SPECIALS + BYTES + [WORD] + ASCII + [a + b for a, b in MERGES]
GEMMA_VOCAB = len(PIECES)  # 382
GEMMA_WIDTH = 24  # caption_channels (the real Gemma-2-2B: 2304)
IMAGE = 32  # pixels; latents IMAGE // 4 = 8
SCALING = 0.41407  # mit-han-lab/dc-ae-f32c32-sana-1.0's scaling_factor


def gemma_tokenizer():
    """A Gemma tokenizer (BPE, byte fallback, <bos> prepended, no <eos>) of printable ASCII characters, word-initial
    lower-case letters and the 256 byte pieces; built in memory, no sentencepiece file or download."""
    from transformers import GemmaTokenizer  # transformers 5: GemmaTokenizerFast is the same class

    tok = GemmaTokenizer(vocab={p: i for i, p in enumerate(PIECES)}, merges=MERGES, add_bos_token=True,
                         add_eos_token=False)
    tok.padding_side = "right"  # as diffusers' convert_sana_to_diffusers.py saves it (the pipeline sets it anyway)
    return tok


def _gemma2(width: int = GEMMA_WIDTH):
    from transformers import Gemma2Config, Gemma2Model

    return Gemma2Model(Gemma2Config(vocab_size=GEMMA_VOCAB, hidden_size=width, intermediate_size=2 * width,
                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                    query_pre_attn_scalar=8, max_position_embeddings=4096, sliding_window=4096,
                                    pad_token_id=0, eos_token_id=1, bos_token_id=2))


def _dc_ae():
    """A DC-AE of 3 levels (8, 16, 16 channels): 4x spatial compression, 4 latent channels, the real model's block
    kinds (ResBlocks, then an EfficientViT block), conv downsampling and interpolating upsampling."""
    from diffusers import AutoencoderDC

    return AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=8,
                         encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                         decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                         encoder_block_out_channels=(8, 16, 16), decoder_block_out_channels=(8, 16, 16),
                         encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                         encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
                         downsample_block_type="Conv", upsample_block_type="interpolate",
                         decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=SCALING)


def _scheduler():
    """The scheduler of the real Sana_*_diffusers folders (their scheduler_config.json)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction",
                                       algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
                                       final_sigmas_type="zero", timestep_spacing="linspace", use_flow_sigmas=True,
                                       flow_shift=3.0)


def sana(folder, seed: int = 0):
    """A tiny SanaPipeline folder: Gemma-2 stand-in of width 24 (2 layers), DC-AE 4x with 4 latent channels, a
    2-layer linear-attention DiT 16 wide (2 heads of 8; cross-attention 2 heads of 8) on 8 x 8 latents, patch 1."""
    from diffusers import SanaPipeline, SanaTransformer2DModel

    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                         num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                         cross_attention_dim=16, caption_channels=GEMMA_WIDTH, mlp_ratio=2.5,
                                         sample_size=IMAGE // 4, patch_size=1)
    pipe = SanaPipeline(tokenizer=gemma_tokenizer(), text_encoder=_gemma2(), vae=_dc_ae(), transformer=transformer,
                        scheduler=_scheduler())
    pipe.save_pretrained(folder)
    return folder


__all__ = ["GEMMA_VOCAB", "GEMMA_WIDTH", "IMAGE", "SCALING", "gemma_tokenizer", "sana"]
