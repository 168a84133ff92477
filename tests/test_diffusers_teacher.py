"""Diffusers DDPM UNets as EDM teachers: the VP conversion against the scheduler's own x0 prediction,
the discriminator features, and a short distillation from a tiny random pipeline folder."""

import json
import math
import os
import sys

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported: never reach the hub (~20 s of retries)
pytest.importorskip("diffusers")

from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

from fdistill.apps import cli, distill, images  # noqa: E402
from fdistill.teachers import diffusers_unet  # noqa: E402
from fdistill.teachers.diffusers_unet import DiffusersDenoiser  # noqa: E402
from fdistill.teachers.loading import build_network, load_network  # noqa: E402
from fdistill.training.loop import training_loop  # noqa: E402

TINY_UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                 norm_num_groups=8, attention_head_dim=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def tiny_unet(**overrides) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(**{**TINY_UNET, **overrides}).eval()


def scheduler(**overrides) -> DDPMScheduler:
    return DDPMScheduler(**{"clip_sample": False, **overrides})  # DDPM linear 1e-4..0.02, 1000 steps


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """google/ddpm-cifar10-32's layout: model_index.json, unet/, scheduler/ (class-conditional here)."""
    out = tmp_path_factory.mktemp("ddpm")
    DDPMPipeline(unet=tiny_unet(num_class_embeds=10), scheduler=scheduler()).save_pretrained(out)
    return out


def grid_sigma(sched: DDPMScheduler, t: int) -> float:
    abar = sched.alphas_cumprod.double()[t]
    return math.sqrt((1 - abar) / abar)


def scheduler_x0(unet, sched, x_edm, sigma, t, labels=None):
    """The scheduler's own x0 prediction at integer t for the EDM input x_edm = x0 + sigma eps."""
    x_t = x_edm / (1 + torch.tensor(sigma, dtype=torch.float32) ** 2).sqrt()  # x_t = sqrt(abar) x_edm
    with torch.no_grad():
        out = unet(x_t, t, class_labels=labels).sample
    return sched.step(out, t, x_t, generator=torch.Generator().manual_seed(0)).pred_original_sample


def test_pipeline_folder_loads_as_an_edm_teacher(pipeline_dir):
    net, precond, kwargs = load_network(pipeline_dir)
    assert precond == "diffusers" and isinstance(net, DiffusersDenoiser) and not net.training
    assert (kwargs["img_resolution"], kwargs["img_channels"], kwargs["label_dim"]) == (8, 1, 10)
    assert kwargs["folder"] == str(pipeline_dir.resolve())
    json.dumps(kwargs)
    assert (net.img_resolution, net.img_channels, net.label_dim) == (8, 1, 10)
    sched = DDPMScheduler.from_pretrained(pipeline_dir / "scheduler")
    assert net.sigma_min == pytest.approx(grid_sigma(sched, 0)) and net.sigma_max == pytest.approx(157.4, abs=0.1)
    again = build_network(precond, kwargs)  # the architecture alone, for load_state_dict
    again.load_state_dict(net.state_dict(), strict=True)
    x, s, c = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 20.0]), torch.eye(10)[[3, 7]]
    assert torch.equal(net(x, s, c), again.eval()(x, s, c))


def test_epsilon_conversion_is_the_schedulers_x0(pipeline_dir):
    net, _, _ = load_network(pipeline_dir)
    sched = DDPMScheduler.from_pretrained(pipeline_dir / "scheduler")
    x0, eps, labels = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.eye(10)[[2, 9]]
    for t in [0, 1, 10, 250, 500, 998, 999]:
        sigma = grid_sigma(sched, t)
        assert net.timestep(torch.tensor([sigma], dtype=torch.float64)).item() == t
        x = x0 + sigma * eps
        ref = scheduler_x0(net.unet, sched, x, sigma, t, labels=torch.tensor([2, 9]))
        for dtype in (torch.float64, torch.float32):
            with torch.no_grad():
                d = net(x, torch.full((2,), sigma, dtype=dtype), labels)
            assert d.dtype == torch.float32
            # D = x - sigma eps_hat: an eps-space difference is amplified by sigma, so compare relative to it
            torch.testing.assert_close(d, ref, atol=1e-5 * (1 + sigma), rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_v_and_sample_conversions(prediction_type):
    unet, sched = tiny_unet(), scheduler(prediction_type=prediction_type, beta_schedule="squaredcos_cap_v2")
    net = DiffusersDenoiser(unet, diffusers_unet.alphas_cumprod(dict(sched.config)), prediction_type)
    assert net.sigma_data == {"v_prediction": 1.0, "sample": 0.5}[prediction_type]
    x0, eps = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    for t in [3, 400, 900]:
        sigma = grid_sigma(sched, t)
        x = x0 + sigma * eps
        with torch.no_grad():
            d = net(x, torch.tensor(sigma, dtype=torch.float64))
        torch.testing.assert_close(d, scheduler_x0(unet, sched, x, sigma, t), atol=1e-5 * (1 + sigma), rtol=1e-5)


def test_fractional_sigmas_interpolate_log_sigma(pipeline_dir):
    net, _, _ = load_network(pipeline_dir)
    sched = DDPMScheduler.from_pretrained(pipeline_dir / "scheduler")
    s10, s11 = grid_sigma(sched, 10), grid_sigma(sched, 11)
    mid = torch.tensor([math.sqrt(s10 * s11)], dtype=torch.float64)  # halfway in log sigma
    assert net.timestep(mid).item() == pytest.approx(10.5, abs=1e-6)
    sigmas = torch.logspace(-3, 3, 400)  # beyond both ends of the grid: clamped to [0, T-1]
    t = net.timestep(sigmas)
    assert (t.diff() >= 0).all() and t[0] == 0 and t[-1] == 999
    inside = (sigmas > net.sigma_min) & (sigmas < net.sigma_max)
    assert (t[inside].diff() > 0).all()
    # D is continuous in sigma between grid points (t is fractional, not rounded)
    x, c = torch.randn(1, 1, 8, 8), torch.eye(10)[:1]
    with torch.no_grad():
        d = torch.cat([net(x, s, c) for s in torch.linspace(s10, s11, 5)])
    assert ((d[1:] - d[:-1]).abs().max() < 0.05) and (d[1:] != d[:-1]).any()


def test_features_stop_before_the_up_path(pipeline_dir):
    net, _, _ = load_network(pipeline_dir)
    assert net.encoder_resolutions == [8, 4] and net.feature_resolutions == [8, 4]
    assert net.feature_channels() == {8: 16, 4: 32}
    x, s, c = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 50.0]), torch.eye(10)[:3]
    with torch.no_grad():
        d, full = net(x, s, c, return_features=True)
        assert torch.equal(d, net(x, s, c))
    assert {r: tuple(f.shape) for r, f in full.items()} == {8: (3, 16, 8, 8), 4: (3, 32, 4, 4)}

    def fail(*args, **kwargs):
        raise AssertionError("up path ran")

    net.unet.mid_block.forward = fail
    for block in net.unet.up_blocks:
        block.forward = fail
    with torch.no_grad():
        only = net.features(x, s, c)
    assert only.keys() == full.keys() and all(torch.equal(only[r], full[r]) for r in full)
    net.feature_resolutions = [8]
    assert net.feature_channels() == {8: 16} and list(net.features(x, s, c)) == [8]
    with pytest.raises(ValueError, match="not encoder resolutions"):
        net.feature_resolutions = [2]


