"""EDM-compatible networks (fdistill.networks.edm) against NVlabs/edm.

Golden files (tests/data/edm_golden/*.pt) were made once, outside this repo, by running the reference
implementation NVlabs/edm ``training/networks.py`` at commit 008a4e5316c8e3bfe61a62f874bddba254295afb
on tiny configs (4-64 channels, 4x4-8x8 images, CPU, float32, eval mode). Each file holds the
constructor kwargs, the reference's ``{name: shape}`` and per-tensor (sum, abs-sum) of its seeded
initial weights (``init_seed``), the weights used for the outputs (random: ``fill_weights`` below with
``fill_seed``, stored as the state_dict except for the 580k-parameter ADM-with-attention config, which
stores only their checksums), two input sets per config, the reference outputs D(x; sigma), and the
reference's last-encoder-block outputs per resolution (read with forward hooks) for the first input.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from fdistill.networks import edm

GOLDEN = sorted((Path(__file__).parent / "data" / "edm_golden").glob("*.pt"))


def fill_weights(net: torch.nn.Module, seed: int) -> None:
    """The golden files' weights: parameters in state_dict order, N(0, 1/fan_in) for weights,
    1 + 0.2 N(0, 1) for norm gains, 0.2 N(0, 1) for biases; buffers untouched."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            z = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim >= 2:
                p.copy_(z / math.sqrt(p[0].numel()))
            elif name.split(".")[-2].endswith("norm") and name.endswith("weight"):
                p.copy_(1 + 0.2 * z)
            else:
                p.copy_(0.2 * z)


def checksums(sd: dict) -> dict:
    return {k: [float(v.double().sum()), float(v.double().abs().sum())] for k, v in sd.items()}


def build(rec: dict) -> torch.nn.Module:
    return getattr(edm, rec["precond"])(**rec["kwargs"])


def assert_checksums(sd: dict, expected: dict) -> None:
    got = checksums(sd)
    assert list(got) == list(expected)
    for k, (s, a) in expected.items():
        assert got[k][0] == pytest.approx(s, rel=1e-6, abs=1e-6), k
        assert got[k][1] == pytest.approx(a, rel=1e-6, abs=1e-6), k


@pytest.fixture(scope="module", params=GOLDEN, ids=[p.stem for p in GOLDEN])
def golden(request) -> dict:
    return torch.load(request.param, weights_only=True)


def test_golden_files_present():
    assert len(GOLDEN) == 5


def test_state_dict_names_shapes_and_init_match_reference(golden):
    torch.manual_seed(golden["init_seed"])
    net = build(golden)
    sd = net.state_dict()
    assert {k: list(v.shape) for k, v in sd.items()} == golden["shapes"]
    assert list(sd) == list(golden["shapes"])  # same order too
    assert all(v.dtype == torch.float32 for v in sd.values())
    # Same RNG draws in the same order as EDM: a seeded construction gives EDM's initial weights.
    assert_checksums(sd, golden["init_stats"])
    for attr, value in golden["attrs"].items():
        assert float(getattr(net, attr)) == value


def loaded(golden: dict) -> torch.nn.Module:
    net = build(golden)
    if golden["state_dict"] is not None:
        net.load_state_dict(golden["state_dict"], strict=True)
    else:
        fill_weights(net, golden["fill_seed"])
    assert_checksums(net.state_dict(), golden["weight_stats"])
    return net.eval()


def test_outputs_and_features_match_reference(golden):
    net = loaded(golden)
    kwargs = golden["kwargs"]
    res = kwargs["img_resolution"]
    all_res = [res >> level for level in range(len(kwargs["channel_mult"]))]
    assert net.feature_resolutions == all_res
    channels = net.feature_channels()
    assert list(channels) == all_res
    for call in golden["calls"]:
        with torch.no_grad():
            d = net(**call["inputs"])
            d_feat, feats = net(**call["inputs"], return_features=True)
        assert d.dtype == torch.float32 and d.shape == call["output"].shape
        torch.testing.assert_close(d, call["output"], atol=1e-5, rtol=1e-6)
        assert torch.equal(d_feat, d)
        batch = call["inputs"]["x"].shape[0]
        expected_shapes = {r: (batch, c, r, r) for r, c in channels.items()}
        assert {r: tuple(f.shape) for r, f in feats.items()} == expected_shapes
        assert all(f.dtype == torch.float32 for f in feats.values())
        if call["features"] is not None:
            assert sorted(call["features"]) == sorted(feats)
            for r, ref in call["features"].items():
                torch.testing.assert_close(feats[r], ref, atol=1e-5, rtol=1e-6)


