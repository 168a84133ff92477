"""SANA teachers (``SanaPipeline``) on a tiny random folder (tests/sana_pipelines.py): the folder is recognised and
loads offline; prompts are encoded as the pipeline's call encodes them (complex human instruction, Gemma mask, the
"" negative); the denoiser's x0 is the pipeline's, unguided and guided; a distill / sample / export round trip
through the CLI with the sana preset, whose exported pipeline's one step gives fdistill's sample; bad folders
refused in one line; options and the checkpoint record."""

import copy
import inspect
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import sana_pipelines  # noqa: E402

from fdistill.core.diffusion import one_step, seeded_noise  # noqa: E402
from fdistill.teachers import flow_matching as fm  # noqa: E402
from fdistill.teachers.families import sana  # noqa: E402
from fdistill.teachers.guidance import GuidedDenoiser  # noqa: E402
from fdistill.teachers.open import family_of, open_teacher, teacher_from_info  # noqa: E402

PROMPTS = ["  A Cat riding a BIKE ", "a handwritten seven, café ☃"]
R = sana_pipelines.IMAGE  # 32 px, 8 x 8 latents
CALL = dict(height=R, width=R, use_resolution_binning=False)  # the tiny folder's sample_size 8 is no SANA bin


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sana_pipelines.sana(tmp_path_factory.mktemp("sana") / "sana")


@pytest.fixture(scope="module")
def teacher(folder):
    return open_teacher(folder)


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import SanaPipeline

    p = SanaPipeline.from_pretrained(folder, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


def _pipeline_inputs(pipe, prompts, guidance, steps=1, **kwargs):
    """What SanaPipeline's call hands its transformer (the kwargs of each call), and its output latents."""
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw, x=a[0])), with_kwargs=True)
    try:
        with torch.no_grad():
            out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, output_type="latent", **CALL,
                       **kwargs).images
    finally:
        hook.remove()
    return seen, out


# -- (a) recognised, loaded offline, prompts encoded as the pipeline's call encodes them -----------------------------
def test_folder_is_recognised_and_prompts_are_encoded_as_the_pipelines_call(folder, teacher, pipe):
    from diffusers import SanaPipeline

    assert family_of(folder).kind == "sana" and type(teacher) is sana.SanaTeacher
    assert isinstance(teacher, fm.FlowMatchingTeacher) and teacher.info["family"] == "sana"
    json.dumps(teacher.info)
    assert teacher.sample_shape == (4, 8, 8) and teacher.info["network"]["resolution"] == R  # sample_size x 4
    assert teacher.denoiser.shift == 3.0 and teacher.denoiser.timestep_scale == 1.0
    assert teacher.text.sequence_length == 300 and teacher.text.length_setting.endswith("=300")
    codec = teacher.codec
    assert (codec.downsample, codec.channels, codec.scaling_factor, codec.shift_factor) == (4, 4, 0.41407, 0.0)
    chi = sana.complex_human_instruction()
    default = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    assert chi == default and chi[-1] == "User Prompt: " and teacher.text.instruction == "\n".join(chi)

    cond = teacher.text(PROMPTS)
    null = teacher.denoiser.null_condition(cond)
    with torch.no_grad():  # encode_prompt as __call__ calls it: with the CHI for the prompt, without for ""
        pe, pm, ne, nm = pipe.encode_prompt(PROMPTS, True, negative_prompt="", device="cpu", max_sequence_length=300,
                                            complex_human_instruction=chi)
    assert cond.embeds.shape == (2, 300, 24) and cond.mask.shape == (2, 300) and cond.mask.dtype == torch.int64
    assert torch.equal(cond.embeds, pe.float()) and torch.equal(cond.mask, pm)
    assert torch.equal(null.embeds, ne.float()) and torch.equal(null.mask, nm)
    assert null.mask[0].tolist() == [1] + [0] * 299  # "" is [<bos>, <pad>, ...]
    assert cond.mask.sum(1).max() < 40 < teacher.text.instruction_tokens  # <bos> + the prompt: no CHI token kept
    # and what the pipeline's call itself hands the transformer (CFG batch: [negative, prompt])
    seen, _ = _pipeline_inputs(pipe, PROMPTS, 4.5)
    assert torch.equal(seen[0]["encoder_hidden_states"], torch.cat([null.embeds, cond.embeds]))
    assert torch.equal(seen[0]["encoder_attention_mask"], torch.cat([null.mask, cond.mask]))
    # the codec: DC-AE latents times its scaling factor, deterministic
    x = torch.rand(1, 3, R, R) * 2 - 1
    with torch.no_grad():
        z = pipe.vae.encode(x).latent
        torch.testing.assert_close(codec.encode(x), z * 0.41407)
        torch.testing.assert_close(codec.decode(z * 0.41407), pipe.vae.decode(z).sample.clamp(-1, 1))


