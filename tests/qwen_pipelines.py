"""A tiny Qwen-Image pipeline (diffusers' QwenImagePipeline) with random weights, written by diffusers' own
save_pretrained (the layout of the real Qwen/Qwen-Image folder): a 2-layer Qwen2.5-VL text encoder of width 32
with a byte-level BPE tokenizer built in memory (no download), a Qwen-Image VAE with the real model's 8x
compression, 16 latent channels and latents_mean / latents_std, a 2-block MMDiT (patch 2, in_channels 64,
32 wide) and the real model's scheduler config. 32 x 32 images, 4 x 4 latents, a 2 x 2 token grid.

The tokenizer's vocabulary is the 256 byte-level symbols (any text encodes, nothing is unknown) plus one merged
token for each word of the pipeline's prompt template, so that the template's prefix is 34 tokens as with the
real Qwen2 tokenizer (the pipeline drops prompt_template_encode_start_idx = 34 tokens)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# QwenImagePipeline.prompt_template_encode (diffusers/pipelines/qwenimage/pipeline_qwenimage.py), split at "{}".
TEMPLATE_PREFIX = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                   "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n")
TEMPLATE_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
DROP_IDX = 34  # QwenImagePipeline.prompt_template_encode_start_idx
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # pad / unk / eos; chat-turn markers

# The real model's scheduler/scheduler_config.json (Qwen/Qwen-Image); use_dynamic_shifting: the shift mu
# comes from the image's token count through the pipeline's calculate_shift.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                        max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                        time_shift_type="exponential", invert_sigmas=False, stochastic_sampling=False,
                        use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)

# AutoencoderKLQwenImage's (and the real vae/config.json's) per-channel latent statistics.
LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
               1.6382, 1.1253, 2.8251, 1.9160]

TEXT_WIDTH = 32  # the text encoder's hidden size = the transformer's joint_attention_dim
IMAGE_SIZE = 32  # pixels; 4 x 4 latents, 2 x 2 tokens of 64 channels


def _byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode table, in byte order: the 256 symbols of byte-level BPE."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def qwen_tokenizer():
    """A Qwen2Tokenizer (byte-level BPE, Qwen2's pre-tokenizer) over the 256 byte symbols, with merges that
    make each word of the prompt template one token, and <|endoftext|> (pad), <|im_start|>, <|im_end|> as
    special tokens."""
    import re

    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    bare = Qwen2Tokenizer(vocab=dict(vocab), merges=[])
    merges = []
    text = TEMPLATE_PREFIX + TEMPLATE_SUFFIX
    for part in re.split("|".join(re.escape(s) for s in SPECIAL), text):
        for piece, _ in bare.backend_tokenizer.pre_tokenizer.pre_tokenize_str(part):
            for k in range(2, len(piece) + 1):  # left-to-right chain: "Ġt h" -> "Ġth", "Ġth e" -> "Ġthe", ...
                if piece[:k] not in vocab:
                    merges.append((piece[:k - 1], piece[k - 1]))
                    vocab[piece[:k]] = len(vocab)
    for s in SPECIAL:
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token="<|endoftext|>", eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", model_max_length=32768)
    tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL[1:]], special_tokens=True)
    return tok


def _text_encoder(tok):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(vocab_size=len(tok), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"))
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=TEXT_WIDTH,
                  fullatt_block_indexes=[0], window_size=56)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))


def _qwen_vae():
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                  temperal_downsample=[False, True, True], latents_mean=LATENTS_MEAN,
                                  latents_std=LATENTS_STD)


def qwen_image(folder, seed: int = 0):
    """A tiny Qwen-Image pipeline folder: Qwen2.5-VL text encoder of width 32, VAE (8x, z_dim 16), a 2-block
    MMDiT on packed 4 x 4 latents (2 x 2 tokens of 64 = 16 channels x 2 x 2; 2 heads of 16 = 32 wide)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    torch.manual_seed(seed)
    tok = qwen_tokenizer()
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2,
                                              joint_attention_dim=TEXT_WIDTH, guidance_embeds=False,
                                              axes_dims_rope=(4, 6, 6))
    pipe = QwenImagePipeline(transformer=transformer, vae=_qwen_vae(), text_encoder=_text_encoder(tok),
                             tokenizer=tok, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG))
    pipe.save_pretrained(folder)
    return folder


__all__ = ["DROP_IDX", "IMAGE_SIZE", "LATENTS_MEAN", "LATENTS_STD", "SCHEDULER_CONFIG", "qwen_image",
           "qwen_tokenizer"]
