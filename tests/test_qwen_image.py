"""Qwen-Image teachers (QwenImagePipeline, diffusers 0.42) on a tiny random pipeline written by diffusers'
save_pretrained (tests/qwen_pipelines.py): the folder is recognised and loads offline; the text encoder gives the
pipeline's prompt embeddings and mask, zero-padded to the fixed length; the denoiser is the x0 of the pipeline's
own transformer calls and Euler step, unguided and with true CFG (whose norm rescale fdistill's GuidedDenoiser
leaves out, by exactly that rescale); distill, sample and export through the CLI with the qwen_image preset,
the exported pipeline's one step giving fdistill's sample; broken folders refused in one line; options and the
checkpoint record."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import qwen_pipelines  # noqa: E402

from fdistill.core.diffusion import one_step  # noqa: E402
from fdistill.data.conditions import TextCondition  # noqa: E402
from fdistill.teachers import flow_matching as fm  # noqa: E402
from fdistill.teachers.families import qwen_image as qi  # noqa: E402
from fdistill.teachers.guidance import GuidedDenoiser  # noqa: E402
from fdistill.teachers.open import family_of, open_teacher, teacher_from_info  # noqa: E402

PROMPTS = ["a handwritten seven", "a photo of a cat on a bike with a much longer description"]
PROMPT = "a photo of a cat on a bike"
R = qwen_pipelines.IMAGE_SIZE  # 32 px: 4 x 4 latents, 2 x 2 tokens


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return qwen_pipelines.qwen_image(tmp_path_factory.mktemp("qwen") / "qwen")


@pytest.fixture(scope="module")
def teacher(folder):
    return open_teacher(folder, R)


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import QwenImagePipeline

    p = QwenImagePipeline.from_pretrained(folder, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


def padded(embeds, mask, length):
    """The pipeline's (embeds, mask or None) zero-padded to ``length`` tokens with the mask."""
    b, n, _ = embeds.shape
    mask = torch.ones(b, n, dtype=torch.long) if mask is None else mask
    return (torch.cat([embeds, embeds.new_zeros(b, length - n, embeds.shape[2])], 1),
            torch.cat([mask, mask.new_zeros(b, length - n)], 1))


# -- (a) recognised, loaded offline, the pipeline's text encoding and VAE ------------------------------------------
def test_folder_is_recognised_and_encodes_prompts_as_the_pipeline(folder, teacher, pipe):
    assert family_of(folder).kind == "qwen_image"
    assert type(teacher) is qi.QwenImageTeacher and teacher.info["family"] == "qwen_image"
    assert teacher.sample_shape == (16, 4, 4) and teacher.sigma_range == pytest.approx((0.001 / 0.999, 999.0))
    json.dumps(teacher.info)
    ours = (qi.TEMPLATE, qi.DROP_TOKENS, qi.TOKENIZER_MAX_LENGTH)
    assert ours == (pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx, pipe.tokenizer_max_length)
    assert teacher.text.sequence_length == 512 and teacher.info["network"]["max_sequence_length"] == 512
    with torch.no_grad():
        cond = teacher.text(PROMPTS)
        embeds, mask = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=512)  # padded to the longest
        single, single_mask = pipe.encode_prompt(PROMPT, device="cpu", max_sequence_length=512)
        one = teacher.text([PROMPT])
        empty, empty_mask = pipe.encode_prompt("", device="cpu", max_sequence_length=512)
    assert cond.embeds.shape == (2, 512, 32) and cond.mask.dtype == torch.long and mask is not None
    for ours, theirs in ((cond, padded(embeds, mask, 512)), (one, padded(single, single_mask, 512))):
        torch.testing.assert_close(ours.embeds, theirs[0], rtol=0, atol=1e-6)
        assert torch.equal(ours.mask, theirs[1])
    assert single_mask is None and int(one.mask.sum()) == single.shape[1]  # the prompt + the assistant suffix
    null = teacher.denoiser.null_condition(cond)  # the encoded empty prompt: its 5 suffix tokens, then zeros
    torch.testing.assert_close(null.embeds, padded(empty, empty_mask, 512)[0].expand(2, -1, -1), rtol=0, atol=1e-6)
    assert null.mask[:, :5].all() and not null.mask[:, 5:].any()
    # the VAE: [B, C, 1, H, W] inside, per-channel (z - mean) / std, decoded z * std + mean (the pipeline's)
    codec, vae = teacher.codec, pipe.vae
    assert (codec.downsample, codec.channels) == (pipe.vae_scale_factor, 16) == (8, 16)
    mean = torch.tensor(qwen_pipelines.LATENTS_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(qwen_pipelines.LATENTS_STD).view(1, 16, 1, 1, 1)
    images = torch.rand(2, 3, R, R) * 2 - 1
    with torch.no_grad():
        z = vae.encode(images[:, :, None]).latent_dist.sample(torch.Generator().manual_seed(3))
        ours = codec.encode(images, torch.Generator().manual_seed(3))
        torch.testing.assert_close(ours, ((z - mean) / std)[:, :, 0])
        decoded = vae.decode(ours[:, :, None] * std + mean).sample[:, :, 0]
        torch.testing.assert_close(codec.decode(ours), decoded.clamp(-1, 1))


# -- (b) the denoiser is the pipeline's x0, unguided and with true CFG ------------------------------------------------
def _velocities(pipe, x_t, t, prompts, negative):
    """The packed velocities of the pipeline's two transformer calls (pipeline_qwenimage.py, the denoising loop):
    (v_cond, v_guided before the rescale, v_guided as the pipeline steps with it)."""
    b = x_t.shape[0]
    packed = pipe._pack_latents(x_t, b, 16, 4, 4)

    def v(text):
        embeds, mask = pipe.encode_prompt(text, device="cpu", max_sequence_length=512)
        return pipe.transformer(hidden_states=packed, timestep=torch.full((b,), 1000 * t) / 1000,
                                encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                                img_shapes=[[(1, 2, 2)]] * b, return_dict=False)[0]

    cond = v(prompts)
    if negative is None:
        return packed, cond, cond, cond
    neg = v(negative)
    comb = neg + 4.0 * (cond - neg)
    return packed, cond, comb, comb * (cond.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))


