"""Wan2.1 / Wan2.2 teachers (WanPipeline, diffusers 0.42) on tiny random pipelines written by diffusers'
save_pretrained (tests/wan_pipelines.py): recognised and loaded offline; the pipeline's umT5 embeddings and VAE; the
denoiser is the x0 of the pipeline's own one-step call (its prompt encoding, CFG with the negative prompt, per-token
timesteps for Wan2.2-TI2V, the expert switch of Wan2.2-A14B, the Euler step), at several t; the scheduler's shift is
the teacher's; 3-D taps and their early stop; heads on 5-D maps; broken folders refused in one line; two iterations
of distillation with the wan preset on latent shards of random videos; the exported one-step pipeline."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import wan_pipelines as wp  # noqa: E402

from fdistill.networks.heads import ConvHead, Discriminator, FastGenHead  # noqa: E402
from fdistill.teachers import flow_matching as fm  # noqa: E402
from fdistill.teachers.families import wan  # noqa: E402
from fdistill.teachers.guidance import GuidedDenoiser  # noqa: E402
from fdistill.teachers.open import family_of, open_teacher, teacher_from_info  # noqa: E402

PROMPTS = ["a red cat", "waves on a beach at night, filmed from a boat"]
L = 16  # text tokens (max_sequence_length) of the tests' teachers
SIZE = {"num_frames": wp.FRAMES, "height": wp.HEIGHT, "width": wp.WIDTH, "max_sequence_length": L}
TI2V_SIZE = {**SIZE, "height": 64, "width": 64}  # the 16x VAE: 4 x 4 latents, a 2 x 2 token grid


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    return {"wan21": wp.wan21(root / "wan21"), "ti2v": wp.wan22_ti2v(root / "ti2v"),
            "a14b": wp.wan22_a14b(root / "a14b")}


@pytest.fixture(scope="module")
def teachers(folders):
    return {name: open_teacher(folder, None, TI2V_SIZE if name == "ti2v" else SIZE)
            for name, folder in folders.items()}


@pytest.fixture(scope="module")
def pipes(folders):
    from diffusers import WanPipeline

    out = {}
    for name, folder in folders.items():
        out[name] = WanPipeline.from_pretrained(folder, local_files_only=True)
        out[name].set_progress_bar_config(disable=True)
    return out


# -- recognised, loaded offline; text, VAE and shift as the pipeline's ---------------------------------------------
def test_folders_load_and_encode_prompts_and_videos_as_the_pipeline(folders, teachers, pipes):
    assert {family_of(f).kind for f in folders.values()} == {"wan"}
    t21, ti2v = teachers["wan21"], teachers["ti2v"]
    assert type(t21) is wan.WanTeacher and t21.sample_shape == (16, 2, 4, 6) and ti2v.sample_shape == (48, 2, 4, 4)
    assert t21.sigma_range == pytest.approx((0.001 / 0.999, 999.0))
    json.dumps(t21.info)
    pipe = pipes["wan21"]
    with torch.no_grad():
        cond = t21.text(PROMPTS)
        theirs = pipe._get_t5_prompt_embeds(PROMPTS, max_sequence_length=L, device="cpu")
        neg = pipe._get_t5_prompt_embeds(wan.NEGATIVE_PROMPT, max_sequence_length=L, device="cpu")
        empty = pipe._get_t5_prompt_embeds("", max_sequence_length=L, device="cpu")
        valid = pipe.tokenizer(PROMPTS, padding="max_length", max_length=L, truncation=True).attention_mask
    assert cond.embeds.shape == (2, L, 32) and cond.mask is None
    torch.testing.assert_close(cond.embeds, theirs, rtol=0, atol=1e-6)
    n = sum(valid[0])
    assert n < L and not cond.embeds[0, n:].any() and cond.embeds[0, :n].abs().sum(-1).all()  # zeros after the prompt
    # the null condition: the Wan authors' negative prompt (default), or "" (the pipeline's default)
    torch.testing.assert_close(t21.denoiser.null_condition(cond).embeds, neg.expand(2, -1, -1), rtol=0, atol=1e-6)
    plain = open_teacher(folders["wan21"], None, {**SIZE, "negative_prompt": ""})
    torch.testing.assert_close(plain.denoiser.null_condition(cond).embeds, empty.expand(2, -1, -1), rtol=0, atol=1e-6)
    assert wan.clean_prompt("  a &amp;amp;  cat\n\t rides ") == "a & cat rides"
    # the VAE: videos [B, 3, 4n + 1, H, W] <-> per-channel (z - mean) / std latents, decoded z * std + mean
    for name, (h, w, latent) in {"wan21": (32, 48, (16, 2, 4, 6)), "ti2v": (64, 64, (48, 2, 4, 4))}.items():
        codec, vae = teachers[name].codec, pipes[name].vae
        assert codec.temporal == pipes[name].vae_scale_factor_temporal == 4
        assert codec.downsample == pipes[name].vae_scale_factor_spatial
        videos = torch.rand(2, 3, 5, h, w) * 2 - 1
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        with torch.no_grad():
            z = codec.encode(videos, torch.Generator().manual_seed(1))
            raw = vae.encode(videos).latent_dist.sample(torch.Generator().manual_seed(1))
            decoded = codec.decode(z)
            theirs = vae.decode(z * std + mean).sample.clamp(-1, 1)
        assert z.shape == (2, *latent) and decoded.shape == videos.shape
        torch.testing.assert_close(z, (raw - mean) / std)
        torch.testing.assert_close(decoded, theirs)
        with pytest.raises(ValueError, match=r"frames=6; expected 4n \+ 1 frames") as e:
            codec.encode(torch.zeros(1, 3, 6, h, w))
        assert "\n" not in str(e.value)


def test_the_schedulers_shift_is_the_teachers(teachers, pipes):
    """UniPC's flow sigmas (t -> 3 t / (1 + 2 t)) are sigma -> 3 sigma: the teacher's own levels."""
    from diffusers import UniPCMultistepScheduler

    net = teachers["wan21"].denoiser
    assert net.shift == 3.0 and net.default_sigmas() == {"schedule": "flow", "t_min": 0.001, "t_max": 0.999,
                                                         "shift": 3.0, "index_range": [0, 999]}
    sched = UniPCMultistepScheduler.from_config(pipes["wan21"].scheduler.config)
    for t in (0.1, 0.4, 0.8):
        sched.set_timesteps(sigmas=np.array([t]))
        assert float(sched.sigmas[0]) == pytest.approx(fm.t_of_sigma(3.0 * fm.sigma_of_t(t)), rel=1e-6)


# -- the denoiser is the pipeline's x0 --------------------------------------------------------------------------------
def one_step_call(pipe, x_t, t, guidance, negative=None):
    """WanPipeline's whole call, one Euler step from t to 0 (a FlowMatchEulerDiscreteScheduler whose one Karras
    step is sigma_max = t): latents x_t - t v, v the pipeline's (guided) velocity at timestep 1000 t."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    config = fm.one_step_scheduler_config({"num_train_timesteps": 1000, "shift": 3.0}, t)
    with fm.pf.quiet():
        sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    one = WanPipeline(**{**pipe.components, "scheduler": sched}, boundary_ratio=pipe.config.boundary_ratio,
                      expand_timesteps=pipe.config.expand_timesteps)
    one.set_progress_bar_config(disable=True)
    _, _, f, h, w = x_t.shape
    s = one.vae_scale_factor_spatial
    with torch.no_grad():
        return one(PROMPTS, negative_prompt=negative, num_inference_steps=1, height=h * s, width=w * s,
                   num_frames=(f - 1) * 4 + 1, guidance_scale=guidance, latents=x_t, output_type="latent",
                   max_sequence_length=L).frames


