"""The image pipeline end to end on real digits with a tiny EDM UNet (random or briefly trained)."""

import json

import numpy as np
import pytest
import torch
from tiny import DISTILL, TINY

from fdistill.apps import cli, distill, images
from fdistill.data.datasets import load_dataset
from fdistill.data.sampler import ImageSampler
from fdistill.networks.heads import ConvHead, Discriminator
from fdistill.teachers.base import Teacher
from fdistill.teachers.guidance import GuidedDenoiser
from fdistill.teachers.loading import build_network, load_network, save_network
from fdistill.training.loop import training_loop


@pytest.mark.parametrize("res", [2, 4, 8, 16, 32])
def test_conv_head_gives_one_logit_per_sample(res):
    head = ConvHead(channels=6, resolution=res, hidden=8)
    assert head(torch.randn(3, 6, res, res)).shape == (3,)


def test_discriminator_averages_heads():
    d = Discriminator.conv({8: 4, 4: 6}, hidden=8)
    feats = {8: torch.randn(2, 4, 8, 8), 4: torch.randn(2, 6, 4, 4)}
    expected = (d.heads["8"](feats[8]) + d.heads["4"](feats[4])) / 2
    assert torch.allclose(d(feats), expected)


def test_generate_draws_sample_i_from_seed_plus_i_whatever_the_batch(teacher_path):
    net, _, _ = load_network(teacher_path)
    a, labels = images.generate(net, 5, (1, 8, 8), 10, student=80.0, batch_size=2, seed=3)
    b, _ = images.generate(net, 5, (1, 8, 8), 10, student=80.0, batch_size=5, seed=3)
    assert torch.allclose(a, b, atol=1e-5) and labels.argmax(1).tolist() == [0, 1, 2, 3, 4]
    make = distill.sample_maker(net, Teacher(net, (1, 8, 8), {}, "", label_dim=10), student=80.0)
    assert torch.allclose(make([3], [6])[0], a[3], atol=1e-5)  # sample 3: class 3, seed 3 + 3
    assert not torch.allclose(make([3], [7])[0], a[3], atol=1e-3)


def test_teacher_file_round_trip(teacher_path):
    net, precond, kwargs = load_network(teacher_path)
    assert precond == "EDMPrecond" and kwargs["label_dim"] == 10 and kwargs["img_resolution"] == 8
    x, s, c = torch.randn(4, 1, 8, 8), torch.full((4,), 1.5), torch.eye(10)[:4]
    again, _, _ = load_network(teacher_path)
    assert torch.equal(net(x, s, c), again(x, s, c))
    with pytest.raises(FileNotFoundError, match="EDM pickle"):
        load_network(teacher_path.with_suffix(".pkl"))
    with pytest.raises(FileNotFoundError):
        load_network(teacher_path.parent / "missing.safetensors")


def test_guided_denoiser_is_cfg(teacher_path):
    net, _, _ = load_network(teacher_path)
    x, s, c = torch.randn(3, 1, 8, 8), torch.full((3,), 0.7), torch.eye(10)[:3]
    d_c, d_u = net(x, s, c), net(x, s, torch.zeros_like(c))
    assert torch.allclose(GuidedDenoiser(net, 1.0)(x, s, c), d_c)
    g, feats = GuidedDenoiser(net, 2.5)(x, s, c, return_features=True)
    assert torch.allclose(g, d_u + 2.5 * (d_c - d_u), atol=1e-6)
    ref = net(x, s, c, return_features=True)[1]
    assert all(torch.equal(feats[r], ref[r]) for r in ref)  # features of the conditional pass