def test_class_labels_are_indices_without_a_null_label(pipeline_dir):
    net, _, _ = load_network(pipeline_dir)
    x, s = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 5.0])
    with torch.no_grad():
        d = net(x, s, torch.eye(10)[[4, 0]])
        t = net.timestep(s)
        eps = net.unet(x / (1 + s.reshape(-1, 1, 1, 1) ** 2).sqrt(), t, class_labels=torch.tensor([4, 0])).sample
    torch.testing.assert_close(d, x - s.reshape(-1, 1, 1, 1) * eps)
    with pytest.raises(ValueError, match="null"):
        net(x, s, torch.zeros(2, 10))
    with pytest.raises(ValueError, match="class-conditional"):
        net(x, s)


def test_distill_a_diffusers_teacher(pipeline_dir, tmp_path):
    cfg = images.load_config(cli.DIGITS_PRESET, ["disc_hidden=8", "distill.batch_size=4", "distill.tau=2",
                                                 "distill.iterations=3", "distill.log_every=1"])
    d = distill.make_distiller(cfg, pipeline_dir)
    assert isinstance(d.generator, DiffusersDenoiser) and d.generator.unet is not d.teacher.net.unet
    assert all(p.requires_grad for p in d.generator.parameters())
    training_loop(d, run_dir=tmp_path, progress=False)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in log] == ["student", "critic", "student"]
    assert math.isfinite(log[1]["r1"])  # R1 differentiates twice through the teacher's down-path attention
    losses = [v for e in log for k, v in e.items() if k.startswith("loss")]
    assert losses and all(math.isfinite(v) for v in losses)

    net, student, teacher = distill.load_generator(tmp_path)
    info = teacher.info
    assert info["precond"] == "diffusers" and isinstance(net, DiffusersDenoiser)
    for k, v in d.generator_ema.state_dict().items():
        assert torch.equal(v, net.state_dict()[k]), k
    x, labels = images.generate(net, 4, (1, 8, 8), info["network"]["label_dim"], student)
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all() and labels.shape == (4, 10)


def test_bare_unet_folders(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "alone")
    with pytest.warns(UserWarning, match="no scheduler config"):
        net, _, kwargs = load_network(tmp_path / "alone")
    assert kwargs["label_dim"] == 0 and net.sigma_max == pytest.approx(157.4, abs=0.1)
    unet.save_pretrained(tmp_path / "pipe" / "unet")  # a unet/ folder finds ../scheduler
    scheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        tmp_path / "pipe" / "scheduler")
    net, _, _ = load_network(tmp_path / "pipe" / "unet")
    assert net.sigma_max == pytest.approx(14.6, abs=0.1)  # SD's schedule
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        assert torch.isfinite(net(x, 1.0, torch.eye(10)[:1])).all()  # labels are ignored when unconditional


def test_invalid_folders_are_explained(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="missing: nothing is there; expected"):
        load_network(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: it is an empty folder; expected .*diffusers model folder"):
        load_network(tmp_path / "empty")
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(NotImplementedError, match="only UNet2DModel"):
        load_network(tmp_path / "sd")
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(ValueError, match="without a UNet"):
        load_network(tmp_path / "pipe")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    with pytest.raises(ImportError, match=r"fdistill\[diffusers\]"):
        build_network("diffusers", {"unet_config": TINY_UNET})
