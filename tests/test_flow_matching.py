"""Flow-matching teachers (SD3, FLUX.1): loading real folder layouts offline (tiny random pipelines written by
diffusers' save_pretrained), the EDM-form denoiser against diffusers' FlowMatchEulerDiscreteScheduler and the
pipelines' own transformer calls, CFG, FLUX's packing, hooked features, the flow noise schedule and a short
distillation."""

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import flow_pipelines  # noqa: E402

from fdistill.core.diffusion import SigmaSampler, flow_sigmas  # noqa: E402
from fdistill.data.conditions import TextCondition  # noqa: E402
from fdistill.teachers import flow_matching as fm  # noqa: E402
from fdistill.teachers.families.flux import image_ids  # noqa: E402
from fdistill.teachers.guidance import GuidedDenoiser  # noqa: E402
from fdistill.teachers.open import family_of, open_teacher  # noqa: E402

PROMPTS = ["a handwritten seven", "a photo of a cat on a bike"]
MSL = 8  # T5 tokens in the tests (the pipelines' 256 / 512 work too, slower)


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    return {"sd3": flow_pipelines.sd3(root / "sd3"), "flux": flow_pipelines.flux(root / "flux")}


@pytest.fixture(scope="session")
def loaded(folders):
    return {f: fm.load_flow_pipeline(folders[f], 16, max_sequence_length=MSL) for f in folders}


@pytest.fixture(scope="session")
def pipes(folders):
    from diffusers import DiffusionPipeline

    return {f: DiffusionPipeline.from_pretrained(folders[f], local_files_only=True) for f in folders}


FAMILIES = pytest.mark.parametrize("family", ["sd3", "flux"])


@FAMILIES
def test_folders_load_offline_with_the_pipelines_prompt_encoding(folders, loaded, pipes, family):
    assert family_of(folders[family]).kind == family
    teacher = open_teacher(folders[family], 16)
    assert isinstance(teacher, fm.FlowMatchingTeacher) and teacher.kind == family
    assert teacher.sample_shape == (4, 8, 8) and teacher.info["family"] == family
    assert teacher.sigma_range == pytest.approx((0.001 / 0.999, 999.0))
    json.dumps(teacher.info)
    sd, pipe = loaded[family], pipes[family]
    cond = sd.text(PROMPTS)
    with torch.no_grad():
        if family == "sd3":  # 77 CLIP tokens (16 + 16 wide, zero-padded to T5's 48) + 8 T5 tokens
            embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                                      max_sequence_length=MSL)
            assert cond.embeds.shape == (2, 77 + MSL, 48) and cond.pooled.shape == (2, 32)
            assert cond.embeds[:, :77, 32:].abs().sum() == 0
        else:
            embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=MSL)
            assert cond.embeds.shape == (2, MSL, 32) and cond.pooled.shape == (2, 32)
    torch.testing.assert_close(cond.embeds, embeds)
    torch.testing.assert_close(cond.pooled, pooled)
    assert sd.denoiser.guidance == (3.5 if family == "flux" else None)


def _velocity(pipe, family, x_t, t, cond, guidance=3.5):
    """v as the diffusers pipeline calls the transformer at scheduler timestep 1000 t."""
    timestep = torch.full((x_t.shape[0],), 1000 * t)
    if family == "sd3":
        return pipe.transformer(hidden_states=x_t, timestep=timestep, encoder_hidden_states=cond.embeds,
                                pooled_projections=cond.pooled, return_dict=False)[0]
    b, c, h, w = x_t.shape
    packed = pipe._pack_latents(x_t, b, c, h, w)
    ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype)
    v = pipe.transformer(hidden_states=packed, timestep=timestep / 1000, guidance=torch.full((b,), guidance),
                         pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds,
                         txt_ids=torch.zeros(cond.embeds.shape[1], 3), img_ids=ids, return_dict=False)[0]
    return pipe._unpack_latents(v, 16, 16, pipe.vae_scale_factor)