def test_full_size_configs_match_edm_checkpoints():
    """Parameter and state_dict counts of the official cifar10 'ddpmpp' and ImageNet-64 'adm' configs
    (built on the meta device: structure only, no memory)."""
    with torch.device("meta"):
        net = edm.EDMPrecond(
            img_resolution=32, img_channels=3, label_dim=10, model_type="SongUNet",
            embedding_type="positional", encoder_type="standard", decoder_type="standard",
            channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2],
            augment_dim=9, dropout=0.13,
        )
        sd = net.state_dict()
        assert sum(p.numel() for p in net.parameters()) == 55_735_299
        assert len(sd) == 427
        assert tuple(sd["model.enc.32x32_block0.conv0.weight"].shape) == (256, 128, 3, 3)
        assert tuple(sd["model.map_augment.weight"].shape) == (128, 9)
        assert "model.dec.16x16_up.skip.resample_filter" in sd
        assert "model.dec.32x32_aux_conv.weight" in sd
        assert net.feature_channels() == {32: 256, 16: 256, 8: 256}
        del net, sd

        net = edm.EDMPrecond(
            img_resolution=64, img_channels=3, label_dim=1000, use_fp16=True, model_type="DhariwalUNet",
            model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[32, 16, 8],
            dropout=0.1,
        )
        sd = net.state_dict()
        assert sum(p.numel() for p in net.parameters()) == 295_899_267
        assert len(sd) == 553
        assert tuple(sd["model.map_label.weight"].shape) == (768, 1000)
        assert "model.enc.64x64_conv.weight" in sd and "model.dec.8x8_in0.qkv.weight" in sd
        assert net.model.enc["32x32_block0"].num_heads == 384 // 64
        assert net.feature_channels() == {64: 192, 32: 384, 16: 576, 8: 768}
        del net, sd


def tiny(precond: str = "EDMPrecond", **overrides) -> torch.nn.Module:
    kwargs = dict(img_resolution=8, img_channels=3, label_dim=3, model_type="SongUNet", model_channels=4,
                  channel_mult=[1, 2], channel_mult_emb=2, num_blocks=2, attn_resolutions=[4], augment_dim=9)
    kwargs.update(overrides)
    return getattr(edm, precond)(**kwargs)


def test_feature_resolutions_selection():
    net = tiny().eval()
    assert net.feature_resolutions == [8, 4] == net.encoder_resolutions
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 2.0])
    with torch.no_grad():
        d_all, f_all = net(x, sigma, return_features=True)
        net.feature_resolutions = [4]
        assert net.model.feature_resolutions == [4]
        assert net.feature_channels() == {4: 8}
        d_one, f_one = net(x, sigma, return_features=True)
    assert list(f_one) == [4] and torch.equal(f_one[4], f_all[4]) and torch.equal(d_one, d_all)
    clone = copy.deepcopy(net)
    assert clone.feature_resolutions == [4]
    net.feature_resolutions = []
    assert net(x, sigma, return_features=True)[1] == {}
    with pytest.raises(ValueError, match="not encoder resolutions"):
        net.feature_resolutions = [16]
    # The tap is the last encoder block at each resolution.
    taps: dict = {}
    net.feature_resolutions = [8, 4]
    hooks = [
        net.model.enc[f"{r}x{r}_block1"].register_forward_hook(lambda m, a, o, r=r: taps.__setitem__(r, o))
        for r in (8, 4)
    ]
    with torch.no_grad():
        _, feats = net(x, sigma, return_features=True)
    for h in hooks:
        h.remove()
    assert all(torch.equal(feats[r], taps[r]) for r in (8, 4))


@pytest.mark.parametrize("model_type", ["SongUNet", "DhariwalUNet"])
def test_backward_through_output_and_features_in_training_mode(model_type):
    net = tiny(model_type=model_type, label_dropout=0.5, dropout=0.1).train()
    x = torch.randn(3, 3, 8, 8, requires_grad=True)
    labels = torch.eye(3)[[0, 1, 2]]
    d, feats = net(x, torch.tensor([0.1, 1.0, 10.0]), labels, return_features=True,
                   augment_labels=torch.randn(3, 9))
    loss = d.square().mean() + sum(f.square().mean() for f in feats.values())
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert net.model.map_label.weight.grad is not None