@pytest.mark.parametrize("name", ["wan21", "ti2v"])
@pytest.mark.parametrize("t", [0.2, 0.6, 0.95])
def test_denoiser_is_the_pipelines_x0_unguided_and_guided(teachers, pipes, name, t):
    teacher, pipe = teachers[name], pipes[name]
    net = teacher.denoiser
    torch.manual_seed(int(100 * t))
    x_t = torch.randn(2, *teacher.sample_shape)
    sigma = torch.full((2,), t / (1 - t))
    seen = []
    hook = net.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"]), with_kwargs=True)
    with torch.no_grad():
        cond = teacher.text(PROMPTS)
        d = net(x_t * (1 + sigma[0]), sigma, cond)
        guided = GuidedDenoiser(net, 5.0)(x_t * (1 + sigma[0]), sigma, cond)
    hook.remove()
    f, h, w = teacher.sample_shape[1:]
    tokens = f * (h // 2) * (w // 2)  # the 1 x 2 x 2 patches
    assert seen[0].shape == ((2, tokens) if name == "ti2v" else (2,))  # TI2V: one timestep per latent token
    torch.testing.assert_close(seen[0], torch.full_like(seen[0], 1000 * t))
    torch.testing.assert_close(d, one_step_call(pipe, x_t, t, 1.0), rtol=1e-5, atol=1e-5)
    negative = [wan.NEGATIVE_PROMPT] * 2
    torch.testing.assert_close(guided, one_step_call(pipe, x_t, t, 5.0, negative), rtol=1e-5, atol=1e-5)
    assert (guided - d).abs().max() > 1e-3


def test_two_experts_route_each_sample_by_its_t(teachers, pipes):
    """Wan2.2-A14B: transformer while 1000 t >= 875, else transformer_2, per sample in a mixed batch (D and
    features), as the pipeline switches at its timestep."""
    teacher, pipe = teachers["a14b"], pipes["a14b"]
    net = teacher.denoiser
    assert net.boundary == wp.BOUNDARY and len(net.blocks()) == 4 and teacher.experts == 2
    ts = torch.tensor([0.95, 0.5, 0.875, 0.3])  # high, low, the boundary itself (high: >=), low
    x_t = torch.randn(4, *teacher.sample_shape)
    sigma = ts / (1 - ts)
    x = x_t * (1 + sigma).view(-1, 1, 1, 1, 1)
    with torch.no_grad():
        cond = teacher.text(PROMPTS * 2)
        d, feats = net(x, sigma, cond, return_features=True)
        only = net.features(x, sigma, cond)
        for i, expert in enumerate([net.transformer, net.transformer_2, net.transformer, net.transformer_2]):
            k = slice(i, i + 1)
            v = expert(hidden_states=x_t[k], timestep=1000 * ts[k], encoder_hidden_states=cond.embeds[k],
                       return_dict=False)[0]
            torch.testing.assert_close(d[k], x_t[k] - ts[i] * v, rtol=1e-5, atol=1e-5)
            _, alone = net(x[k], sigma[k], cond[k], return_features=True)
            torch.testing.assert_close(feats[2][k], alone[2], rtol=1e-5, atol=1e-5)
        for t in (0.95, 0.5):  # the pipeline's own switch
            both = torch.full((2,), t / (1 - t))
            ours = net(x_t[:2] * (1 + both[0]), both, cond[:2])
            torch.testing.assert_close(ours, one_step_call(pipe, x_t[:2], t, 1.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(only[2], feats[2])
    assert (d[0] - (x_t[0] - ts[0] * net.transformer_2(hidden_states=x_t[:1], timestep=1000 * ts[:1],
                                                       encoder_hidden_states=cond.embeds[:1],
                                                       return_dict=False)[0][0])).abs().max() > 1e-3


# -- taps on the 3-D token grid, heads on 5-D maps ---------------------------------------------------------------------
def test_taps_lay_the_blocks_tokens_on_their_3d_grid_and_stop_after_the_block(folders, teachers):
    net = teachers["wan21"].denoiser
    assert net.block_names == ["blocks.0", "blocks.1"] and net.tap_block == 1
    assert net.encoder_resolutions == [2] and net.feature_channels() == {2: 24}  # min(H' 2, W' 3); 2 heads x 12
    seen = {}
    hook = net.transformer.blocks[1].register_forward_hook(lambda m, a, o: seen.__setitem__("o", o))
    x, s = torch.randn(2, 16, 2, 4, 6), torch.tensor([1.0, 4.0])
    with torch.no_grad():
        cond = teachers["wan21"].text(PROMPTS)
        _, feats = net(x, s, cond, return_features=True)
    hook.remove()
    tokens = seen["o"]
    assert tokens.shape == (2, 12, 24) and feats[2].shape == (2, 24, 2, 2, 3)  # F' H' W' = 2 x 2 x 3
    for f, i, j in [(0, 0, 0), (1, 0, 2), (1, 1, 1), (0, 1, 2)]:
        torch.testing.assert_close(feats[2][:, :, f, i, j], tokens[:, f * 6 + i * 3 + j])
    early = open_teacher(folders["wan21"], None, {**SIZE, "tap_block": 0}).denoiser
    calls = []
    for module in (early.transformer.blocks[1], early.transformer.proj_out):
        module.register_forward_hook(lambda m, a, o: calls.append(m))
    with torch.no_grad():
        only = early.features(x, s, cond)
        assert calls == []  # stopped after blocks.0
        _, full = early(x, s, cond, return_features=True)
    assert len(calls) == 2
    torch.testing.assert_close(only[2], full[2])


@pytest.mark.parametrize("head", ["fdistill", "fastgen"])
def test_heads_on_video_maps_give_one_logit_per_sample_and_gradients(head):
    disc = Discriminator.conv({2: 24, 8: 6}, 8, head)
    maps = {2: torch.randn(3, 24, 2, 2, 3, requires_grad=True), 8: torch.randn(3, 6, 5, 8, 12, requires_grad=True)}
    logits = disc(maps)
    assert logits.shape == (3,)
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters() if p.dim() > 1)
    assert maps[2].grad.abs().sum() > 0 and maps[8].grad.abs().sum() > 0
    with torch.no_grad():  # frames folded into the batch, each sample's frame logits averaged
        head2 = disc.heads["2"]
        frames = torch.stack([head2(maps[2][:, :, f]) for f in range(2)], 1)
        torch.testing.assert_close(head2(maps[2]), frames.mean(1))
        square = torch.randn(3, 24, 8, 8)  # square maps: the old head's logit exactly
        for h in (ConvHead(24, 8, 8), FastGenHead(24, 8)):
            assert torch.equal(h(square), h.net(square).flatten(1).squeeze(1))


# -- broken folders, options and the record -------------------------------------------------------------------------
def _json(path, **changes):
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, **changes}))