@FAMILIES
@pytest.mark.parametrize("t", [0.001, 0.3, 0.75, 0.999])
def test_denoiser_is_the_flow_schedulers_x0_prediction(loaded, pipes, family, t):
    """D(x; sigma) with x = x_t (1 + sigma), sigma = t / (1 - t), equals one FlowMatchEuler step from t to 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sd, pipe = loaded[family], pipes[family]
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(sigmas=[t])
    cond = sd.text(PROMPTS)
    torch.manual_seed(int(1000 * t))
    x_t = torch.randn(2, *sd.latent_shape)
    with torch.no_grad():
        v = _velocity(pipe, family, x_t, float(sched.sigmas[0]), cond)
        ref = sched.step(v, sched.timesteps[0], x_t).prev_sample
        sigma = torch.tensor(t / (1 - t)).expand(2)
        d = sd.denoiser(x_t * (1 + sigma[0]), sigma, cond)
    torch.testing.assert_close(d, ref, rtol=1e-4, atol=1e-4)


def test_sd3_cfg_in_x0_space_equals_cfg_in_v_space(loaded):
    sd = loaded["sd3"]
    net = sd.denoiser
    cond = sd.text(PROMPTS)
    null = net.null_condition(cond)  # the encoded empty prompt
    empty = sd.text(["", ""])
    torch.testing.assert_close(null.embeds, empty.embeds)
    torch.testing.assert_close(null.pooled, empty.pooled)
    x, s, w = torch.randn(2, *sd.latent_shape), torch.tensor([0.7, 30.0]), 4.5
    with torch.no_grad():
        guided = GuidedDenoiser(net, w)(x, s, cond)
        t, x_t = s / (1 + s), x / (1 + s[:, None, None, None])
        v_c, v_u = net._call(x_t, t, cond), net._call(x_t, t, null)
        by_v = x_t - t[:, None, None, None] * (v_u + w * (v_c - v_u))
    torch.testing.assert_close(guided, by_v, rtol=1e-5, atol=1e-5)


def test_flux_has_no_cfg_and_its_embedded_guidance_matters(loaded):
    sd = loaded["flux"]
    net = sd.denoiser
    cond = sd.text(PROMPTS)
    with pytest.raises(ValueError, match="guidance-distilled"):
        net.null_condition(cond)
    x, s = torch.randn(2, *sd.latent_shape), torch.tensor([1.0, 2.0])
    with torch.no_grad():
        d = net(x, s, cond)
        net.guidance = 7.0
        try:
            assert not torch.allclose(net(x, s, cond), d)
        finally:
            net.guidance = 3.5


def test_flux_packing_round_trips_as_the_pipeline_packs(pipes):
    pipe = pipes["flux"]
    x = torch.randn(2, 4, 8, 6)
    packed = fm.pack_latents(x)
    assert packed.shape == (2, 12, 16)
    assert torch.equal(packed, pipe._pack_latents(x, 2, 4, 8, 6))
    assert torch.equal(fm.unpack_latents(packed, 8, 6), x)
    assert torch.equal(fm.unpack_latents(packed, 8, 6), pipe._unpack_latents(packed, 16, 12, 2))
    assert torch.equal(image_ids(8, 6), pipe._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))


@FAMILIES
def test_hooked_features_equal_the_full_forwards_and_features_stop_at_the_tap(loaded, family, monkeypatch):
    sd = loaded[family]
    net = sd.denoiser
    blocks = ["transformer_blocks.0", "transformer_blocks.1"] + (
        ["single_transformer_blocks.0", "single_transformer_blocks.1"] if family == "flux" else [])
    assert net.block_names == blocks and net._taps == {4: blocks[len(blocks) // 2]}  # the middle block
    assert net.feature_channels() == {4: 32} and net.encoder_resolutions == [4]
    cond, x, s = sd.text(PROMPTS), torch.randn(2, *sd.latent_shape), torch.tensor([1.0, 2.0])
    seen = {}
    tapped = net.transformer.get_submodule(blocks[len(blocks) // 2])
    hook = tapped.register_forward_hook(lambda m, a, o: seen.__setitem__("tokens", o[1]))
    with torch.no_grad():
        d, feats = net(x, s, cond, return_features=True)
        assert torch.equal(d, net(x, s, cond))
    hook.remove()
    tokens = seen["tokens"]  # [B, 16, 32]: row-major over the 4 x 4 grid
    assert feats[4].shape == (2, 32, 4, 4)
    torch.testing.assert_close(feats[4][:, :, 1, 2], tokens[:, 1 * 4 + 2])
    later = net.transformer.get_submodule(blocks[-1]) if family == "flux" else net.transformer.norm_out
    monkeypatch.setattr(later, "forward", lambda *a, **k: pytest.fail("a block after the tap ran"))
    only = net.features(x, s, cond)
    assert only.keys() == {4} and torch.equal(only[4], feats[4])


def test_generator_input_is_unit_noise_at_t_max(loaded):
    net = loaded["sd3"].denoiser
    assert net.sigma_max == pytest.approx(999.0) and net.prior_std(999.0) == pytest.approx(1000.0)
    assert float(fm.t_of_sigma(torch.tensor(999.0))) == pytest.approx(0.999)


def test_flow_schedule_is_uniform_in_t():
    s = SigmaSampler(schedule="flow", index_range=(0, 999))
    t = s.grid.double() / (1 + s.grid.double())
    torch.testing.assert_close(t, torch.linspace(0.001, 0.999, 1000, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert s.largest == pytest.approx(999.0, rel=1e-6) and (s.grid.diff() > 0).all()
    torch.testing.assert_close(flow_sigmas(5, shift=3.0), 3 * flow_sigmas(5))
    assert SigmaSampler().schedule == "karras" and SigmaSampler().largest == 80.0  # the default, unchanged
    for bad in ({"t_max": 1.0}, {"t_min": 0.5, "t_max": 0.4}, {"shift": 0}):
        with pytest.raises(ValueError, match="t_max|t_min|shift"):
            SigmaSampler(schedule="flow", **bad)


def test_bad_folders_name_the_missing_file(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="flow-matching pipeline folder not found"):
        fm.load_flow_pipeline(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(folders["sd3"], broken)
    shutil.rmtree(broken / "text_encoder_3")
    with pytest.raises(FileNotFoundError, match=r"lacks text_encoder_3/config.json; expected a diffusers") as e:
        open_teacher(broken)
    assert "\n" not in str(e.value)
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="holds a KandinskyPipeline"):
        fm.load_flow_pipeline(broken)
    with pytest.raises(ValueError, match="resolution must be a positive multiple of 4"):
        fm.load_flow_pipeline(folders["sd3"], 18)
    with pytest.raises(ValueError, match="no guidance embedding"):
        fm.load_flow_pipeline(folders["sd3"], 16, guidance=3.5)


def test_short_distillation_of_sd3_changes_the_generator_and_reloads(folders, tmp_path):
    from fdistill.apps import distill, images
    from fdistill.training.loop import training_loop

    sd = fm.load_flow_pipeline(folders["sd3"], 16)  # the pipeline's own 256 T5 tokens, as open_teacher loads it
    data = flow_pipelines.latent_shards(tmp_path / "latents", sd)
    cfg = images.load_config("digits", [
        f"data={data}", "disc_resolutions=[mid]", "disc_hidden=8", "guidance=2.0", "distill.batch_size=4",
        "distill.tau=2", "distill.log_every=1", "distill.r1_form=approx", "distill.iterations=3",
        "distill.divergence=js", "distill.sigmas.schedule=flow", "distill.sigmas.index_range=[0, 999]",
        "distill.lr=1e-3", "text.prompts=null", "text.resolution=16"])
    d = distill.make_distiller(cfg, folders["sd3"])
    assert d.sample_shape == (4, 8, 8) and d.sigma_gen == pytest.approx(999.0, rel=1e-5)
    start = {k: v.clone() for k, v in d.generator.state_dict().items()}
    history = training_loop(d, run_dir=tmp_path / "run", progress=False)
    assert [h["kind"] for h in history] == ["student", "critic", "student"]
    assert all(np.isfinite(v) for h in history for v in h.values() if isinstance(v, float))
    after = d.generator.state_dict()
    assert any(not torch.equal(start[k], after[k]) for k in start)
    generator, student, teacher = distill.load_generator(tmp_path / "run")
    sigma_gen = student.sigmas[0]  # a one-step student
    assert isinstance(teacher, fm.FlowMatchingTeacher) and sigma_gen == pytest.approx(999.0, rel=1e-5)
    torch.testing.assert_close(generator.transformer.state_dict(), d.generator_ema.transformer.state_dict())
    z = torch.randn(2, *teacher.sample_shape)
    cond = teacher.condition(["a red square", "a blue circle"])
    assert isinstance(cond, TextCondition)
    with torch.no_grad():
        x = generator(z * generator.prior_std(sigma_gen), torch.full((2,), sigma_gen), cond)
    assert teacher.decode(x).shape == (2, 3, 16, 16)
    make = distill.sample_maker(teacher.denoiser, teacher, None, steps=2, guidance=2.0)  # EDM's Heun on the teacher
    assert make(["a red square"], [0]).shape == (1, 3, 16, 16)


def _cfg(*overrides):
    from fdistill.apps import images

    return images.load_config("digits", ["distill.sigmas.schedule=flow", "distill.sigmas.index_range=[0, 999]",
                                         *overrides])


def test_students_are_checked_against_the_familys_guidance_and_schedule(folders):
    flux, sd3 = open_teacher(folders["flux"], 16), open_teacher(folders["sd3"], 16)
    with pytest.raises(ValueError, match="guidance=2.0: FLUX.1 teachers are guidance-distilled"):
        flux.prepare_students([], _cfg("guidance=2.0"))
    flux.prepare_students([], _cfg("guidance=1.0"))
    with pytest.warns(UserWarning, match="use distill.sigmas.schedule=flow"):
        sd3.prepare_students([], _cfg("distill.sigmas.schedule=scaled_linear", "distill.sigmas.index_range=[1, 999]"))


@FAMILIES
def test_lora_students_train_only_adapters_and_reload_fused(folders, family):
    import copy

    pytest.importorskip("peft")
    teacher = open_teacher(folders[family], 16, {"max_sequence_length": MSL})
    student = copy.deepcopy(teacher.denoiser)
    teacher.prepare_students([student], _cfg("text.lora_rank=2", "text.gradient_checkpointing=true"))
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    blocks = {n.split(".attn.")[0] for n in trainable}
    assert "transformer.transformer_blocks.0" in blocks
    with torch.no_grad():
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)  # peft starts B at zero: make the adapters matter
    cond, x, s = teacher.text(PROMPTS), torch.randn(2, *teacher.sample_shape), torch.tensor([0.5, 4.0])
    with torch.no_grad():
        want = student.eval()(x, s, cond)
        assert not torch.allclose(want, teacher.denoiser(x, s, cond))
        net = teacher.load_student(student.state_dict(), teacher.student_info(_cfg("text.lora_rank=2")))
        assert not any("lora" in n for n in net.state_dict())
        torch.testing.assert_close(net(x, s, cond), want, rtol=1e-4, atol=1e-4)
