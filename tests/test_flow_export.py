"""Flow-matching (SD3, FLUX.1) students out of and into fdistill: export as a diffusers pipeline whose one step is
the student's, latent shards prepared by the flow teacher's own VAE and text encoders, the text settings a flow
teacher is opened with (and rebuilt from a checkpoint with), and the transformer blocks FSDP shards by."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import flow_pipelines  # noqa: E402

from fdistill.core.diffusion import one_step, seeded_noise  # noqa: E402
from fdistill.teachers import flow_matching as fm  # noqa: E402
from fdistill.teachers.open import open_teacher  # noqa: E402

MSL = 8  # T5 tokens in the tests
PROMPT = "a photo of a cat on a bike"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    return {"sd3": flow_pipelines.sd3(root / "sd3"), "flux": flow_pipelines.flux(root / "flux"),
            "schnell": flow_pipelines.flux(root / "schnell", guidance_embeds=False)}


def _student(teacher):
    """A copy of the teacher's denoiser with perturbed weights (so that the export must carry them)."""
    student = copy.deepcopy(teacher.denoiser)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.transformer.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return student.eval()


# -- 1. export ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd3", "flux", "schnell"])
@pytest.mark.parametrize("sigma_gen", [None, 80.0])
def test_exported_pipelines_one_step_is_the_students_sample(folders, family, sigma_gen, tmp_path):
    from diffusers import DiffusionPipeline

    teacher = open_teacher(folders[family], 16, {"max_sequence_length": MSL})
    student = _student(teacher)
    line = teacher.export(student, tmp_path / "exported", sigma_gen)
    sigma = 999.0 if sigma_gen is None else sigma_gen
    guidance = {"sd3": "guidance_scale=1, ", "flux": "guidance_scale=3.5, ", "schnell": ""}[family]
    assert f"num_inference_steps=1, {guidance}height=16, width=16, max_sequence_length={MSL})" in line
    assert f"t = {sigma / (1 + sigma):.6g}" in line
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "exported", local_files_only=True)
    assert type(pipe).__name__ == ("StableDiffusion3Pipeline" if family == "sd3" else "FluxPipeline")
    call = dict(num_inference_steps=1, height=16, width=16, max_sequence_length=MSL)
    if family != "schnell":
        call["guidance_scale"] = 1.0 if family == "sd3" else 3.5
    z = seeded_noise(teacher.sample_shape, [7])
    with torch.no_grad():
        ours = one_step(student, z, sigma, teacher.condition([PROMPT]))
        latents = pipe(PROMPT, output_type="latent", generator=torch.Generator().manual_seed(7), **call).images
        images = pipe(PROMPT, output_type="pt", generator=torch.Generator().manual_seed(7), **call).images
    if family != "sd3":
        latents = fm.unpack_latents(latents, 8, 8)  # FluxPipeline returns packed latents
    torch.testing.assert_close(latents, ours, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(images, (teacher.decode(ours) + 1) / 2, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the teacher's own scheduler (t = 1) would not give it
        assert not torch.allclose(ours, student(z, torch.tensor([1e9]), teacher.condition([PROMPT])), atol=1e-3)


@pytest.mark.parametrize("family, options", [("sd3", ["text.lora_rank=2"]),
                                             ("flux", ["guidance=1.0", "teacher_options.guidance=5.0",
                                                       f"teacher_options.max_sequence_length={MSL}"])])
def test_distill_sample_export_round_trip_through_the_cli(folders, captioned, family, options, tmp_path,
                                                          capsys):
    from diffusers import DiffusionPipeline

    from fdistill.apps import cli

    if "text.lora_rank=2" in options:
        pytest.importorskip("peft")
    run, exported = tmp_path / "run", tmp_path / "exported"
    run_args = [a for a in RUN if not a.startswith("guidance=")] + (["guidance=2.0"] if family == "sd3" else [])
    assert cli.main(["distill", "--teacher", str(folders[family]), "--out", str(run), "--no-progress",
                     f"data={captioned}", *run_args, *options, "distill.iterations=2"]) == 0
    assert cli.main(["sample", "--checkpoint", str(run), "--prompt", "a red square", "--prompt", PROMPT,
                     "--seed", "7"]) == 0
    ours = np.asarray(Image.open(run / "samples" / "000001.png"))
    capsys.readouterr()
    assert cli.main(["export", "--checkpoint", str(run), "--diffusers", str(exported)]) == 0
    line = capsys.readouterr().out
    want = "guidance_scale=1, height=16, width=16, max_sequence_length=256" if family == "sd3" else \
        f"guidance_scale=5, height=16, width=16, max_sequence_length={MSL}"
    assert want in line and "t = 0.999" in line
    pipe = DiffusionPipeline.from_pretrained(exported, local_files_only=True)
    call = dict(guidance_scale=1.0, max_sequence_length=256) if family == "sd3" else \
        dict(guidance_scale=5.0, max_sequence_length=MSL)
    theirs = pipe(PROMPT, num_inference_steps=1, height=16, width=16, output_type="np",
                  generator=torch.Generator().manual_seed(8), **call).images[0]
    theirs = (theirs * 255).round().astype(np.uint8)
    assert ours.shape == theirs.shape == (16, 16, 3)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_one_step_scheduler_takes_one_step_from_t_gen_whatever_the_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for base in (dict(shift=3.0), dict(shift=3.0, use_dynamic_shifting=True, shift_terminal=0.02)):
        config = fm.one_step_scheduler_config(dict(FlowMatchEulerDiscreteScheduler(**base).config), 0.999)
        sched = FlowMatchEulerDiscreteScheduler.from_config(config)
        sched.set_timesteps(1, mu=0.8)
        torch.testing.assert_close(sched.sigmas, torch.tensor([0.999, 0.0]))
        torch.testing.assert_close(sched.timesteps, torch.tensor([999.0]))
        sched.set_timesteps(sigmas=[1.0], mu=0.8)  # as FluxPipeline calls it
        torch.testing.assert_close(sched.sigmas, torch.tensor([0.999, 0.0]))
        x, v = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
        torch.testing.assert_close(sched.step(v, sched.timesteps[0], x).prev_sample, x - 0.999 * v)


def test_export_refuses_a_full_folder_and_a_bad_sigma(folders, tmp_path):
    teacher = open_teacher(folders["sd3"], 16, {"max_sequence_length": MSL})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="is not empty"):
        teacher.export(teacher.denoiser, tmp_path / "full")
    with pytest.raises(ValueError, match="sigma_gen must be a positive finite"):
        teacher.export(teacher.denoiser, tmp_path / "new", float("inf"))
    assert not (tmp_path / "new").exists()


# -- 2. prepare-latents with a flow teacher, then training from the shards ------------------------------------------
RUN = ["disc_resolutions=[mid]", "disc_hidden=8", "guidance=2.0", "distill.batch_size=4", "distill.tau=2",
       "distill.log_every=1", "distill.r1_form=approx", "distill.divergence=js", "distill.sigmas.schedule=flow",
       "distill.sigmas.index_range=[0, 999]", "text.prompts=null", "text.resolution=16"]


def test_sd3_prepare_latents_encode_with_its_own_vae_and_text_encoders_then_train(folders, captioned, tmp_path):
    from fdistill.apps import cli
    from fdistill.data.latent_shards import LatentShards
    from fdistill.training import checkpoint

    out = tmp_path / "latents"
    assert cli.main(["prepare-latents", "--teacher", str(folders["sd3"]), "--data", str(captioned), "--out", str(out),
                     "--batch", "4", "--shard-size", "4", "--no-progress"]) == 0
    shards = LatentShards(out)
    assert len(shards) == 5
    assert shards.tensors["latents"][0] == (4, 8, 8)
    assert shards.tensors["embeds"][0] == (77 + 256, 48) and shards.tensors["pooled"][0] == (32,)
    teacher = open_teacher(folders["sd3"], 16)
    latents, cond, caption = shards[0]
    torch.testing.assert_close(cond["embeds"], teacher.text([caption]).embeds[0])
    torch.testing.assert_close(cond["pooled"], teacher.text([caption]).pooled[0])
    assert teacher.codec.shift_factor == pytest.approx(0.0609) and teacher.codec.scaling_factor == pytest.approx(1.5305)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the codec's (z - shift) * scale of a posterior sample
        z = teacher.codec.vae.encode(torch.zeros(1, 3, 16, 16)).latent_dist.sample(g)
        ours = teacher.codec.encode(torch.zeros(1, 3, 16, 16), torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, (z - 0.0609) * 1.5305)
    assert latents.shape == (4, 8, 8) and torch.isfinite(latents).all()
    run = tmp_path / "run"
    assert cli.main(["distill", "--teacher", str(folders["sd3"]), "--out", str(run), "--no-progress", f"data={out}",
                     *RUN, "distill.iterations=2"]) == 0
    assert checkpoint.latest(run).name == "000000002"


def test_shards_of_another_t5_length_are_refused_and_the_text_settings_reach_the_checkpoint(folders, captioned,
                                                                                           tmp_path):
    from fdistill.apps import distill, images, t2i
    from fdistill.data.latent_shards import LatentShards
    from fdistill.training.loop import training_loop

    options = {"max_sequence_length": MSL, "tap_block": 0}
    out = t2i.prepare_latents(folders["sd3"], captioned, tmp_path / "latents", batch_size=4, progress=False,
                              options=options)
    assert LatentShards(out).tensors["embeds"][0] == (77 + MSL, 48)
    cfg = images.load_config("digits", [f"data={out}", *RUN, "distill.iterations=2"])
    with pytest.raises(ValueError, match=f"hold {77 + MSL}-token text embeddings, but this sd3 teacher's are 333"):
        distill.make_distiller(cfg, folders["sd3"])
    cfg = images.load_config("digits", [f"data={out}", *RUN, "distill.iterations=2",
                                        f"teacher_options.max_sequence_length={MSL}", "teacher_options.tap_block=0"])
    d = distill.make_distiller(cfg, folders["sd3"])
    assert d.info["network"]["max_sequence_length"] == MSL and d.info["network"]["tap_block"] == 0
    training_loop(d, run_dir=tmp_path / "run", progress=False)
    _, _, teacher = distill.load_generator(tmp_path / "run")
    assert teacher.text.max_sequence_length == MSL and teacher.denoiser.tap_block == 0
    assert teacher.denoiser._taps == {4: "transformer_blocks.0"}


def test_prepare_latents_refuses_an_image_denoiser(tmp_path, monkeypatch):
    from fdistill.apps import t2i
    from fdistill.teachers.base import Teacher

    image_teacher = Teacher(denoiser=None, sample_shape=(3, 8, 8), info={}, source="x")
    monkeypatch.setattr(t2i, "open_teacher", lambda *a, **k: image_teacher)
    with pytest.raises(ValueError, match="prepare-latents needs a text-to-image pipeline folder"):
        t2i.prepare_latents(tmp_path / "teacher.pt", tmp_path, tmp_path / "out", progress=False)


# -- 3. the text settings of flow teachers ---------------------------------------------------------------------------
def test_flow_options_are_checked_and_old_text_keys_are_read_with_a_notice():
    from fdistill.apps import images
    from fdistill.teachers.flow_matching import FlowOptions

    assert FlowOptions() == FlowOptions(None, None, None)
    for bad, match in [({"max_sequence_length": 0}, "teacher_options.max_sequence_length must be null or an integer"),
                       ({"max_sequence_length": True}, "teacher_options.max_sequence_length"),
                       ({"guidance": 0.0}, "teacher_options.guidance must be null or a positive number"),
                       ({"guidance": float("nan")}, "teacher_options.guidance"),
                       ({"guidance": "3.5"}, "teacher_options.guidance"),
                       ({"tap_block": -1}, "teacher_options.tap_block must be null"),
                       ({"tap_block": 1.5}, "teacher_options.tap_block")]:
        with pytest.raises(ValueError, match=match) as e:
            FlowOptions(**bad)
        assert "\n" not in str(e.value)
    with pytest.warns(FutureWarning, match="text.flux_guidance is deprecated: read as teacher_options.guidance=5.0"):
        cfg = images.load_config("digits", ["text.flux_guidance=5.0", f"text.max_sequence_length={MSL}"])
    assert cfg.teacher_options == {"guidance": 5.0, "max_sequence_length": MSL}
    assert images.load_config("digits", ["text.flux_guidance=3.5"]).teacher_options == {}  # the old default


@pytest.mark.parametrize("family", ["sd3", "flux", "schnell"])
def test_open_teacher_takes_the_options_and_the_record_rebuilds_them(folders, family):
    from fdistill.teachers.open import open_teacher, teacher_from_info

    guidance = 5.0 if family == "flux" else None  # only FLUX.1-dev has a guidance embedding
    options = {"max_sequence_length": MSL, "tap_block": 1, **({"guidance": guidance} if guidance else {})}
    teacher = open_teacher(folders[family], 16, options)
    assert teacher.denoiser.guidance == guidance and teacher.denoiser.tap_block == 1
    assert teacher.text.max_sequence_length == MSL
    kw = teacher.info["network"]
    assert (kw["guidance"], kw["tap_block"], kw["max_sequence_length"]) == (guidance, 1, MSL)
    again = teacher_from_info(json.loads(json.dumps(teacher.info)))
    assert again.denoiser.guidance == guidance and again.denoiser.tap_block == 1
    assert again.text.max_sequence_length == MSL and again.denoiser._taps == teacher.denoiser._taps
    default = open_teacher(folders[family], 16)
    assert default.text.max_sequence_length == (256 if family == "sd3" else 512)
    assert default.denoiser.guidance == (3.5 if family == "flux" else None)
    assert default.denoiser.tap_block == len(default.denoiser.block_names) // 2
    with pytest.raises(ValueError, match=r"tap_block must be a block index in \[0, "):
        open_teacher(folders[family], 16, {"tap_block": 99})
    if family != "flux":
        with pytest.raises(ValueError, match="guidance=3.5") as e:
            open_teacher(folders[family], 16, {"guidance": 3.5})
        assert "\n" not in str(e.value)
    kind = "flux" if family == "schnell" else family
    with pytest.raises(ValueError, match=f"teacher_options.shift is not an option of a {kind} teacher"):
        open_teacher(folders[family], 16, {"shift": 3.0})


def test_stable_diffusion_teachers_refuse_the_flow_options(captioned, tmp_path):
    import t2i_pipelines

    from fdistill.apps import t2i
    from fdistill.data.latent_shards import LatentShards
    from fdistill.teachers.families.stable_diffusion import SD15Teacher
    from fdistill.teachers.open import open_teacher

    folder = t2i_pipelines.sd15(tmp_path / "sd15")
    with pytest.raises(ValueError, match=r"teacher_options \['max_sequence_length'\] given, but a sd15 teacher takes"):
        open_teacher(folder, 16, {"max_sequence_length": 8})
    teacher = open_teacher(folder, 16)
    assert type(teacher) is SD15Teacher and teacher.info["family"] == "sd15"
    out = t2i.prepare_latents(folder, captioned, tmp_path / "latents", 16, progress=False)  # SD's own encoders
    shards = LatentShards(out)
    latents, cond, caption = shards[0]
    assert latents.shape == teacher.sample_shape and set(shards.cond_names) == {"embeds"}
    torch.testing.assert_close(cond["embeds"], teacher.text([caption]).embeds[0])


# -- 4. FSDP units ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_fsdp_shards_a_flow_transformer_by_its_blocks(folders, family):
    from fdistill.teachers.guidance import GuidedDenoiser
    from fdistill.training.distributed import _blocks

    net = open_teacher(folders[family], 16, {"max_sequence_length": MSL}).denoiser
    t = net.transformer
    want = [*t.transformer_blocks, *(t.single_transformer_blocks if family == "flux" else [])]
    assert len(want) == (2 if family == "sd3" else 4)
    for module in (net, GuidedDenoiser(net, 2.0)):
        got = _blocks(module)
        assert len(got) == len(want) and all(a is b for a, b in zip(got, want))
