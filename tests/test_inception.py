"""Inception-v3 FID features (fdistill.inception) and `fdistill evaluate` in Inception space."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fdistill.apps import cli
from fdistill.config import cache_dir
from fdistill.evaluation import evaluate as evaluation
from fdistill.evaluation import inception
from fdistill.evaluation.inception import STATE_DICT_NAME, TORCHSCRIPT_NAME, FIDInceptionV3
from fdistill.evaluation.metrics import feature_statistics, frechet_distance
from fdistill.io import sha256

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

# Reference structure facts (pytorch-fid's FIDInceptionV3 = torchvision's Inception3 with aux_logits=False,
# num_classes=1008; its weights are pt_inception-2015-12-05-6726825d.pth):
# - 94 conv+BN units (stem 5, Mixed_5b-d 3 x 7, Mixed_6a 4, Mixed_6b-e 4 x 10, Mixed_7a 6, Mixed_7b-c 2 x 9),
#   each with conv.weight and bn.{weight,bias,running_mean,running_var,num_batches_tracked}, plus fc.{weight,bias}:
NUM_STATE_ENTRIES = 94 * 6 + 2  # 566
# - torchvision documents inception_v3's num_params as 27,161,264 (AuxLogits included, 1000 classes). AuxLogits
#   holds 3,326,696 (conv0 768*128 + BN 2*128, conv1 128*768*25 + BN 2*768, fc 768*1000 + 1000); 1008 classes add
#   8 * (2048 + 1) = 16,392 to fc:
NUM_PARAMETERS = 27_161_264 - 3_326_696 + 16_392  # 23,850,960
# Shapes from the reference block definitions (torchvision inception.py, pytorch-fid inception.py).
KEY_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_mean": (32,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7dbl_2.conv.weight": (128, 128, 7, 1),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.bn.running_var": (192,),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}
# Block outputs at 299x299 input (torchvision's shape comments): channels x side.
BLOCK_SHAPES = {"Mixed_5b": (256, 35), "Mixed_5c": (288, 35), "Mixed_5d": (288, 35), "Mixed_6a": (768, 17),
                "Mixed_6e": (768, 17), "Mixed_7a": (1280, 8), "Mixed_7b": (2048, 8), "Mixed_7c": (2048, 8)}


def _randomize(net: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights that keep activations O(1) through the 94 layers (PyTorch's default init makes them vanish)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def net_and_file(tmp_path_factory):
    net = _randomize(FIDInceptionV3())
    path = tmp_path_factory.mktemp("weights") / STATE_DICT_NAME
    torch.save(net.state_dict(), path)
    return net, path


def _images(n: int, channels: int = 3, size: int = 32, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


# -- the network ---------------------------------------------------------------------------------
def test_state_dict_matches_the_reference_structure(net_and_file):
    net, _ = net_and_file
    sd = net.state_dict()
    assert len(sd) == NUM_STATE_ENTRIES
    assert sum(p.numel() for p in net.parameters()) == NUM_PARAMETERS
    for key, shape in KEY_SHAPES.items():
        assert tuple(sd[key].shape) == shape, key
    assert sum(k.endswith(".conv.weight") for k in sd) == 94
    assert all(".conv.bias" not in k for k in sd) and not any("AuxLogits" in k for k in sd)
    assert all(m.eps == 1e-3 for m in net.modules() if isinstance(m, nn.BatchNorm2d))


def test_pth_loads_strict_and_gives_identical_features(net_and_file):
    net, path = net_and_file
    x = torch.cat([_images(1, 3, 32), _images(1, 1, 32, seed=1).repeat(1, 3, 1, 1)])
    blocks = {}
    hooks = [getattr(net, name).register_forward_hook(lambda m, i, o, name=name: blocks.__setitem__(name, o))
             for name in BLOCK_SHAPES]
    try:
        with torch.no_grad():
            direct = net(x)
    finally:
        for h in hooks:
            h.remove()
    assert direct.shape == (2, 2048) and direct.dtype == torch.float32
    assert direct.abs().mean() > 1e-3 and not torch.allclose(direct[0], direct[1])
    for name, (c, side) in BLOCK_SHAPES.items():
        assert tuple(blocks[name].shape) == (2, c, side, side), name
    # pool3 = spatial mean of Mixed_7c's output; the fc maps 2048 -> 1008 logits.
    torch.testing.assert_close(direct, blocks["Mixed_7c"].mean(dim=(2, 3)))
    assert net.logits(direct).shape == (2, 1008)

    ext = inception.load_inception(path)
    assert ext.kind == "state_dict" and ext.path == path
    torch.testing.assert_close(ext(x), direct, rtol=0, atol=0)
    # grayscale input is repeated to RGB; a non-299 resolution is resized to 299.
    torch.testing.assert_close(ext(x[1:, :1]), direct[1:], rtol=1e-5, atol=1e-6)


def test_preprocessing_matches_pytorch_fid(net_and_file):
    net, _ = net_and_file
    x = _images(2, 3, 16)
    expected = 2 * F.interpolate(x.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1
    torch.testing.assert_close(net.preprocess(x), expected)
    same = net.preprocess(_images(1, 3, 299))
    torch.testing.assert_close(same, _images(1, 3, 299).float() / 127.5 - 1, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        net.preprocess(x.float())


def test_pool_branches_follow_the_2015_12_05_graph(net_and_file):
    """A/C/E1 average pools ignore the zero padding (TF semantics); Mixed_7c's pool branch max-pools."""
    net, _ = net_and_file
    with torch.no_grad():
        for name, cin, width in (("Mixed_5b", 192, 32), ("Mixed_6b", 768, 192), ("Mixed_7b", 1280, 192)):
            out = getattr(net, name)(torch.ones(1, cin, 5, 5))[:, -width:]  # pool branch = last channels
            assert out.abs().sum() > 0
            # with count_include_pad=True the borders would see a smaller average
            torch.testing.assert_close(out, out[:, :, 2:3, 2:3].expand_as(out))
        spike = torch.zeros(1, 2048, 5, 5)
        spike[:, :, 2, 2] = 1.0
        out_spike = net.Mixed_7c(spike)[:, -192:]
        out_ones = net.Mixed_7c(torch.ones(1, 2048, 5, 5))[:, -192:]
    live = out_ones[0, :, 2, 2] != out_spike[0, :, 0, 0]
    assert live.sum() > 10
    # a max pool spreads the spike undiminished over its 3x3 neighbourhood (an average pool would give 1/9)
    for i, j in ((1, 1), (2, 2), (3, 1)):
        torch.testing.assert_close(out_spike[0, live, i, j], out_ones[0, live, 2, 2])