def _pickle_only(d):
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not read")


BROKEN = [
    ("missing component", "wan21", lambda f: shutil.rmtree(f / "vae"), {}, FileNotFoundError,
     "lacks vae/config.json; expected a diffusers WanPipeline folder"),
    ("missing second expert", "a14b", lambda f: shutil.rmtree(f / "transformer_2"), {}, FileNotFoundError,
     "lacks transformer_2/config.json; expected a diffusers WanPipeline folder"),
    ("wrong pipeline class", "wan21", lambda f: _json(f / "model_index.json", _class_name="WanImageToVideoPipeline"),
     {}, ValueError, "holds a WanImageToVideoPipeline, not a WanPipeline"),
    ("wrong transformer class", "wan21", lambda f: _json(f / "transformer" / "config.json",
                                                         _class_name="SD3Transformer2DModel"),
     {}, ValueError, "transformer/config.json describes a SD3Transformer2DModel, not a WanTransformer3DModel"),
    ("frames not 4n+1", "wan21", lambda f: None, {"num_frames": 6}, ValueError,
     r"teacher_options.num_frames=6; expected 4n \+ 1 frames \(1, 5, 9, ...\): the video VAE keeps the first frame"),
    ("height not a multiple of 16", "wan21", lambda f: None, {"height": 40}, ValueError,
     "teacher_options.height=40: a Wan video's height and width are multiples of 16 pixels"),
    ("pickled text encoder", "wan21", lambda f: _pickle_only(f / "text_encoder"), {}, ValueError,
     "text_encoder holds its weights as pytorch_model.bin, a pickle; expected safetensors"),
    ("wrong channels", "wan21", lambda f: _json(f / "transformer" / "config.json", in_channels=32), {}, ValueError,
     "do not fit the VAE's 16 latent channels"),
    ("dynamic shift", "wan21", lambda f: _json(f / "scheduler" / "scheduler_config.json", use_dynamic_shifting=True),
     {}, ValueError, "use_dynamic_shifting needs a mu, which WanPipeline never passes"),
    ("bad boundary", "a14b", lambda f: _json(f / "model_index.json", boundary_ratio=1.5), {}, ValueError,
     r"boundary_ratio must be null or a number in \(0, 1\], got 1.5"),
]