def test_distill_sample_evaluate_cli(teacher_path, tmp_path, capsys):
    run = tmp_path / "js"
    assert cli.main(["distill", "--teacher", str(teacher_path), "--out", str(run), "--no-progress",
                     "distill.iterations=4", *TINY, *DISTILL]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in log] == ["student", "critic", "student", "critic"]
    assert "h_mean" in log[0] and "r1" in log[1]

    assert cli.main(["sample", "--checkpoint", str(run), "--num-samples", "40"]) == 0  # the run folder is enough
    samples = run / "samples"
    with np.load(samples / "samples.npz") as f:
        assert f["images"].shape == (40, 1, 8, 8) and f["images"].dtype == np.uint8
        assert (f["labels"] == np.arange(40) % 10).all()
    assert (samples / "grid.png").is_file()
    assert "1 NFE" in capsys.readouterr().out

    assert cli.main(["sample", "--teacher", str(teacher_path), "--num-samples", "20", "--steps", "3",
                     "--out", str(tmp_path / "t")]) == 0
    assert "5 NFE" in capsys.readouterr().out and (tmp_path / "t" / "samples.npz").is_file()

    assert cli.main(["evaluate", str(samples)]) == 0
    out = capsys.readouterr().out
    for key in ("fid", "precision", "recall", "class_accuracy"):
        assert key in out


def test_image_resume_is_exact(teacher_path, tmp_path):
    cfg = images.load_config(cli.DIGITS_PRESET, [*TINY, *DISTILL, "distill.iterations=6"])
    data = load_dataset("digits")
    torch.manual_seed(0)
    full = distill.make_distiller(cfg, teacher_path, data)
    training_loop(full, progress=False)
    cfg.distill.iterations = 3
    first = distill.make_distiller(cfg, teacher_path, data)
    training_loop(first, run_dir=tmp_path, progress=False)
    cfg.distill.iterations = 6
    resumed = distill.make_distiller(cfg, teacher_path, data)
    resumed.real_data(5)  # advance its data stream: the checkpoint must restore it
    resumed.load(tmp_path)  # the run folder: its newest checkpoint
    training_loop(resumed, progress=False)
    for k, v in full.generator.state_dict().items():
        assert torch.equal(v, resumed.generator.state_dict()[k]), k
    assert isinstance(resumed.real_data, ImageSampler)


def test_bad_disc_resolution_is_explained(teacher_path):
    cfg = images.load_config(cli.DIGITS_PRESET, [*TINY, "disc_resolutions=[16]"])
    with pytest.raises(ValueError, match="disc_resolutions"):
        distill.make_distiller(cfg, teacher_path)


def test_distill_writes_tensorboard_scalars(teacher_path, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert cli.main(["distill", "--teacher", str(teacher_path), "--out", str(tmp_path), "--no-progress",
                     "--tensorboard", "distill.iterations=4", *TINY, *DISTILL]) == 0
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"loss_fdistill", "h_max", "loss_gan_d", "r1"} <= set(tags)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in log] == [0, 1, 2, 3]  # log_every=1: every iteration, once
    steps = [e.step for e in events.Scalars("loss_gan_d")]
    assert steps == [e["iteration"] for e in log if "loss_gan_d" in e] == [1, 2, 3]  # from the first critic step on
    assert events.Scalars("loss_fdistill")[0].value == pytest.approx(log[0]["loss_fdistill"], rel=1e-6)


def test_channels_last_gives_the_same_training(tmp_path):
    """NHWC networks (DistillConfig.channels_last) compute the same steps as NCHW ones (dropout off,
    since dropout masks are drawn in memory order)."""
    kwargs = dict(img_resolution=8, img_channels=1, label_dim=10, model_type="SongUNet", model_channels=8,
                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
    path = save_network(build_network("EDMPrecond", kwargs), "EDMPrecond", kwargs, tmp_path / "t.st")
    runs = []
    for flag in ("false", "true"):
        cfg = images.load_config(cli.DIGITS_PRESET, [*DISTILL, "disc_hidden=8", "distill.iterations=3",
                                                     f"distill.channels_last={flag}"])
        d = distill.make_distiller(cfg, path)
        training_loop(d, progress=False)
        runs.append(d.generator)
    assert runs[1].model.enc["8x8_conv"].weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(runs[0].parameters(), runs[1].parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