def _step_to_zero(pipe, packed, v, t):
    """The scheduler's Euler step from sigma t to 0 (the pipeline's last step), unpacked to [B, C, h, w]."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift_terminal=None)
    sched.set_timesteps(sigmas=[t], mu=0.0)  # e^0 = 1: no shift, sigmas [t, 0]
    assert float(sched.sigmas[0]) == pytest.approx(t) and float(sched.sigmas[1]) == 0.0
    x0 = sched.step(v, sched.timesteps[0], packed, return_dict=False)[0]
    return pipe._unpack_latents(x0, R, R, pipe.vae_scale_factor)[:, :, 0]


@pytest.mark.parametrize("t", [0.001, 0.3, 0.75, 0.999])
def test_denoiser_is_the_pipelines_x0_unguided_and_with_true_cfg(teacher, pipe, t):
    net = teacher.denoiser
    torch.manual_seed(int(1000 * t))
    x_t = torch.randn(2, 16, 4, 4)
    sigma = torch.full((2,), t / (1 - t))
    x = x_t * (1 + sigma[0])
    with torch.no_grad():
        cond = teacher.text(PROMPTS)
        packed, v_c, _, _ = _velocities(pipe, x_t, t, PROMPTS, None)
        unguided = _step_to_zero(pipe, packed, v_c, t)
        torch.testing.assert_close(net(x, sigma, cond), unguided, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(unguided, x_t - t * pipe._unpack_latents(v_c, R, R, 8)[:, :, 0])
        _, v_c, comb, rescaled = _velocities(pipe, x_t, t, PROMPTS, ["", ""])
        pipeline = _step_to_zero(pipe, packed, rescaled, t)  # the pipeline's guided step, rescale included
        torch.testing.assert_close(qi.TrueCFGDenoiser(net, 4.0)(x, sigma, cond), pipeline, rtol=1e-5, atol=1e-5)
        plain = GuidedDenoiser(net, 4.0)(x, sigma, cond)  # what fdistill distills from: the step without it
        torch.testing.assert_close(plain, _step_to_zero(pipe, packed, comb, t), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(qi.rescale_to_conditional(x_t, net(x, sigma, cond), plain), pipeline,
                                   rtol=1e-5, atol=1e-5)  # they differ by exactly the rescale
        ratio = v_c.norm(dim=-1) / comb.norm(dim=-1)
        assert (ratio - 1).abs().max() > 1e-3  # which is not the identity
        if t >= 0.3:
            assert (plain - pipeline).abs().max() > 1e-4


def test_the_pipelines_own_one_step_call_runs_true_cfg_only_with_a_negative_prompt(teacher, pipe):
    """The whole pipeline (its prompt encoding, CFG switch, rescale and step) at t = 0.6 through a one-step
    scheduler: without a negative prompt its default true_cfg_scale=4 guides nothing."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    t, net = 0.6, teacher.denoiser
    sched = FlowMatchEulerDiscreteScheduler.from_config(fm.one_step_scheduler_config(dict(pipe.scheduler.config), t))
    one = QwenImagePipeline(**{**pipe.components, "scheduler": sched})
    one.set_progress_bar_config(disable=True)
    x_t = torch.randn(2, 16, 4, 4)
    sigma = torch.full((2,), t / (1 - t))
    with torch.no_grad():
        cond = teacher.text(PROMPTS)
        for negative, ours in ((None, net), (["", ""], qi.TrueCFGDenoiser(net, 4.0))):
            out = one(PROMPTS, negative_prompt=negative, num_inference_steps=1, height=R, width=R,
                      latents=pipe._pack_latents(x_t, 2, 16, 4, 4), output_type="latent").images
            torch.testing.assert_close(ours(x_t * (1 + sigma[0]), sigma, cond), fm.unpack_latents(out, 4, 4),
                                       rtol=1e-5, atol=1e-5)


