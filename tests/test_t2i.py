"""Text-to-image distillation through the Stable Diffusion path, on tiny random SD1.5 / SDXL pipelines and
tiny captioned data: the steps, DMD2 as the reverse-KL case, export, warm starts, LoRA, latent shards."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import t2i_pipelines  # noqa: E402

from fdistill.apps import cli, distill, images, t2i  # noqa: E402
from fdistill.core.diffusion import one_step  # noqa: E402
from fdistill.core.objective import fdistill_loss  # noqa: E402
from fdistill.training import checkpoint  # noqa: E402
from fdistill.training.loop import training_loop  # noqa: E402

CAPTIONS = ["a red square", "a blue circle", "a green stripe", "a yellow dot", "a white cross", "a black ring"]
RUN = ["disc_resolutions=[4]", "disc_hidden=8", "guidance=1.75", "distill.batch_size=4", "distill.tau=2",
       "distill.log_every=1", "distill.r1_form=approx", "distill.sigmas.schedule=scaled_linear",
       "distill.sigmas.index_range=[1, 999]", "text.prompts=null"]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {"sd15": t2i_pipelines.sd15(root / "sd15"), "sdxl": t2i_pipelines.sdxl(root / "sdxl")}


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("captioned")
    rng = np.random.default_rng(0)
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return folder


def distiller(pipe, data, *overrides):
    cfg = images.load_config("digits", [f"data={data}", *RUN, *overrides])
    return distill.make_distiller(cfg, pipe)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_distill_runs_and_the_generator_reloads(pipes, captioned, family, tmp_path):
    d = distiller(pipes[family], captioned, "distill.iterations=4", "distill.divergence=js")
    assert d.sample_shape == (4, 8, 8) and d.sigma_gen == pytest.approx(14.6146, rel=1e-4)
    history = training_loop(d, run_dir=tmp_path, progress=False)
    assert [h["kind"] for h in history] == ["student", "critic"] * 2
    assert all(np.isfinite(v) for h in history for v in h.values() if isinstance(v, float))
    generator, student, sd = distill.load_generator(tmp_path)
    x = t2i.generate_images(generator, student, sd, ["a red square", "a blue circle"], seed=3)
    assert x.shape == (2, 3, 16, 16) and x.abs().max() <= 1
    torch.testing.assert_close(generator.unet.state_dict(), d.generator_ema.unet.state_dict())


def test_reverse_kl_student_step_is_the_dmd2_update(pipes, captioned):
    """With reverse-KL (h = 1) and no GAN term, the generator's gradient is DMD2's: for x = G(z) noised to
    x_t, grad = (x0_fake - x0_real) / mean|x - x0_real| with the guided teacher's x0_real, loss
    0.5 ||x - sg(x - grad)||^2 (tianweiy/DMD2, sd_guidance.py)."""
    d = distiller(pipes["sd15"], captioned, "distill.divergence=reverse_kl", "distill.gan_weight=0",
                  "distill.grad_clip=null")
    draws, start = [], copy.deepcopy(d.generator)
    for name in ("_randn", "_sigma"):
        real = getattr(d, name)
        setattr(d, name, lambda real=real: draws.append(real()) or draws[-1])
    grads = {}
    d.opt_g.step = lambda: grads.update({n: p.grad.clone() for n, p in d.generator.named_parameters()})
    prompts_state = d.real_data.state_dict()
    d.step()
    z, sigma, eps = draws
    d.real_data.load_state_dict(prompts_state)  # the same prompts again
    cond = d.sample_cond(4, d.local)
    x = one_step(start, z, d.sigma_gen, cond)
    x_t = x + sigma[:, None, None, None] * eps
    with torch.no_grad():
        x0_real, x0_fake = d.teacher(x_t, sigma, cond), d.fake_score(x_t, sigma, cond)
        grad = (x0_fake - x0_real) / (x - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    (0.5 * torch.nn.functional.mse_loss(x, (x - grad).detach())).backward()
    for n, p in start.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-7)
    ours, _ = fdistill_loss(x.detach(), x0_real, x0_fake, torch.ones(4))  # the same function, by construction
    assert torch.isfinite(ours)


def test_each_step_updates_only_its_networks(pipes, captioned):
    d = distiller(pipes["sdxl"], captioned, "distill.divergence=forward_kl")
    nets = {"generator": d.generator, "fake_score": d.fake_score, "discriminator": d.discriminator,
            "teacher": d.teacher, "text": d.real_data.pipe.text, "vae": d.real_data.pipe.codec}
    before = {k: [p.detach().clone() for p in m.parameters()] for k, m in nets.items()}

    def changed():
        return {k for k, m in nets.items() if any(not torch.equal(a, b) for a, b in zip(before[k], m.parameters()))}

    d.step()  # student
    assert changed() == {"generator"}
    assert all(p.grad is None for p in [*d.fake_score.parameters(), *d.teacher.parameters()])
    before = {k: [p.detach().clone() for p in m.parameters()] for k, m in nets.items()}
    d.step()  # critic
    assert changed() == {"fake_score", "discriminator"}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_export_round_trip_gives_the_same_image(pipes, captioned, family, tmp_path, capsys):
    from diffusers import DiffusionPipeline

    run = tmp_path / "run"
    assert cli.main(["distill", "--teacher", str(pipes[family]), "--out", str(run), "--no-progress",
                     f"data={captioned}", *RUN, "distill.iterations=2"]) == 0
    assert cli.main(["sample", "--checkpoint", str(run), "--prompt", "a red square", "--prompt", "a black ring",
                     "--seed", "7"]) == 0
    ours = np.asarray(Image.open(run / "samples" / "000001.png"))
    assert "000001\t8\ta black ring" in (run / "samples" / "prompts.txt").read_text()
    assert cli.main(["export", "--checkpoint", str(run), "--diffusers", str(tmp_path / "exported")]) == 0
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "exported", local_files_only=True)
    assert type(pipe).__name__ == {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}[family]
    theirs = pipe("a black ring", num_inference_steps=1, guidance_scale=0, output_type="np",
                  generator=torch.Generator().manual_seed(8)).images[0]
    theirs = (theirs * 255).round().astype(np.uint8)
    assert ours.shape == theirs.shape == (16, 16, 3)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_warm_up_with_h_one_then_the_divergence(pipes, captioned):
    d = distiller(pipes["sd15"], captioned, "distill.divergence=forward_kl", "distill.h_warmup=2")
    first = d.step()  # iteration 0 < h_warmup: h = 1
    assert first["h_min"] == first["h_max"] == 1
    d.step()
    d.step()  # iteration 2: forward-KL's h = r, normalized
    assert d.iteration == 3


def test_init_from_a_reverse_kl_run(pipes, captioned, tmp_path):
    rkl = distiller(pipes["sd15"], captioned, "distill.divergence=reverse_kl", "distill.iterations=2")
    training_loop(rkl, run_dir=tmp_path / "rkl", progress=False)
    js = distiller(pipes["sd15"], captioned, "distill.divergence=js")
    js.init_from(tmp_path / "rkl")
    for name in ("generator", "fake_score", "discriminator"):
        for a, b in zip(js.modules()[name].state_dict().values(), rkl.modules()[name].state_dict().values()):
            assert torch.equal(a, b)
    other = distiller(pipes["sd15"], captioned, "disc_hidden=16")
    with pytest.raises(ValueError, match="does not fit this run.s discriminator"):
        other.init_from(tmp_path / "rkl")


def test_lora_trains_only_the_adapters_and_exports_merged(pipes, captioned, tmp_path):
    pytest.importorskip("peft")
    d = distiller(pipes["sd15"], captioned, "text.lora_rank=2", "distill.iterations=2")
    trained = {n for n, p in d.generator.named_parameters() if p.requires_grad}
    assert trained and all("lora" in n for n in trained)
    base = {n: p.detach().clone() for n, p in d.generator.named_parameters() if not p.requires_grad}
    training_loop(d, run_dir=tmp_path, progress=False)
    assert all(torch.equal(p, base[n]) for n, p in d.generator.named_parameters() if n in base)
    generator, _, _ = distill.load_generator(tmp_path)
    assert not any("lora" in n for n, _ in generator.named_parameters())  # merged into the weights


def test_prepare_latents_then_train_from_them(pipes, captioned, tmp_path, capsys):
    out = tmp_path / "latents"
    assert cli.main(["prepare-latents", "--teacher", str(pipes["sdxl"]), "--data", str(captioned), "--out", str(out),
                     "--batch", "4", "--shard-size", "4", "--no-progress"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert sum(s["samples"] for s in index["shards"]) == len(CAPTIONS)
    assert cli.main(["prepare-latents", "--teacher", str(pipes["sdxl"]), "--data", str(captioned), "--out", str(out),
                     "--no-progress"]) == 0  # everything is done already: nothing is encoded twice
    assert sum(s["samples"] for s in json.loads((out / "index.json").read_text())["shards"]) == len(CAPTIONS)
    run = tmp_path / "run"
    assert cli.main(["distill", "--teacher", str(pipes["sdxl"]), "--out", str(run), "--no-progress", f"data={out}",
                     *RUN, "distill.iterations=2"]) == 0
    assert checkpoint.latest(run).name == "000000002"


def test_bad_captioned_data_is_named_and_skipped_or_fatal(pipes, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"caption {i}")
    (folder / "2.png").write_bytes(b"not a png")
    (folder / "4.txt").unlink()  # an image without its caption
    args = ["prepare-latents", "--teacher", str(pipes["sd15"]), "--data", str(folder), "--no-progress"]
    assert cli.main([*args, "--out", str(tmp_path / "strict"), "--on-bad-data", "error"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and ("4" in err or "2.png" in err) and "Traceback" not in err
    assert cli.main([*args, "--out", str(tmp_path / "lenient")]) == 0
    err = capsys.readouterr().err
    assert "2" in err and "warning" in err
    index = json.loads((tmp_path / "lenient" / "index.json").read_text())
    assert sum(s["samples"] for s in index["shards"]) == 3  # 0, 1, 3
    assert cli.main(["sample", "--checkpoint", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    assert "nothing is there" in capsys.readouterr().err


TABLE5 = {  # the paper's COYO-700M (SD1.5) and COYO-700M-Aesthetic-6.5 (SDXL) columns
    "sd15": dict(batch_size=1024, tau=10, gan_weight=1e-3, iterations=60000, lr=1e-5, weight_decay=1e-2,
                 r1_gamma=1.0, divergence="js"),
    "sdxl": dict(batch_size=384, tau=5, gan_weight=5e-3, iterations=25000, lr=5e-7, weight_decay=1e-2,
                 r1_gamma=1.0, divergence="js"),
}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_presets_carry_table5_and_run(pipes, captioned, family, tmp_path):
    from fdistill.config import to_dict

    cfg = images.load_config(family)
    got = to_dict(cfg.distill)
    assert {k: got[k] for k in TABLE5[family]} == TABLE5[family]
    assert cfg.guidance == {"sd15": 1.75, "sdxl": 8}[family] and cfg.distill.sigmas.schedule == "scaled_linear"
    tiny = [f"data={captioned}", "disc_resolutions=[4]", "disc_hidden=8", "distill.batch_size=4",
            "distill.micro_batch=2", "distill.iterations=3", "distill.log_every=1", "distill.tau=2"]
    d = distill.make_distiller(images.load_config(family, tiny), pipes[family])
    assert d.generator_ema is d.generator  # no EMA for text-to-image, as FastGen and DMD2
    history = training_loop(d, run_dir=tmp_path, progress=False)
    assert all(np.isfinite(v) for h in history for v in h.values() if isinstance(v, float))
    assert "generator_ema" not in checkpoint.read(tmp_path).weights
    generator, student, sd = distill.load_generator(tmp_path)  # falls back to the generator
    assert t2i.generate_images(generator, student, sd, ["a dog"]).shape == (1, 3, 16, 16)


def test_the_sdxl_preset_taps_the_mid_block_of_a_smaller_sdxl_layout(pipes, captioned):
    """``disc_resolutions: [mid]`` resolves against the loaded UNet: the preset written for 1024 px (mid block
    32 x 32) runs on any SDXL-layout pipeline, here a tiny one whose mid block is 4 x 4."""
    cfg = images.load_config("sdxl", [f"data={captioned}", "distill.batch_size=4", "distill.fsdp=false",
                                      "distill.precision=fp32", "text.prompts=null",
                                      "text.gradient_checkpointing=false"])
    d = distill.make_distiller(cfg, pipes["sdxl"])
    assert d.discriminator.keys == [min(d.teacher.net.encoder_resolutions)] == [4]
    assert torch.isfinite(d.step()["loss_fdistill"])
