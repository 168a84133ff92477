"""Text-to-image evaluation networks and metrics: open_clip-compatible CLIP, DINO ViT, CLIP score, in-batch
similarity, HPSv2 and the weight lookup (fdistill.evaluation.{clip, dino, t2i_metrics}). Random tiny networks of
the real architectures; no weights are downloaded."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from fdistill.config import cache_dir
from fdistill.evaluation import clip as clipmod
from fdistill.evaluation import dino as dinomod
from fdistill.evaluation import t2i_metrics as tm
from fdistill.evaluation.clip import CLIP, QuickGELU, clip_config, load_clip_from_file
from fdistill.evaluation.dino import DINOViT, dino_vitb8, load_dino_from_file

# open_clip's model_configs/{ViT-B-32, ViT-H-14, ViT-g-14}.json (open_clip_torch 3.3.0), with the parameter counts
# of open_clip's CLIP built from them (checked against open_clip's own CLIP class; ViT-B-32 by hand: vision
# 87,849,216 + text 63,428,096 + logit_scale 1).
REAL_CONFIGS = {
    "ViT-B-32": ({"embed_dim": 512,
                  "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}},
                 151_277_313),
    "ViT-H-14": ({"embed_dim": 1024,
                  "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}},
                 986_109_441),
    "ViT-g-14": ({"embed_dim": 1024,
                  "vision_cfg": {"image_size": 224, "layers": 40, "width": 1408, "head_width": 88,
                                 "mlp_ratio": 4.3637, "patch_size": 14},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}},
                 1_366_678_273),
}
# DINO ViT-B/8: patch embed 3*8*8*768 + 768, cls 768, pos (28*28 + 1)*768, 12 blocks of 7,087,872, norm 1536.
DINO_B8_PARAMETERS = 85_807_872

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}


def has_open_clip_files():
    return clipmod.open_clip_folder() is not None


def tokenizer_ready():
    from fdistill.evaluation.clip_tokenizer import _bundled_bpe

    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return _bundled_bpe() is not None


needs_tokenizer = pytest.mark.skipif(not tokenizer_ready(), reason="needs transformers and open_clip_torch's BPE")


def tiny_clip(**changes) -> CLIP:
    cfg = {**TINY, **changes}
    net = CLIP(cfg).eval()
    with torch.no_grad():  # LayerNorms away from identity, so that a wrong wiring shows in the outputs
        for name, p in net.named_parameters():
            if ".ln_" in name or name.startswith("ln_"):
                p.add_(0.1 * torch.randn_like(p))
    return net


def tiny_dino() -> DINOViT:
    return DINOViT(patch_size=8, embed_dim=32, depth=2, num_heads=4, img_size=32).eval()


def images(n=2, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)


# -- names, shapes and sizes -------------------------------------------------------------------------
def expected_clip_names(vision_layers, text_layers, layer_scale=False):
    """open_clip's CLIP state_dict keys in order (model.py CLIP, transformer.py VisionTransformer /
    ResidualAttentionBlock with nn.MultiheadAttention; the causal attn_mask buffer is not persistent)."""
    def block(prefix):
        names = [f"{prefix}.ln_1.weight", f"{prefix}.ln_1.bias", f"{prefix}.attn.in_proj_weight",
                 f"{prefix}.attn.in_proj_bias", f"{prefix}.attn.out_proj.weight", f"{prefix}.attn.out_proj.bias"]
        names += [f"{prefix}.ls_1.gamma"] if layer_scale else []
        names += [f"{prefix}.ln_2.weight", f"{prefix}.ln_2.bias", f"{prefix}.mlp.c_fc.weight",
                  f"{prefix}.mlp.c_fc.bias", f"{prefix}.mlp.c_proj.weight", f"{prefix}.mlp.c_proj.bias"]
        names += [f"{prefix}.ls_2.gamma"] if layer_scale else []
        return names

    names = ["positional_embedding", "text_projection", "logit_scale",
             "visual.class_embedding", "visual.positional_embedding", "visual.proj", "visual.conv1.weight",
             "visual.ln_pre.weight", "visual.ln_pre.bias"]
    for i in range(vision_layers):
        names += block(f"visual.transformer.resblocks.{i}")
    names += ["visual.ln_post.weight", "visual.ln_post.bias"]
    for i in range(text_layers):
        names += block(f"transformer.resblocks.{i}")
    return names + ["token_embedding.weight", "ln_final.weight", "ln_final.bias"]


def test_clip_names_and_shapes_match_open_clip():
    net = CLIP(TINY)
    state = net.state_dict()
    assert list(state) == expected_clip_names(2, 2)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["visual.conv1.weight"] == (32, 3, 8, 8)
    assert shapes["visual.class_embedding"] == (32,)
    assert shapes["visual.positional_embedding"] == ((32 // 8) ** 2 + 1, 32)
    assert shapes["visual.proj"] == (32, 16)
    assert shapes["visual.transformer.resblocks.0.attn.in_proj_weight"] == (96, 32)
    assert shapes["visual.transformer.resblocks.1.mlp.c_fc.weight"] == (128, 32)
    assert shapes["token_embedding.weight"] == (49408, 32)
    assert shapes["positional_embedding"] == (77, 32)
    assert shapes["text_projection"] == (32, 16)
    assert shapes["logit_scale"] == ()
    assert net.visual.transformer.resblocks[0].attn.heads == 4  # width 32 / head_width 8
    assert isinstance(net.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)


def test_layer_scale_and_quick_gelu_configs():
    cfg = {**TINY, "quick_gelu": True,
           "vision_cfg": {**TINY["vision_cfg"], "ls_init_value": 0.1},
           "text_cfg": {**TINY["text_cfg"], "ls_init_value": 0.1}}
    net = CLIP(cfg)
    assert list(net.state_dict()) == expected_clip_names(2, 2, layer_scale=True)
    assert isinstance(net.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert torch.allclose(net.visual.transformer.resblocks[0].ls_1.gamma, torch.full((32,), 0.1))


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_real_config_parameter_counts(name):
    cfg, count = REAL_CONFIGS[name]
    with torch.device("meta"):  # the real architecture without allocating (or initialising) its weights
        net = CLIP(cfg)
    assert sum(p.numel() for p in net.parameters()) == count
    if name == "ViT-g-14":  # mlp_ratio 4.3637 -> int(1408 * 4.3637) = 6144
        assert net.visual.transformer.resblocks[0].mlp.c_fc.weight.shape == (6144, 1408)
        assert net.visual.transformer.resblocks[0].attn.heads == 16


@pytest.mark.skipif(not has_open_clip_files(), reason="open_clip_torch not installed")
@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_installed_open_clip_configs(name):
    assert clipmod.open_clip_model_config(name) == REAL_CONFIGS[name][0]
    by_name, by_dict = clip_config(name), clip_config(REAL_CONFIGS[name][0])
    assert (by_name.embed_dim, by_name.vision, by_name.text, by_name.quick_gelu) == (
        by_dict.embed_dim, by_dict.vision, by_dict.text, by_dict.quick_gelu)
    assert by_name.name == name and not by_name.quick_gelu


@pytest.mark.parametrize("change, message", [
    ({"custom_text": True}, "custom_text"),
    ({"init_logit_bias": -10}, "init_logit_bias"),
    ({"vision_cfg": {**TINY["vision_cfg"], "attentional_pool": True}}, "attentional_pool"),
    ({"vision_cfg": {**TINY["vision_cfg"], "output_tokens": True}}, "output_tokens"),
    ({"vision_cfg": {**TINY["vision_cfg"], "timm_model_name": "vit_base_patch16_224"}}, "timm_model_name"),
    ({"vision_cfg": {**TINY["vision_cfg"], "layers": [3, 4, 6, 3]}}, "ResNet"),
    ({"text_cfg": {**TINY["text_cfg"], "hf_model_name": "roberta-base"}}, "hf_model_name"),
    ({"text_cfg": {**TINY["text_cfg"], "pool_type": "last"}}, "pool_type"),
    ({"text_cfg": {**TINY["text_cfg"], "mystery": 1}}, "unknown key"),
])
def test_unsupported_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        clip_config({**TINY, **change})


def test_default_valued_keys_are_accepted():
    cfg = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "pool_type": "tok", "attentional_pool": False,
                                  "patch_dropout": 0.0, "output_tokens": False},
           "text_cfg": {**TINY["text_cfg"], "pool_type": "argmax", "proj_bias": False}}
    assert clip_config(cfg) == clip_config(TINY)


def expected_dino_names(depth):
    """facebookresearch/dino vision_transformer.py VisionTransformer(num_classes=0) state_dict keys in order."""
    names = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        b = f"blocks.{i}"
        names += [f"{b}.norm1.weight", f"{b}.norm1.bias", f"{b}.attn.qkv.weight", f"{b}.attn.qkv.bias",
                  f"{b}.attn.proj.weight", f"{b}.attn.proj.bias", f"{b}.norm2.weight", f"{b}.norm2.bias",
                  f"{b}.mlp.fc1.weight", f"{b}.mlp.fc1.bias", f"{b}.mlp.fc2.weight", f"{b}.mlp.fc2.bias"]
    return names + ["norm.weight", "norm.bias"]


def test_dino_names_shapes_and_size():
    net = tiny_dino()
    state = net.state_dict()
    assert list(state) == expected_dino_names(2)
    assert state["cls_token"].shape == (1, 1, 32) and state["pos_embed"].shape == (1, 17, 32)
    assert state["patch_embed.proj.weight"].shape == (32, 3, 8, 8)
    assert state["blocks.0.attn.qkv.weight"].shape == (96, 32) and state["blocks.1.mlp.fc1.weight"].shape == (128, 32)
    assert net.norm.eps == 1e-6
    with torch.device("meta"):
        big = dino_vitb8()
    assert list(big.state_dict()) == expected_dino_names(12)
    assert sum(p.numel() for p in big.parameters()) == DINO_B8_PARAMETERS
    assert big.pos_embed.shape == (1, 28 * 28 + 1, 768)


# -- loading -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["bin", "safetensors", "hps_state_dict", "module_prefix"])
def test_clip_strict_round_trip(tmp_path, form):
    net = tiny_clip()
    state = net.state_dict()
    if form == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "open_clip_pytorch_model.bin"
        if form == "hps_state_dict":
            state = {"state_dict": state, "epoch": 1}
        elif form == "module_prefix":
            state = {"module." + k: v for k, v in state.items()}
        torch.save(state, path)
    loaded = load_clip_from_file(path, TINY)
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    x, tokens = images(), torch.randint(1, 1000, (2, 77))
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(x), net.encode_image(x))
        assert torch.allclose(loaded.encode_text(tokens), net.encode_text(tokens))


def test_clip_mismatched_weights_are_a_clear_error(tmp_path):
    state = tiny_clip().state_dict()
    del state["visual.proj"]
    state["visual.attn_pool.query"] = torch.zeros(3)
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"open_clip_pytorch_model.bin does not match open_clip config: 1 missing"):
        load_clip_from_file(path, TINY)


def test_dino_strict_round_trip(tmp_path):
    net = tiny_dino()
    path = tmp_path / "dino_vitbase8_pretrain.pth"
    torch.save(net.state_dict(), path)
    loaded = load_dino_from_file(path, net=tiny_dino())
    x = images(h=40, w=48)
    with torch.no_grad():
        assert torch.allclose(loaded(x), net(x))
    with pytest.raises(ValueError, match="does not hold DINO ViT weights"):
        load_dino_from_file(path, net=DINOViT(patch_size=8, embed_dim=32, depth=3, num_heads=4, img_size=32))


# -- preprocessing and forward -------------------------------------------------------------------------
def test_clip_preprocessing_constant_images():
    net = tiny_clip()
    x = torch.full((1, 3, 48, 64), 200, dtype=torch.uint8)
    x[:, 1] = 30
    out = net.preprocess(x)
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.float32
    for c, v in enumerate((200, 30, 200)):
        expected = (v / 255 - clipmod.OPENAI_MEAN[c]) / clipmod.OPENAI_STD[c]
        assert torch.allclose(out[0, c], torch.full((32, 32), expected), atol=1e-5)


def test_resize_center_crop_keeps_the_centre():
    x = torch.zeros(1, 3, 32, 64, dtype=torch.uint8)
    x[..., 16:48] = 255  # a white centre band as wide as the crop: the crop is all white
    out = clipmod.resize_center_crop_batch(x, 16)
    assert out.shape == (1, 3, 16, 16) and out.dtype == torch.uint8
    assert (out[..., :, 2:-2] == 255).all()
    same = images(1, 16, 16)
    assert torch.equal(clipmod.resize_center_crop_batch(same, 16), same)


def test_hps_preprocessing_pads_the_short_side():
    net = tiny_clip()
    x = torch.full((1, 3, 64, 32), 255, dtype=torch.uint8)  # tall: resized to 32 x 16, padded 8 left and right
    out = net.preprocess(x, resize_mode="longest")
    white = [(1 - m) / s for m, s in zip(clipmod.OPENAI_MEAN, clipmod.OPENAI_STD)]
    black = [(0 - m) / s for m, s in zip(clipmod.OPENAI_MEAN, clipmod.OPENAI_STD)]
    for c in range(3):
        assert torch.allclose(out[0, c, :, 8:24], torch.full((32, 16), white[c]), atol=1e-4)
        assert torch.allclose(out[0, c, :, :8], torch.full((32, 8), black[c]))
        assert torch.allclose(out[0, c, :, 24:], torch.full((32, 8), black[c]))


def test_square_center_crop_resize():
    x = images(2, 40, 60)
    out = clipmod.square_center_crop_resize(x, 20)
    assert out.shape == (2, 3, 20, 20) and out.dtype == torch.uint8
    assert torch.equal(clipmod.square_center_crop_resize(x[..., 10:50], 40), x[..., 10:50])


def test_image_checks():
    net = tiny_clip()
    with pytest.raises(ValueError, match="uint8"):
        net.encode_image(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(N, 1\|3, H, W\)"):
        net.encode_image(torch.zeros(3, 32, 32, dtype=torch.uint8))
    gray = images(1)[:, :1]
    assert torch.allclose(net.encode_image(gray), net.encode_image(gray.repeat(1, 3, 1, 1)))


def test_clip_embeddings_are_normalised_and_text_reads_the_end_token():
    net = tiny_clip()
    with torch.no_grad():
        img = net.encode_image(images(3))
        tokens = torch.zeros(2, 77, dtype=torch.long)
        tokens[:, :4] = torch.tensor([49406, 320, 2368, 49407])
        tokens[1, 10] = 5  # after the end token: causal attention keeps it out of the end token's feature
        txt = net.encode_text(tokens)
    assert img.shape == (3, 16) and txt.shape == (2, 16)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3)) and torch.allclose(txt.norm(dim=-1), torch.ones(2))
    assert torch.allclose(txt[0], txt[1], atol=1e-6)


def test_dino_preprocessing_and_interpolation():
    net = tiny_dino()
    x = torch.full((1, 3, 40, 56), 128, dtype=torch.uint8)
    pre = net.preprocess(x)
    assert pre.shape == (1, 3, 40, 56)  # full resolution by default
    for c in range(3):
        expected = (128 / 255 - (0.485, 0.456, 0.406)[c]) / (0.229, 0.224, 0.225)[c]
        assert torch.allclose(pre[0, c], torch.full((40, 56), expected), atol=1e-6)
    assert net.preprocess(x, image_size=32).shape == (1, 3, 32, 32)
    assert net.interpolate_pos_encoding(4, 4) is net.pos_embed
    assert net.interpolate_pos_encoding(5, 7).shape == (1, 36, 32)
    with torch.no_grad():
        f = net(images(2, 40, 56))
    assert f.shape == (2, 32) and torch.allclose(f.norm(dim=-1), torch.ones(2))


# -- metrics -----------------------------------------------------------------------------------------
def test_in_batch_similarity_of_identical_and_orthogonal_features():
    same = torch.randn(1, 8).repeat(4, 1) * torch.tensor([[1.0], [2.0], [3.0], [0.5]])
    mean, per = tm.in_batch_similarity(same, 4)
    assert mean == pytest.approx(1.0) and per.shape == (1,)
    ortho = torch.eye(6)
    assert tm.in_batch_similarity(ortho, 3)[0] == pytest.approx(0.0)
    assert tm.in_batch_similarity(ortho, [0, 1, 0, 1, 0, 1])[0] == pytest.approx(0.0)


def test_in_batch_similarity_by_hand():
    f = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [3.0, 4.0], [3.0, 4.0]])
    mean, per = tm.in_batch_similarity(f, [7, 7, 7, 2, 2])  # groups sorted by label: {2}, {7}
    c = 1 / math.sqrt(2)
    assert per.tolist() == pytest.approx([1.0, (c + 0 + c) / 3])
    assert mean == pytest.approx((1.0 + 2 * c / 3) / 2)
    with pytest.raises(ValueError, match=">= 2"):
        tm.in_batch_similarity(f, [0, 0, 1, 1, 2])
    with pytest.raises(ValueError, match="divide"):
        tm.in_batch_similarity(f, 2)


def test_dino_in_batch_similarity_of_identical_images():
    net = tiny_dino()
    x = images(1).repeat(3, 1, 1, 1)
    feats = tm.dino_features(net, torch.cat([x, images(3, seed=1)]), batch_size=2)
    mean, per = tm.in_batch_similarity(feats, 3)
    assert per[0].item() == pytest.approx(1.0, abs=1e-6) and per[1].item() < 1 - 1e-4


@needs_tokenizer
def test_clip_score_equals_the_cosine_by_hand():
    from fdistill.evaluation.clip_tokenizer import tokenize

    net = tiny_clip()
    x, captions = images(3, 40, 48), ["a cat", "two dogs in the snow", "a red fire hydrant"]
    mean, per = tm.clip_score(net, x, captions, batch_size=2)
    with torch.no_grad():
        img = F.normalize(net.image_features(net.preprocess(x)), dim=-1)
        txt = F.normalize(net.text_features(tokenize(["A photo depicts " + c for c in captions])), dim=-1)
    by_hand = (img * txt).sum(-1)
    assert torch.allclose(per, by_hand, atol=1e-6) and mean == pytest.approx(by_hand.mean().item(), abs=1e-6)
    plain = tm.clip_score(net, x, captions, prefix="")[1]
    assert not torch.allclose(plain, per)
    resized = tm.clip_score(net, x, captions, pre_resize=24)[1]
    assert torch.allclose(resized, tm.clip_score(net, clipmod.square_center_crop_resize(x, 24), captions)[1])
    with pytest.raises(ValueError, match="one text per image"):
        tm.clip_score(net, x, captions[:2])


@needs_tokenizer
def test_hps_score_is_100_times_the_cosine_with_hps_preprocessing():
    from fdistill.evaluation.clip_tokenizer import tokenize

    net = tiny_clip()
    x, prompts = images(2, 48, 32), ["an astronaut riding a horse", "a bowl of soup"]
    mean, per = tm.hps_score(net, x, prompts)
    with torch.no_grad():
        img = F.normalize(net.image_features(net.preprocess(x, resize_mode="longest")), dim=-1)
        txt = F.normalize(net.text_features(tokenize(prompts)), dim=-1)
    assert torch.allclose(per, 100 * (img * txt).sum(-1), atol=1e-4)
    assert mean == pytest.approx(per.mean().item())


# -- weight lookup ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, name, url", [
    (tm.clip_weights_spec("ViT-g-14"), "open_clip_pytorch_model.bin",
     "https://huggingface.co/laion/CLIP-ViT-g-14-laion2B-s12B-b42K/resolve/main/open_clip_pytorch_model.bin"),
    (tm.DINO_SPEC, "dino_vitbase8_pretrain.pth",
     "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"),
    (tm.HPS_SPEC, "HPS_v2_compressed.pt", "https://huggingface.co/xswu/HPSv2/resolve/main/HPS_v2_compressed.pt"),
])
def test_missing_weights_message(monkeypatch, spec, name, url):
    monkeypatch.delenv(spec.env, raising=False)
    with pytest.raises(FileNotFoundError) as info:
        tm.find_weights(spec)
    message = str(info.value)
    assert "\n" not in message
    assert name in message and url in message and spec.env in message
    assert str(cache_dir() / spec.subdir if spec.subdir else cache_dir()) in message


def test_find_weights_order(tmp_path, monkeypatch):
    spec = tm.DINO_SPEC
    explicit = tmp_path / "mine.pth"
    explicit.write_bytes(b"x")
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    (env_dir / "dino_vitbase8_pretrain.pth").write_bytes(b"x")
    monkeypatch.setenv(spec.env, str(env_dir))
    assert tm.find_weights(spec, explicit) == explicit
    assert tm.find_weights(spec) == env_dir / "dino_vitbase8_pretrain.pth"
    monkeypatch.delenv(spec.env)
    cache_dir().mkdir(parents=True, exist_ok=True)
    (cache_dir() / "dino_vitbase8_pretrain.pth").write_bytes(b"x")
    try:
        assert tm.find_weights(spec) == cache_dir() / "dino_vitbase8_pretrain.pth"
    finally:
        os.remove(cache_dir() / "dino_vitbase8_pretrain.pth")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        tm.find_weights(spec, tmp_path / "nowhere.pth")


def test_loaders_stop_before_any_work(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a network was built before the weights were found")

    monkeypatch.setattr(tm, "load_clip_from_file", forbidden)
    monkeypatch.setattr(tm, "load_dino_from_file", forbidden)
    for env in ("FDISTILL_CLIP", "FDISTILL_DINO", "FDISTILL_HPS"):
        monkeypatch.delenv(env, raising=False)
    with pytest.raises(FileNotFoundError, match="open_clip_pytorch_model.bin"):
        tm.load_clip_scorer()
    with pytest.raises(FileNotFoundError, match="HPS_v2_compressed.pt"):
        tm.load_hps()
    with pytest.raises(FileNotFoundError, match="dino_vitbase8_pretrain.pth"):
        tm.load_dino(tmp_path)


def test_load_dino_through_the_lookup(tmp_path, monkeypatch):
    monkeypatch.setattr(dinomod, "dino_vitb8", tiny_dino)  # the loader's architecture, shrunk
    net = tiny_dino()
    torch.save(net.state_dict(), tmp_path / "dino_vitbase8_pretrain.pth")
    monkeypatch.setenv("FDISTILL_DINO", str(tmp_path))
    loaded = tm.load_dino()
    assert torch.equal(loaded.pos_embed, net.pos_embed) and not loaded.training