def test_fixed_length_padding_needs_the_mask_and_a_full_mask_is_the_pipelines_none(folder, teacher, pipe):
    net = teacher.denoiser
    x, sigma = torch.randn(1, 16, 4, 4), torch.tensor([1.5])
    with torch.no_grad():
        cond = teacher.text([PROMPT])  # its tokens, then zeros to 512
        n = int(cond.mask.sum())
        d = net(x, sigma, cond)
        d_short = net(x, sigma, TextCondition(cond.embeds[:, :n]))  # the pipeline's call: unpadded, mask None
        torch.testing.assert_close(d, d_short, rtol=1e-5, atol=1e-5)
        assert (net(x, sigma, TextCondition(cond.embeds)) - d).abs().max() > 1e-3  # padding without its mask
        short = open_teacher(folder, R, {"max_sequence_length": 6})  # truncated: every kept token valid
        cond6 = short.text([PROMPT])
        embeds, mask = pipe.encode_prompt(PROMPT, device="cpu", max_sequence_length=6)
    assert mask is None and cond6.mask.all() and cond6.embeds.shape == (1, 6, 32)
    torch.testing.assert_close(cond6.embeds, embeds, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(short.denoiser(x, sigma, cond6), short.denoiser(x, sigma, TextCondition(embeds)),
                                   rtol=1e-6, atol=1e-6)


def test_taps_read_the_image_tokens_of_the_middle_block(teacher):
    net = teacher.denoiser
    assert net.block_names == ["transformer_blocks.0", "transformer_blocks.1"] and net.tap_block == 1
    assert net.feature_channels() == {2: 32} and net.encoder_resolutions == [2]
    seen = {}
    hook = net.transformer.transformer_blocks[1].register_forward_hook(lambda m, a, o: seen.__setitem__("o", o))
    with torch.no_grad():
        cond, x, s = teacher.text(PROMPTS), torch.randn(2, 16, 4, 4), torch.tensor([1.0, 2.0])
        d, feats = net(x, s, cond, return_features=True)
    hook.remove()
    text, image = seen["o"]
    assert text.shape == (2, 512, 32) and image.shape == (2, 4, 32)
    torch.testing.assert_close(feats[2][:, :, 1, 0], image[:, 2])  # token (row 1, col 0) of the 2 x 2 grid
    assert torch.equal(net.features(x, s, cond)[2], feats[2])


# -- (c) the preset, distill, sample and export through the CLI -------------------------------------------------------
def test_preset_carries_its_sources():
    from fdistill.apps import images

    cfg = images.load_config("qwen_image")
    d = cfg.distill
    assert cfg.guidance == 4.0 and cfg.disc_resolutions == ["mid"] and cfg.teacher_options == {}
    assert (d.divergence, d.tau, d.gan_weight, d.weight_decay, d.r1_gamma) == ("js", 5, 5e-3, 1e-2, 1.0)
    assert (d.lr, d.iterations, d.fake_score_weighting, d.ema_beta, d.precision) == (1e-5, 5000, "none", None, "bf16")
    assert d.generator_sigma == 999.0  # t = 0.999
    assert (cfg.text.lora_rank, cfg.text.shared_base, cfg.text.gradient_checkpointing) == (64, True, False)
    assert d.sigmas.schedule == "flow" and tuple(d.sigmas.index_range) == (0, 999)
    # e^mu of the real scheduler at 1024 px (4096 tokens), the teacher's own shift there
    real = qwen_pipelines.SCHEDULER_CONFIG
    assert d.sigmas.shift == pytest.approx(qi.equivalent_shift(real, 4096, "x"), abs=1e-4)
    assert qi.equivalent_shift(real, 4, "x") == pytest.approx(np.exp(0.5 + 0.4 * (4 - 256) / 7936))


def test_distill_sample_export_through_the_cli_with_the_preset(folder, captioned, tmp_path, capsys):
    pytest.importorskip("peft")
    from diffusers import QwenImagePipeline

    from fdistill.apps import cli, distill

    run, exported = tmp_path / "run", tmp_path / "exported"
    assert cli.main(["distill", "--teacher", str(folder), "--out", str(run), "--no-progress", "--config", "qwen_image",
                     f"data={captioned}", f"text.resolution={R}", "distill.batch_size=2", "distill.iterations=2",
                     "distill.micro_batch=null", "distill.precision=fp32", "distill.log_every=1", "disc_hidden=8",
                     "text.lora_rank=2"]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [h["kind"] for h in log if "kind" in h] == ["student", "critic"]
    assert all(np.isfinite(v) for h in log for v in h.values() if isinstance(v, float))
    assert cli.main(["sample", "--checkpoint", str(run), "--prompt", "a red square", "--prompt", PROMPT,
                     "--seed", "7"]) == 0
    ours = np.asarray(Image.open(run / "samples" / "000001.png"))
    capsys.readouterr()
    assert cli.main(["export", "--checkpoint", str(run), "--diffusers", str(exported)]) == 0
    line = capsys.readouterr().out
    assert "num_inference_steps=1, true_cfg_scale=1, height=32, width=32, max_sequence_length=512)" in line
    assert "at t = 0.999 and" in line  # the preset's generator_sigma 999
    pipe = QwenImagePipeline.from_pretrained(exported, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=1, true_cfg_scale=1.0, height=R, width=R, max_sequence_length=512)
    with torch.no_grad():
        theirs = pipe(PROMPT, output_type="np", generator=torch.Generator().manual_seed(8), **call).images[0]
        latents = pipe(PROMPT, output_type="latent", generator=torch.Generator().manual_seed(8), **call).images
        generator, student, teacher = distill.load_generator(run)  # a one-step student: its one level
        sigma_gen = student.sigmas[0]
        z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(8))  # fdistill's seeded_noise
        x = one_step(generator, z, sigma_gen, teacher.condition([PROMPT]))
    torch.testing.assert_close(fm.unpack_latents(latents, 4, 4), x, rtol=1e-4, atol=1e-4)
    theirs = (theirs * 255).round().astype(np.uint8)
    assert ours.shape == theirs.shape == (R, R, 3)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_fixed_length_conditions_shard_as_latents_and_train(folder, captioned, tmp_path, capsys):
    """prepare-latents stores each caption's fixed-length embeddings and mask; a run trains from them, and a
    teacher of another text length refuses them."""
    from fdistill.apps import cli
    from fdistill.data.latent_shards import LatentShards

    out, short = tmp_path / "latents", ["teacher_options.max_sequence_length=16", f"text.resolution={R}"]
    assert cli.main(["prepare-latents", "--teacher", str(folder), "--data", str(captioned), "--out", str(out),
                     "--batch", "2", "--shard-size", "2", "--no-progress", *short]) == 0
    shards = LatentShards(out)
    assert shards.tensors["embeds"] == ((16, 32), torch.float32) and shards.tensors["mask"] == ((16,), torch.int64)
    latents, cond, caption = shards[0]
    want = open_teacher(folder, R, {"max_sequence_length": 16}).text([caption])
    assert torch.equal(cond["mask"], want.mask[0]) and torch.equal(cond["embeds"], want.embeds[0])
    run = ["distill", "--config", "qwen_image", "--teacher", str(folder), "--no-progress", f"data={out}",
           "distill.batch_size=2", "distill.iterations=2", "distill.precision=fp32", "text.lora_rank=2"]
    assert cli.main([*run, "--out", str(tmp_path / "run"), *short]) == 0
    capsys.readouterr()
    assert cli.main([*run, "--out", str(tmp_path / "other"), f"text.resolution={R}"]) == 2
    assert "hold 16-token text embeddings, but this qwen_image teacher's are 512" in capsys.readouterr().err


@pytest.mark.parametrize("sigma_gen", [None, 80.0])
def test_exported_pipelines_one_step_is_the_students_sample(folder, teacher, tmp_path, sigma_gen):
    """A student with perturbed weights (the export must carry them), at t_gen = 0.999 or 80 / 81; the teacher's
    own scheduler (shift_terminal 0.02) gives NaN for one step."""
    import copy

    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    from fdistill.core.diffusion import seeded_noise

    student = copy.deepcopy(teacher.denoiser)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.transformer.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    line = teacher.export(student.eval(), tmp_path / "exported", sigma_gen)
    sigma = 999.0 if sigma_gen is None else sigma_gen
    assert f"at t = {sigma / (1 + sigma):.6g} and" in line
    pipe = QwenImagePipeline.from_pretrained(tmp_path / "exported", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=1, true_cfg_scale=1.0, height=R, width=R, max_sequence_length=512)
    z = seeded_noise(teacher.sample_shape, [7])
    with torch.no_grad():
        ours = one_step(student, z, sigma, teacher.condition([PROMPT]))
        latents = pipe(PROMPT, output_type="latent", generator=torch.Generator().manual_seed(7), **call).images
        images = pipe(PROMPT, output_type="pt", generator=torch.Generator().manual_seed(7), **call).images
        torch.testing.assert_close(fm.unpack_latents(latents, 4, 4), ours, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(images, (teacher.decode(ours) + 1) / 2, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(ours, one_step(teacher.denoiser, z, sigma, teacher.condition([PROMPT])), atol=1e-3)
        own = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
        original = QwenImagePipeline(**{**pipe.components, "scheduler": own})
        original.set_progress_bar_config(disable=True)
        with pytest.warns(RuntimeWarning, match="invalid value encountered in divide"):  # shift_terminal's 0/0
            nan = original(PROMPT, output_type="latent", generator=torch.Generator().manual_seed(7), **call).images
    assert torch.isnan(nan).all()


# -- (d) broken folders: one line, naming the file ----------------------------------------------------------------
def _json(path, **changes):
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, **changes}))