def test_pth_without_num_batches_tracked_and_wrong_files(net_and_file, tmp_path):
    net, _ = net_and_file
    old = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / STATE_DICT_NAME
    torch.save(old, path)
    loaded = inception.load_state_dict_net(path)
    assert torch.equal(loaded.fc.weight, net.fc.weight)
    bad = tmp_path / "other.pth"
    torch.save({**old, "AuxLogits.fc.weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="FID Inception"):
        inception.load_inception(bad)


# -- TorchScript path ----------------------------------------------------------------------------
class StandIn(nn.Module):
    """Tiny stand-in for NVIDIA's detector: uint8 RGB in, 16-d 'features' with return_features=True."""

    def __init__(self):
        super().__init__()
        self.register_buffer("proj", torch.randn(48, 16, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor:
        if x.dtype != torch.uint8 or x.shape[1] != 3:
            raise RuntimeError("the detector takes uint8 RGB images")
        f = F.adaptive_avg_pool2d(x.float(), [4, 4]).flatten(1) @ self.proj
        return f if return_features else f[:, :10]


def stand_in_features(x: Tensor) -> Tensor:
    return StandIn()(x.repeat(1, 3 // x.shape[1], 1, 1), return_features=True)


@pytest.fixture
def torchscript_dir(tmp_path, monkeypatch):
    """FDISTILL_CACHE holding the stand-in as inception-2015-12-05.pt, its digest accepted as a verified copy's."""
    cache = tmp_path / "cache"
    cache.mkdir()
    torch.jit.script(StandIn()).save(str(cache / TORCHSCRIPT_NAME))
    monkeypatch.setenv("FDISTILL_CACHE", str(cache))
    monkeypatch.setenv(inception.SHA256_ENV_VAR, sha256(cache / TORCHSCRIPT_NAME))
    monkeypatch.delenv(inception.ENV_VAR, raising=False)
    return cache


def test_torchscript_found_in_cache_dir_and_given_uint8(torchscript_dir, tmp_path, monkeypatch):
    ext = inception.load_inception()
    assert ext.kind == "torchscript" and ext.path == torchscript_dir / TORCHSCRIPT_NAME
    x = _images(3, 3, 12)
    torch.testing.assert_close(ext(x), stand_in_features(x))
    torch.testing.assert_close(ext(x[:, :1]), stand_in_features(x[:, :1]))
    with pytest.raises(ValueError, match="uint8"):
        ext(x.float())
    # explicit path and $FDISTILL_INCEPTION (a file or a folder) take precedence over the cache folder
    other = tmp_path / "elsewhere"
    other.mkdir()
    (torchscript_dir / TORCHSCRIPT_NAME).rename(other / TORCHSCRIPT_NAME)
    assert inception.load_inception(other).path == other / TORCHSCRIPT_NAME
    monkeypatch.setenv(inception.ENV_VAR, str(other / TORCHSCRIPT_NAME))
    assert inception.load_inception().path == other / TORCHSCRIPT_NAME


def test_batched_extraction(torchscript_dir):
    ext = inception.load_inception()
    x = _images(7, 3, 8)
    feats = inception.extract_features(ext, x, batch_size=3, progress=False)
    torch.testing.assert_close(feats, stand_in_features(x), rtol=1e-5, atol=1e-4)


# -- missing weights -----------------------------------------------------------------------------
def test_missing_weights_message_names_files_and_places(tmp_path, monkeypatch):
    monkeypatch.setenv("FDISTILL_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv(inception.ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError) as err:
        inception.load_inception()
    msg = str(err.value)
    for part in (TORCHSCRIPT_NAME, STATE_DICT_NAME, str(tmp_path / "empty-cache"), "FDISTILL_INCEPTION",
                 "--inception PATH"):
        assert part in msg
    with pytest.raises(FileNotFoundError, match="/nonexistent"):
        inception.load_inception("/nonexistent")


def test_cli_fails_on_missing_weights_before_reading_samples(tmp_path, monkeypatch, capsys):
    def no_samples(*args, **kwargs):
        raise AssertionError("samples were read before the weights were checked")

    monkeypatch.setattr(evaluation, "read_samples", no_samples)
    monkeypatch.setattr(np, "load", no_samples)
    rc = cli.main(["evaluate", str(tmp_path / "samples.npz"), "--data", "digits", "--inception", "/nonexistent"])
    err = capsys.readouterr().err
    assert rc == 2 and STATE_DICT_NAME in err and "/nonexistent" in err


# -- end to end ----------------------------------------------------------------------------------
@pytest.fixture
def npz_data(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "real.npz"
    np.savez(data, images=rng.integers(0, 256, (40, 3, 8, 8), dtype=np.uint8))
    samples = tmp_path / "samples.npz"
    np.savez(samples, images=rng.integers(0, 256, (30, 3, 8, 8), dtype=np.uint8), labels=np.arange(30) % 10)
    return data, samples


def test_evaluate_against_dataset_caches_real_features(torchscript_dir, npz_data, monkeypatch, capsys):
    data, samples = npz_data
    calls = []
    real_call = inception.InceptionExtractor.__call__
    monkeypatch.setattr(inception.InceptionExtractor, "__call__", lambda self, x: calls.append(len(x)) or
                        real_call(self, x))
    res = evaluation.evaluate_file(samples, str(data), batch_size=16)
    assert res["feature_space"] == "inception" and res["extractor"] == TORCHSCRIPT_NAME
    assert res["num_real"] == 40 and res["num_fake"] == 30 and sum(calls) == 70
    assert res["fid"] > 0 and 0 <= res["precision"] <= 1 and 0 <= res["recall"] <= 1
    cache = evaluation.reference_stats_path(str(data), inception.load_inception())
    assert str(cache) == res["reference_stats"] and cache.is_file() and cache.parent.parent == torchscript_dir
    with np.load(cache) as f:
        real, mu, sigma = torch.from_numpy(f["features"]), f["mu"], f["sigma"]
    assert real.shape == (40, 16)
    fake = stand_in_features(torch.from_numpy(np.load(samples)["images"]))
    assert res["fid"] == pytest.approx(frechet_distance(mu, sigma, *feature_statistics(fake)), rel=1e-9)
    torch.testing.assert_close(real, stand_in_features(torch.from_numpy(np.load(data)["images"])))

    calls.clear()
    mtime = cache.stat().st_mtime_ns
    assert cli.main(["evaluate", str(samples), "--data", str(data), "--no-progress"]) == 0
    assert calls == [30] and cache.stat().st_mtime_ns == mtime  # the real features came from the cache
    out = capsys.readouterr().out
    for key in ("feature_space", "fid", "precision", "recall", "num_real", "num_fake"):
        assert key in out
    assert f"{res['fid']:.4g}" in out

    st = data.stat()  # a modified dataset gets a new cache entry
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert evaluation.reference_stats_path(str(data), inception.load_inception()) != cache


def test_evaluate_against_ref_npz_gives_fid_only(torchscript_dir, npz_data, tmp_path, capsys):
    data, samples = npz_data
    real = stand_in_features(torch.from_numpy(np.load(data)["images"]))
    mu, sigma = feature_statistics(real)
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=mu, sigma=sigma)
    res = evaluation.evaluate_file(samples, ref=ref)
    fake = stand_in_features(torch.from_numpy(np.load(samples)["images"]))
    assert res["fid"] == pytest.approx(frechet_distance(mu, sigma, *feature_statistics(fake)), rel=1e-9)
    assert "precision" not in res and "needs --data" in res["note"] and res["num_fake"] == 30
    assert cli.main(["evaluate", str(samples), "--ref", str(ref)]) == 0
    assert "needs --data" in capsys.readouterr().out

    np.savez(ref, mu=mu[:4], sigma=sigma[:4, :4])
    with pytest.raises(ValueError, match="another feature extractor"):
        evaluation.evaluate_file(samples, ref=ref)
    np.savez(ref, mean=mu)
    with pytest.raises(ValueError, match="mu"):
        evaluation.evaluate_file(samples, ref=ref)


def test_evaluate_rejects_mismatched_sample_shape(torchscript_dir, npz_data, tmp_path):
    data, _ = npz_data
    gray = tmp_path / "gray.npz"
    np.savez(gray, images=np.zeros((10, 1, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="1x8x8"):
        evaluation.evaluate_file(gray, str(data))


def test_conftest_keeps_the_cache_out_of_home():
    assert os.environ["FDISTILL_CACHE"] and Path(os.environ["FDISTILL_CACHE"]) != Path.home() / ".cache" / "fdistill"
    assert cache_dir() == Path(os.environ["FDISTILL_CACHE"])