def test_r1_can_differentiate_the_fused_attention_twice():
    """Attention runs in PyTorch's fused kernel (its equality with EDM's einsum form is the golden tests'
    job, on networks with attention); with features of an input that needs a gradient (R1) the double
    backward works, on the math kernel."""
    net = tiny(attn_resolutions=[8, 4]).eval()
    xr = torch.randn(2, 3, 8, 8, requires_grad=True)
    feats = net(xr, torch.tensor([1.0, 2.0]), torch.eye(3)[:2], return_features=True)[1]
    (gx,) = torch.autograd.grad(sum(f.sum() for f in feats.values()), xr, create_graph=True)
    gx.square().sum().backward()  # R1's double backward through attention
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in (net.model.enc["8x8_block0"].qkv.weight.grad,))


def test_fp16_flag_is_float32_on_cpu_and_sigma_forms():
    torch.manual_seed(1)
    net16 = tiny(use_fp16=True).eval()
    net32 = tiny(use_fp16=False).eval()
    net32.load_state_dict(net16.state_dict())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        d16 = net16(x, torch.tensor([0.5, 0.5]))
        assert d16.dtype == torch.float32
        assert torch.equal(d16, net32(x, torch.tensor([0.5, 0.5]), force_fp32=True))
        torch.testing.assert_close(net16(x, 0.5), d16, atol=1e-6, rtol=0)
        torch.testing.assert_close(net16(x, torch.tensor(0.5)), d16, atol=1e-6, rtol=0)
        torch.testing.assert_close(net16(x, torch.full((2, 1, 1, 1), 0.5)), d16, atol=0, rtol=0)


def test_preconditioning_attributes_and_helpers():
    vp = tiny("VPPrecond")
    t = torch.tensor([1e-5, 0.1, 0.5, 1.0])
    torch.testing.assert_close(vp.sigma_inv(vp.sigma(t)), t, atol=1e-5, rtol=1e-4)
    assert vp.sigma_min == pytest.approx(1e-3, rel=0.05) and vp.sigma_max == pytest.approx(152.17, rel=1e-3)
    ve, ed = tiny("VEPrecond"), tiny("EDMPrecond", sigma_data=0.25)
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100)
    assert (ed.sigma_min, ed.sigma_max, ed.sigma_data) == (0, float("inf"), 0.25)
    for net in (vp, ve, ed):
        assert torch.equal(net.round_sigma(torch.tensor([0.3, 7.0])), torch.tensor([0.3, 7.0]))
        assert isinstance(net.round_sigma(2.0), torch.Tensor)
    with pytest.raises(ValueError, match="model_type"):
        tiny(model_type="UNet2D")
    with pytest.raises(ValueError, match="encoder_type"):
        tiny(encoder_type="dense")


@pytest.mark.parametrize("model_type", ["SongUNet", "DhariwalUNet"])
def test_features_only_stops_after_the_last_tap(model_type):
    """``features()`` equals forward's features but never runs the decoder (the critic step's saving)."""
    net = tiny(model_type=model_type).eval()
    net.feature_resolutions = [net.encoder_resolutions[0]]
    x, sigma = torch.randn(2, net.img_channels, net.img_resolution, net.img_resolution), torch.tensor([0.5, 3.0])
    labels = torch.eye(net.label_dim)[:2] if net.label_dim else None
    full = net(x, sigma, labels, return_features=True)[1]

    def fail(*args, **kwargs):
        raise AssertionError("decoder ran")

    for module in net.model.dec.values():
        module.forward = fail
    only = net.features(x, sigma, labels)
    assert only.keys() == full.keys() and all(torch.equal(only[r], full[r]) for r in full)


def test_networks_never_drop_labels_and_teacher_training_does():
    """label_dropout is recorded for NVlabs/edm compatibility but never applied by a network, so the
    generator and fake score (teacher copies in training mode) always see their labels; dropping labels
    for CFG is done by teacher training alone (``drop_labels``)."""
    from fdistill.training.teacher_training import drop_labels

    for model_type in ("SongUNet", "DhariwalUNet"):
        net = tiny(model_type=model_type, label_dropout=0.9, dropout=0.0)
        x, sigma, labels = torch.randn(8, 3, 8, 8), torch.full((8,), 1.0), torch.eye(3)[torch.arange(8) % 3]
        with torch.no_grad():
            train_out = net.train()(x, sigma, labels)
            assert torch.equal(train_out, net.train()(x, sigma, labels))  # no random label dropout
            assert torch.allclose(train_out, net.eval()(x, sigma, labels), atol=1e-6)
        assert net.model.label_dropout == 0.9
    torch.manual_seed(0)
    dropped = drop_labels(torch.eye(3)[torch.arange(3000) % 3], 0.25)
    nulls = (dropped.sum(1) == 0).float().mean().item()
    assert abs(nulls - 0.25) < 0.03 and set(dropped.sum(1).tolist()) == {0.0, 1.0}
    assert drop_labels(None, 0.5) is None