def _pickle_only(d):
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not read")


BROKEN = [
    ("missing component", lambda f: shutil.rmtree(f / "vae"), FileNotFoundError,
     "lacks vae/config.json; expected a diffusers QwenImagePipeline folder"),
    ("pickled text encoder", lambda f: _pickle_only(f / "text_encoder"), ValueError,
     "text_encoder holds its weights as pytorch_model.bin, a pickle; expected safetensors"),
    ("100000 layers", lambda f: _json(f / "transformer" / "config.json", num_layers=100000), ValueError,
     r"transformer/config.json describes a network of 3\.\d+B parameters .* set FDISTILL_MAX_TEACHER_GB"),
    ("NaN latents_std", lambda f: _json(f / "vae" / "config.json", latents_std=[float("nan")] * 16), ValueError,
     "vae/config.json: latents_mean and latents_std must be finite and std positive"),
    ("zero latents_std", lambda f: _json(f / "vae" / "config.json", latents_std=[1.0] * 15 + [0.0]), ValueError,
     "vae/config.json: latents_mean and latents_std must be finite and std positive"),
    ("short latents_mean", lambda f: _json(f / "vae" / "config.json", latents_mean=[0.0] * 4), ValueError,
     "vae/config.json: latents_mean must hold 16 numbers"),
    ("NaN base_shift", lambda f: _json(f / "scheduler" / "scheduler_config.json", base_shift=float("nan")),
     ValueError, "scheduler/scheduler_config.json: base_shift must be a finite number, got nan"),
    ("NaN max_shift", lambda f: _json(f / "scheduler" / "scheduler_config.json", max_shift=float("nan")),
     ValueError, "scheduler/scheduler_config.json: max_shift must be a finite number, got nan"),
    ("wrong channels", lambda f: _json(f / "transformer" / "config.json", in_channels=32), ValueError,
     "do not fit the VAE's 16 latent channels"),
]