# -- (b) x0 = x_t - t v as the pipeline computes it ------------------------------------------------------------------
DPM_FIRST = 3 * 0.999 / (1 + 2 * 0.999)  # the DPM-Solver's first sigma (flow_shift 3), fdistill's top level


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_denoiser_x0_is_the_pipelines(teacher, pipe, guidance):
    """At t in {0.125, 0.5, 0.75, 0.99967}: fdistill's (guided) D(x; sigma) with x = x_t (1 + sigma) equals
    (i) x_t - t v(x_t, 1000 t) with v from the transformer called as the pipeline calls it (CFG on v with the ""
    negative), (ii) the folder's own DPM-Solver's x0 and its step to sigma 0 (at t whose 1000 t is an integer, the
    timestep that scheduler feeds), (iii) the whole pipeline's one FlowMatchEuler step from t to 0."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    net = teacher.denoiser
    guided = GuidedDenoiser(net, guidance)
    cond = teacher.text(PROMPTS)
    null = net.null_condition(cond)
    dpm_config, euler = pipe.scheduler.config, pipe.scheduler
    own = DPMSolverMultistepScheduler.from_config(dpm_config)
    own.set_timesteps(1)  # the folder's one step: sigma DPM_FIRST, fed as timestep int64(999.67) = 999
    assert float(own.sigmas[0]) == pytest.approx(DPM_FIRST, rel=1e-6) and own.timesteps.tolist() == [999]
    for t in (0.125, 0.5, 0.75, DPM_FIRST):
        x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(int(t * 1000)))
        sigma = t / (1 - t)
        with torch.no_grad():
            ours = guided(x_t * (1 + sigma), torch.tensor([sigma, sigma]), cond)
            both = pipe.transformer(torch.cat([x_t, x_t]), encoder_hidden_states=torch.cat([null.embeds, cond.embeds]),
                                    encoder_attention_mask=torch.cat([null.mask, cond.mask]),
                                    timestep=torch.full((4,), 1000 * t, dtype=torch.float32), return_dict=False)[0]
        v_null, v_cond = both.float().chunk(2)
        v = v_null + guidance * (v_cond - v_null) if guidance > 1 else v_cond
        torch.testing.assert_close(ours, x_t - t * v, rtol=1e-5, atol=1e-5)  # (i)
        if float(1000 * t).is_integer():  # (ii) the DPM-Solver's timestep int64(1000 sigma) is 1000 t here
            dpm = DPMSolverMultistepScheduler.from_config(dpm_config)
            dpm.set_timesteps(1)
            dpm.sigmas, dpm.timesteps = torch.tensor([t, 0.0]), torch.tensor([int(1000 * t)])
            dpm._step_index = 0
            torch.testing.assert_close(ours, dpm.convert_model_output(v, sample=x_t), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ours, dpm.step(v, dpm.timesteps[0], x_t).prev_sample, rtol=1e-5, atol=1e-5)
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # (iii) sigmas=[t]: one step from t to 0
        try:
            seen, latents = _pipeline_inputs(pipe, PROMPTS, guidance, sigmas=[t], latents=x_t)
        finally:
            pipe.scheduler = euler
        torch.testing.assert_close(seen[0]["timestep"], torch.full((len(seen[0]["x"]),), 1000 * t), rtol=1e-6,
                                   atol=1e-4)
        torch.testing.assert_close(ours, latents, rtol=1e-5, atol=1e-5)


def test_taps_are_the_middle_blocks_tokens_on_the_latent_grid(teacher, monkeypatch):
    net = teacher.denoiser
    assert net.block_names == ["transformer_blocks.0", "transformer_blocks.1"] and net.patch == 1
    assert net._taps == {8: "transformer_blocks.1"} and net.feature_channels() == {8: 16}  # 2 heads x 8
    cond, x, s = teacher.text(PROMPTS), torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0])
    seen = {}
    hook = net.transformer.transformer_blocks[1].register_forward_hook(lambda m, a, o: seen.setdefault("tokens", o))
    with torch.no_grad():
        d, feats = net(x, s, cond, return_features=True)
        assert torch.equal(d, net(x, s, cond))
    hook.remove()
    assert seen["tokens"].shape == (2, 64, 16) and feats[8].shape == (2, 16, 8, 8)
    torch.testing.assert_close(feats[8][:, :, 3, 5], seen["tokens"][:, 3 * 8 + 5])
    monkeypatch.setattr(net.transformer.norm_out, "forward", lambda *a, **k: pytest.fail("ran past the tap"))
    assert torch.equal(net.features(x, s, cond)[8], feats[8])


# -- (c) the sana preset: distill, sample, export through the CLI ----------------------------------------------------
def test_sana_preset_loads_with_its_table_5_values():
    from fdistill.apps import images

    cfg = images.load_config("sana")
    d = cfg.distill
    assert (cfg.guidance, cfg.disc_resolutions, cfg.teacher_options) == (4.5, ["mid"], {})
    assert (d.divergence, d.sigmas.schedule, d.sigmas.shift, tuple(d.sigmas.index_range)) == ("js", "flow", 3.0,
                                                                                              (0, 999))
    assert (d.batch_size, d.tau, d.gan_weight, d.iterations, d.lr, d.weight_decay, d.r1_gamma) == (
        384, 5, 5e-3, 25000, 5e-7, 1e-2, 1.0)  # Table 5's SDXL column
    assert fm.t_of_sigma(d.sigmas.largest) == pytest.approx(DPM_FIRST, rel=1e-6)  # the pipeline's first sigma


# the sana preset made tiny: CPU, fp32, one small LoRA, 2 iterations
TINY = ["text.resolution=32", "distill.batch_size=2", "distill.iterations=2", "distill.tau=2", "distill.log_every=1",
        "distill.precision=fp32", "distill.fsdp=false", "distill.h_warmup=0", "text.gradient_checkpointing=false",
        "text.lora_rank=2", "disc_hidden=8", "distill.lr=1e-3"]  # an lr that moves the adapters in one update
PROMPT = "a photo of a cat on a bike"


def test_distill_sample_export_round_trip_through_the_cli(folder, captioned, tmp_path, capsys):
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    from fdistill.apps import cli, distill

    pytest.importorskip("peft")
    run, exported = tmp_path / "run", tmp_path / "exported"
    assert cli.main(["distill", "--config", "sana", "--teacher", str(folder), "--out", str(run), "--no-progress",
                     f"data={captioned}", *TINY]) == 0
    saved = (run / "config.yaml").read_text()
    assert "guidance: 4.5" in saved and "shift: 3.0" in saved and "divergence: js" in saved  # the preset's
    assert cli.main(["sample", "--checkpoint", str(run), "--prompt", "a red square", "--prompt", PROMPT,
                     "--seed", "7"]) == 0
    ours = np.asarray(Image.open(run / "samples" / "000001.png"))  # PROMPT at seed 8
    capsys.readouterr()
    assert cli.main(["export", "--checkpoint", str(run), "--diffusers", str(exported)]) == 0
    line = capsys.readouterr().out
    assert ("num_inference_steps=1, guidance_scale=1, use_resolution_binning=False, height=32, width=32, "
            "max_sequence_length=300)") in line and f"t = {DPM_FIRST:.6g}" in line
    out = SanaPipeline.from_pretrained(exported, local_files_only=True)
    out.set_progress_bar_config(disable=True)
    assert isinstance(out.scheduler, FlowMatchEulerDiscreteScheduler) and out.scheduler.config.shift == 3.0
    call = dict(num_inference_steps=1, guidance_scale=1.0, max_sequence_length=300, **CALL)
    with torch.no_grad():
        theirs = out(PROMPT, output_type="np", generator=torch.Generator().manual_seed(8), **call).images[0]
        latents = out(PROMPT, output_type="latent", generator=torch.Generator().manual_seed(8), **call).images
    theirs = (theirs * 255).round().astype(np.uint8)
    assert ours.shape == theirs.shape == (R, R, 3)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    generator, student, teacher = distill.load_generator(run)  # a one-step student: its one level
    sigma_gen = student.sigmas[0]
    assert type(teacher) is sana.SanaTeacher and fm.t_of_sigma(sigma_gen) == pytest.approx(DPM_FIRST, rel=1e-6)
    with torch.no_grad():
        z = one_step(generator, seeded_noise(teacher.sample_shape, [8]), sigma_gen, teacher.condition([PROMPT]))
    torch.testing.assert_close(latents, z, rtol=1e-4, atol=1e-4)
    # the export carries the student (its fused adapters), not the teacher's transformer
    mine, theirs = teacher.denoiser.transformer.state_dict(), out.transformer.state_dict()
    assert mine.keys() == theirs.keys()
    changed = [k for k in mine if not torch.equal(mine[k], theirs[k])]
    assert changed and all(k.split(".")[-2] in ("to_q", "to_k", "to_v", "0") for k in changed)  # LoRA's targets
    # the exported folder reopens as a SANA teacher with the same shift (its scheduler: FlowMatchEuler, shift 3)
    assert open_teacher(exported).denoiser.shift == 3.0


@pytest.mark.parametrize("sigma_gen", [None, 80.0])
def test_exported_pipelines_one_step_is_a_perturbed_students_sample(teacher, sigma_gen, tmp_path):
    from diffusers import SanaPipeline

    student = copy.deepcopy(teacher.denoiser).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.transformer.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    line = teacher.export(student, tmp_path / "exported", sigma_gen)
    sigma = student.sigma_max if sigma_gen is None else sigma_gen  # 999: t = 0.999
    assert f"t = {sigma / (1 + sigma):.6g}" in line
    out = SanaPipeline.from_pretrained(tmp_path / "exported", local_files_only=True)
    out.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=1, guidance_scale=1.0, **CALL)
    z = seeded_noise(teacher.sample_shape, [7, 9])
    with torch.no_grad():
        ours = one_step(student, z, sigma, teacher.condition(PROMPTS))
        gens = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(9)]
        latents = out(PROMPTS, output_type="latent", generator=gens, **call).images
        gens = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(9)]
        images = out(PROMPTS, output_type="pt", generator=gens, **call).images
    torch.testing.assert_close(latents, ours, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(images, (teacher.decode(ours) + 1) / 2, rtol=1e-4, atol=1e-4)


def test_latent_shards_hold_the_gemma_mask_and_another_text_length_is_refused(folder, teacher, captioned, tmp_path):
    from fdistill.apps import distill, images, t2i
    from fdistill.data.latent_shards import LatentShards
    from fdistill.training.loop import training_loop

    out = t2i.prepare_latents(folder, captioned, tmp_path / "latents", batch_size=2, progress=False)
    shards = LatentShards(out)
    assert shards.tensors == {"latents": ((4, 8, 8), torch.float32), "embeds": ((300, 24), torch.float32),
                              "mask": ((300,), torch.int64)}
    latents, cond, caption = shards[1]
    want = teacher.text([caption])
    torch.testing.assert_close(cond["embeds"], want.embeds[0], rtol=1e-6, atol=1e-6)  # batch-size rounding only
    assert torch.equal(cond["mask"], want.mask[0])
    overrides = [f"data={out}", *TINY[:-2]]
    with pytest.raises(ValueError, match=r"hold 300-token text embeddings, but this sana teacher's are 16 "
                                         r"\(teacher_options.max_sequence_length=16\)"):
        distill.make_distiller(images.load_config("sana", [*overrides, "teacher_options.max_sequence_length=16"]),
                               folder)
    d = distill.make_distiller(images.load_config("sana", overrides), folder)
    history = training_loop(d, run_dir=tmp_path / "run", progress=False)
    assert [h["kind"] for h in history] == ["student", "critic"]
    assert all(np.isfinite(v) for h in history for v in h.values() if isinstance(v, float))


# -- (d) bad folders, each refused in one line -----------------------------------------------------------------------
def _edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _pickled_text_encoder(f):
    (f / "text_encoder" / "model.safetensors").unlink()
    (f / "text_encoder" / "pytorch_model.bin").write_bytes(b"a pickle, never read")


BAD = [  # (what, how the folder is broken, error, message)
    ("missing component", lambda f: shutil.rmtree(f / "text_encoder"), FileNotFoundError,
     r"lacks text_encoder/config.json; expected a diffusers SanaPipeline folder"),
    ("pickled weights", _pickled_text_encoder, ValueError,
     r"text_encoder holds its weights as pytorch_model.bin, a pickle; expected safetensors"),
    ("100000 blocks", lambda f: _edit_json(f / "transformer" / "config.json", num_layers=100000), ValueError,
     r"transformer/config.json describes a network of 0\.\d\dB parameters .* set FDISTILL_MAX_TEACHER_GB"),
    ("NaN VAE scaling", lambda f: _edit_json(f / "vae" / "config.json", scaling_factor=math.nan), ValueError,
     r"vae/config.json: scaling_factor must be a finite positive number, got nan"),
    ("negative VAE scaling", lambda f: _edit_json(f / "vae" / "config.json", scaling_factor=-0.41407), ValueError,
     r"vae/config.json: scaling_factor must be a finite positive number, got -0.41407"),
    ("NaN flow_shift", lambda f: _edit_json(f / "scheduler" / "scheduler_config.json", flow_shift=math.nan),
     ValueError, r"scheduler/scheduler_config.json: flow_shift must be a finite positive number, got nan"),
    ("negative flow_shift", lambda f: _edit_json(f / "scheduler" / "scheduler_config.json", flow_shift=-3.0),
     ValueError, r"scheduler/scheduler_config.json: flow_shift must be a finite positive number, got -3.0"),
    ("not a flow scheduler", lambda f: _edit_json(f / "scheduler" / "scheduler_config.json", use_flow_sigmas=False),
     ValueError, r"scheduler_config.json: expected a flow scheduler"),
]


@pytest.mark.parametrize("what, breaks, error, match", BAD, ids=[b[0] for b in BAD])
def test_bad_folders_are_refused_in_one_line(folder, tmp_path, monkeypatch, what, breaks, error, match):
    monkeypatch.setenv("FDISTILL_MAX_TEACHER_GB", "0.25")  # the tiny folder needs < 1 MB; 100000 blocks ~1.3 GB
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    breaks(broken)
    with pytest.raises(error, match=match) as e:
        open_teacher(broken)
    assert "\n" not in str(e.value)


# -- (e) options and the checkpoint record ---------------------------------------------------------------------------
def test_options_guidance_refused_and_the_record_rebuilds_the_teacher(folder, pipe):
    with pytest.raises(ValueError, match="teacher_options.guidance=3.5: SANA has no guidance embedding") as e:
        open_teacher(folder, None, {"guidance": 3.5})
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="resolution must be a positive multiple of 32 pixels"):
        open_teacher(folder, 48)
    teacher = open_teacher(folder, 64, {"max_sequence_length": 16, "tap_block": 0})
    kw = teacher.info["network"]
    assert (kw["resolution"], kw["max_sequence_length"], kw["tap_block"], kw["guidance"]) == (64, 16, 0, None)
    assert teacher.sample_shape == (4, 16, 16) and teacher.denoiser._taps == {16: "transformer_blocks.0"}
    cond = teacher.text(PROMPTS)
    with torch.no_grad():  # the pipeline's encoding at max_sequence_length=16
        pe, pm, _, _ = pipe.encode_prompt(PROMPTS, False, device="cpu", max_sequence_length=16,
                                          complex_human_instruction=sana.complex_human_instruction())
    assert torch.equal(cond.embeds, pe.float()) and torch.equal(cond.mask, pm)
    again = teacher_from_info(json.loads(json.dumps(teacher.info)))
    assert type(again) is sana.SanaTeacher and again.info == teacher.info
    assert again.text.max_sequence_length == 16 and again.denoiser._taps == teacher.denoiser._taps
    assert again.denoiser.shift == 3.0 and again.sample_shape == (4, 16, 16)
    x, s = torch.randn(2, 4, 16, 16), torch.tensor([0.5, 40.0])
    with torch.no_grad():
        torch.testing.assert_close(again.denoiser(x, s, again.text(PROMPTS)), teacher.denoiser(x, s, cond))
    with pytest.raises(ValueError, match="needs the Gemma attention mask"):
        teacher.denoiser(x, s, type(cond)(cond.embeds))
