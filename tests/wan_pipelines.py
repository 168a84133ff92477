"""Tiny Wan pipelines (diffusers' WanPipeline) with random weights, written by diffusers' own save_pretrained (the
layouts of the real Wan-AI folders): a umT5 text encoder of width 32 with the character T5 tokenizer of
tests/flow_pipelines.py (built in memory, no sentencepiece file), a 2-block WanTransformer3DModel (2 heads of 12,
patches 1 x 2 x 2) and the Wan schedulers' config (UniPC, flow sigmas, flow_shift 3). Configs after diffusers' fast
tests (tests/pipelines/wan/test_wan.py, test_wan_22.py):

* ``wan21``: Wan2.1 (16 latent channels, VAE 8x spatial, 4x temporal);
* ``wan22_ti2v``: Wan2.2-TI2V-5B's layout, ``expand_timesteps`` and its 48-channel VAE (16x: 8x and a 2x2 patch);
* ``wan22_a14b``: Wan2.2-A14B's layout, two experts ``transformer`` / ``transformer_2`` and ``boundary_ratio``.

5 frames -> 2 latent frames. Wan2.1 at 32 x 48 px: 4 x 6 latents, a 2 x 2 x 3 token grid."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from flow_pipelines import CHARS, T5_PIECES, t5_tokenizer  # noqa: E402

FRAMES, HEIGHT, WIDTH = 5, 32, 48
TEXT_WIDTH = 32
BOUNDARY = 0.875  # Wan2.2-T2V-A14B's boundary_ratio
# per-channel statistics of the tiny VAEs (any finite mean, positive std; AutoencoderKLWan's defaults for 16)
LATENTS_MEAN_48 = [0.05 * (i % 7) - 0.15 for i in range(48)]
LATENTS_STD_48 = [0.8 + 0.05 * (i % 9) for i in range(48)]


def _umt5():
    from transformers import UMT5Config, UMT5EncoderModel

    n = len(T5_PIECES) + 2 * len(CHARS)
    return UMT5EncoderModel(UMT5Config(vocab_size=n, d_model=TEXT_WIDTH, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                       relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
                                       eos_token_id=1))


def _transformer(channels: int, seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                 in_channels=channels, out_channels=channels, text_dim=TEXT_WIDTH, freq_dim=256,
                                 ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 rope_max_seq_len=32)


def _scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def _save(folder, transformer, vae, seed: int, **extra):
    from diffusers import WanPipeline

    torch.manual_seed(seed)
    pipe = WanPipeline(transformer=transformer, vae=vae, text_encoder=_umt5(), tokenizer=t5_tokenizer(),
                       scheduler=_scheduler(), **extra)
    pipe.save_pretrained(folder)
    return folder


def _vae16():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def wan21(folder, seed: int = 0):
    """A tiny Wan2.1 folder: 16 latent channels, VAE 8x / 4x, one transformer."""
    return _save(folder, _transformer(16, seed), _vae16(), seed + 1)


def wan22_ti2v(folder, seed: int = 0):
    """A tiny Wan2.2-TI2V-5B-like folder: the 48-channel residual VAE with a 2 x 2 patch (16x spatial),
    ``expand_timesteps``."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
                           latents_mean=LATENTS_MEAN_48, latents_std=LATENTS_STD_48, dim_mult=[1, 1, 1, 1],
                           num_res_blocks=1, scale_factor_spatial=16, scale_factor_temporal=4,
                           temperal_downsample=[False, True, True])
    return _save(folder, _transformer(48, seed), vae, seed + 1, expand_timesteps=True)


def wan22_a14b(folder, seed: int = 0):
    """A tiny Wan2.2-T2V-A14B-like folder: two experts (high noise ``transformer``, low noise ``transformer_2``)
    switched at ``boundary_ratio`` 0.875."""
    return _save(folder, _transformer(16, seed), _vae16(), seed + 1, transformer_2=_transformer(16, seed + 7),
                 boundary_ratio=BOUNDARY)


def latent_shards(folder, teacher, n: int = 4, seed: int = 0):
    """``n`` random video latents of ``teacher``'s sample shape with its encoded captions "a clip number i", as
    latent shards (``fdistill prepare-latents``' layout) in ``folder``."""
    from fdistill.data.latent_shards import LatentShardWriter

    captions = [f"a clip number {i}" for i in range(n)]
    g = torch.Generator().manual_seed(seed)
    with LatentShardWriter(folder, shard_size=2) as w:
        w.add_batch([f"v{i}" for i in range(n)], torch.randn(n, *teacher.sample_shape, generator=g),
                    teacher.text(captions).tensors(), captions)
    return folder


__all__ = ["BOUNDARY", "FRAMES", "HEIGHT", "WIDTH", "latent_shards", "wan21", "wan22_a14b", "wan22_ti2v"]