@pytest.mark.parametrize("name, breaks, error, match", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_folders_are_refused_in_one_line(folder, tmp_path, monkeypatch, capsys, name, breaks, error, match):
    from fdistill.apps import cli

    monkeypatch.setenv("FDISTILL_MAX_TEACHER_GB", "1")  # the tiny pipeline fits; 100000 of its blocks (14 GB) not
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    breaks(broken)
    with pytest.raises(error, match=match) as e:
        open_teacher(broken, R)
    assert "\n" not in str(e.value)
    capsys.readouterr()
    assert cli.main(["distill", "--teacher", str(broken), "--out", str(tmp_path / "run"), "--config", "qwen_image",
                     f"text.resolution={R}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("fdistill distill: error:") and "Traceback" not in err


# -- (e) options and the checkpoint record --------------------------------------------------------------------------
def test_options_are_checked_and_the_record_rebuilds_the_teacher(folder, teacher):
    for options, match in [({"guidance": 3.5}, "teacher_options.guidance=3.5: Qwen-Image has no guidance embedding"),
                           ({"max_sequence_length": 2048}, "QwenImagePipeline takes at most 1024 text tokens"),
                           ({"shift": 3.0}, "teacher_options.shift is not an option of a qwen_image teacher"),
                           ({"tap_block": 2}, r"tap_block must be a block index in \[0, 1\]")]:
        with pytest.raises(ValueError, match=match) as e:
            open_teacher(folder, R, options)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="resolution must be a positive multiple of 16"):
        open_teacher(folder, 24)
    again = teacher_from_info(json.loads(json.dumps(teacher.info)))
    assert type(again) is qi.QwenImageTeacher and again.info == teacher.info
    assert again.sample_shape == teacher.sample_shape and again.text.max_sequence_length == 512
    assert again.denoiser._taps == teacher.denoiser._taps and again.denoiser.shift == teacher.denoiser.shift
    tuned = open_teacher(folder, R, {"max_sequence_length": 16, "tap_block": 0})
    rebuilt = teacher_from_info(tuned.info)
    assert rebuilt.text.max_sequence_length == 16 and rebuilt.denoiser.tap_block == 0
    x, s = torch.randn(2, 16, 4, 4), torch.tensor([0.5, 3.0])
    with torch.no_grad():
        cond = teacher.text(PROMPTS)
        assert torch.equal(again.denoiser(x, s, cond), teacher.denoiser(x, s, cond))
    default = open_teacher(folder)  # the pipeline's 1024 px, its dynamic shift there as a static one
    assert default.sample_shape == (16, 128, 128) and default.info["network"]["resolution"] == 1024
    assert default.denoiser.shift == pytest.approx(np.exp(0.5 + 0.4 * (4096 - 256) / 7936))


def test_cfg_rescale_makes_the_pipelines_guidance_the_distilled_teacher(folder, teacher, captioned):
    from fdistill.apps import distill, images
    from fdistill.teachers.guidance import GuidedDenoiser

    assert type(teacher.guided(teacher.denoiser, 4.0)) is GuidedDenoiser  # the default: FastGen's plain CFG
    rescaled = open_teacher(folder, R, {"cfg_rescale": True})
    assert rescaled.info["network"]["cfg_rescale"] is True
    assert type(teacher_from_info(rescaled.info).guided(rescaled.denoiser, 4.0)) is qi.TrueCFGDenoiser
    cfg = images.load_config("qwen_image", [f"data={captioned}", f"text.resolution={R}", "distill.batch_size=2",
                                            "teacher_options.cfg_rescale=true"])
    assert type(distill.build_distiller(cfg, rescaled).teacher) is qi.TrueCFGDenoiser
    with pytest.raises(ValueError, match="teacher_options.cfg_rescale must be true or false"):
        open_teacher(folder, R, {"cfg_rescale": "yes"})