@pytest.mark.parametrize("name, layout, breaks, options, error, match", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_folders_and_sizes_are_refused_in_one_line(folders, tmp_path, name, layout, breaks, options, error,
                                                          match):
    broken = tmp_path / "broken"
    shutil.copytree(folders[layout], broken)
    breaks(broken)
    with pytest.raises(error, match=match) as e:
        wan.WanTeacher.open(broken, None, {**SIZE, **options})
    assert "\n" not in str(e.value)


def test_options_are_checked_and_the_record_rebuilds_the_teacher(folders, teachers):
    folder = folders["wan21"]
    for resolution, options, match in [(None, {"guidance": 3.5}, "Wan has no guidance embedding"),
                                       (None, {"fps": 16}, "teacher_options.fps is not an option of a wan teacher"),
                                       (None, {"negative_prompt": None}, "negative_prompt must be a string"),
                                       (None, {"num_frames": 0}, "num_frames must be a positive integer"),
                                       (32, {}, "text.resolution=32: a Wan teacher's video size is teacher_options")]:
        with pytest.raises(ValueError, match=match) as e:
            open_teacher(folder, resolution, {**SIZE, **options})
        assert "\n" not in str(e.value)
    teacher = teachers["wan21"]
    again = teacher_from_info(json.loads(json.dumps(teacher.info)))
    assert type(again) is wan.WanTeacher and again.info == teacher.info and again.sample_shape == teacher.sample_shape
    assert again.denoiser._taps == teacher.denoiser._taps and again.text.max_sequence_length == L
    x, s = torch.randn(2, *teacher.sample_shape), torch.tensor([0.5, 3.0])
    with torch.no_grad():
        cond = teacher.text(PROMPTS)
        assert torch.equal(again.denoiser(x, s, cond), teacher.denoiser(x, s, cond))
        assert torch.equal(again.denoiser.null_embeds, teacher.denoiser.null_embeds)
    default = wan.WanOptions()
    assert (default.num_frames, default.height, default.width) == (81, 480, 832)
    assert default.negative_prompt == wan.NEGATIVE_PROMPT and default.negative_prompt.startswith("Bright tones")


# -- distillation ----------------------------------------------------------------------------------------------------
def video_latent_shards(folder, teacher, n=4):
    """``n`` random video latents of the teacher's sample shape with encoded captions, as latent shards."""
    from fdistill.data.latent_shards import LatentShardWriter

    captions = [f"a clip number {i}" for i in range(n)]
    g = torch.Generator().manual_seed(0)
    with LatentShardWriter(folder, shard_size=2) as w:
        w.add_batch([f"v{i}" for i in range(n)], torch.randn(n, *teacher.sample_shape, generator=g),
                    teacher.text(captions).tensors(), captions)
    return folder


def test_two_iterations_distill_a_tiny_wan_teacher_with_the_preset(folders, tmp_path):
    from fdistill.apps import distill, images

    teacher = open_teacher(folders["wan21"], None, SIZE)
    data = video_latent_shards(tmp_path / "latents", teacher)
    options = [f"teacher_options.{k}={v}" for k, v in SIZE.items()]
    cfg = images.load_config("wan", [f"data={data}", "distill.batch_size=2", "distill.micro_batch=null",
                                     "distill.iterations=2", "distill.precision=fp32", "disc_hidden=8",
                                     "text.gradient_checkpointing=false", *options])
    assert (cfg.guidance, cfg.distill.divergence, cfg.distill.lr, cfg.distill.gan_weight) == (5.0, "js", 5e-5, 1e-3)
    assert all(isinstance(r, str) for r in cfg.disc_resolutions)
    d = distill.build_distiller(cfg, teacher)
    assert type(d.teacher) is GuidedDenoiser and d.sample_shape == (16, 2, 4, 6) and d.sigma_gen == 999.0
    before = copy.deepcopy(d.generator.state_dict())
    logs = [d.step() for _ in range(2)]
    assert all(torch.isfinite(torch.as_tensor(v)).all() for log in logs for v in log.values()
               if isinstance(v, (float, torch.Tensor)))
    changed = [k for k, v in d.generator.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and any(k.startswith("transformer.blocks.") for k in changed)
    assert d.sample(2).shape == (2, 16, 2, 4, 6)
    with pytest.raises(ValueError, match="it is distilled one student per expert; expected "
                       "teacher_options.expert=high or teacher_options.expert=low") as e:  # A14B without its expert
        a14b = open_teacher(folders["a14b"], None, SIZE)
        distill.build_distiller(images.load_config("wan", [f"data={data}", *options]), a14b)
    assert "\n" not in str(e.value)
    bad = video_latent_shards(tmp_path / "other", open_teacher(folders["wan21"], None, {**SIZE, "num_frames": 9}))
    with pytest.raises(ValueError, match=r"hold latents of shape \(16, 3, 4, 6\), but this Wan teacher's videos are "
                                         r"\(16, 2, 4, 6\)"):
        teacher.open_data(images.load_config("wan", [f"data={bad}", *options]), torch.device("cpu"))


def test_preset_loads_and_names_roles():
    from fdistill.apps import images

    cfg = images.load_config("wan")
    d = cfg.distill
    assert cfg.disc_resolutions == ["mid"] and cfg.teacher_options == {} and cfg.guidance == 5.0
    assert (d.divergence, d.lr, d.gan_weight, d.generator_sigma, d.precision) == ("js", 5e-5, 1e-3, 999.0, "bf16")
    assert d.sigmas.schedule == "flow" and d.sigmas.shift == 1.0 and tuple(d.sigmas.index_range) == (0, 999)
    assert (cfg.text.lora_rank, cfg.text.shared_base) == (0, False) and d.student_steps in (None, 1)


def test_exported_pipelines_one_step_is_the_students_sample(teachers, tmp_path):
    """A student with perturbed weights as a WanPipeline folder: its one-step call (guidance_scale=1) gives the
    student's latents and video for the same seed; a few-step student is refused."""
    from diffusers import WanPipeline

    from fdistill.core.diffusion import one_step, seeded_noise
    from fdistill.core.few_step import StudentSteps

    teacher = teachers["wan21"]
    student = copy.deepcopy(teacher.denoiser)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.transformer.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    line = teacher.export(student.eval(), tmp_path / "exported")
    assert "(prompt, num_inference_steps=1, guidance_scale=1, height=32, width=48, num_frames=5, " \
           "max_sequence_length=16) evaluates the student once at t = 0.999" in line
    pipe = WanPipeline.from_pretrained(tmp_path / "exported", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=1, guidance_scale=1.0, height=32, width=48, num_frames=5, max_sequence_length=L)
    z = seeded_noise(teacher.sample_shape, [7])
    with torch.no_grad():
        ours = one_step(student, z, 999.0, teacher.condition([PROMPTS[0]]))
        latents = pipe(PROMPTS[0], output_type="latent", generator=torch.Generator().manual_seed(7), **call).frames
        video = pipe(PROMPTS[0], output_type="pt", generator=torch.Generator().manual_seed(7), **call).frames
    torch.testing.assert_close(latents, ours, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(video.transpose(1, 2), (teacher.decode(ours) + 1) / 2, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="a 2-step Wan student cannot be exported yet") as e:
        teacher.export(student, tmp_path / "two", StudentSteps((999.0, 3.0)))
    assert "\n" not in str(e.value)
