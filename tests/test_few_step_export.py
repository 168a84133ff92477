"""k-step students exported as diffusers pipelines (``Teacher.export`` with a ``StudentSteps``): the exported
folder, called exactly as the export line prints it (its ``timesteps=`` / ``sigmas=`` parsed back from the line),
gives ``fdistill.apps.distill.sample_maker``'s image for the same seed and prompt, to 1/255 on [0, 1] images.

Stable Diffusion (SD1.5, SDXL): ode (EulerDiscreteScheduler) at k = 2 and 4, sde (LCMScheduler, its noise drawn
from the pipeline's generator: the same stream) at k = 2, a one-step student at t = 500 (an Euler step), an
off-grid level refused in one line. Flow teachers (SD3, FLUX.1, Qwen-Image): ode at k = 2 and 4 (FlowMatchEuler with
``sigmas=``); SANA's sde, whose pipeline hands its generator to the scheduler's step; SD3's sde, whose pipeline does
not, says so. Tiny random pipelines (tests/t2i_pipelines.py, flow_pipelines.py, sana_pipelines.py,
qwen_pipelines.py), a perturbed copy of the teacher's network as the student (no training)."""

import ast
import copy
import re

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import flow_pipelines  # noqa: E402
import qwen_pipelines  # noqa: E402
import sana_pipelines  # noqa: E402
import t2i_pipelines  # noqa: E402

from fdistill.apps.distill import sample_maker  # noqa: E402
from fdistill.core.few_step import StudentSteps  # noqa: E402
from fdistill.teachers.open import open_teacher  # noqa: E402

PROMPT = "a photo of a cat on a bike"
MSL = 8  # T5 tokens of the flow teachers
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers' Euler
SD_TIMESTEPS = {2: [999, 499], 4: [999, 749, 499, 249]}  # few_step.default_levels' trailing timesteps


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("few_step")
    return {"sd15": t2i_pipelines.sd15(root / "sd15"), "sdxl": t2i_pipelines.sdxl(root / "sdxl"),
            "sd3": flow_pipelines.sd3(root / "sd3"), "flux": flow_pipelines.flux(root / "flux"),
            "sana": sana_pipelines.sana(root / "sana"), "qwen": qwen_pipelines.qwen_image(root / "qwen")}


@pytest.fixture(scope="module")
def teachers(folders):
    opened = {}

    def get(family):
        if family not in opened:
            options = {"max_sequence_length": MSL} if family in ("sd3", "flux") else None
            opened[family] = open_teacher(folders[family], 32 if family in ("sana", "qwen") else 16, options)
        return opened[family]
    return get


def _student(teacher):
    """A copy of the teacher's denoiser with perturbed weights (so that the export must carry them)."""
    student = copy.deepcopy(teacher.denoiser)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (student.unet if hasattr(student, "unet") else student.transformer).parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return student.eval()


def _sd_levels(teacher, timesteps):
    return tuple(float(teacher.denoiser.log_sigmas[t].exp()) for t in timesteps)


def _flow_levels(k):
    """few_step.default_levels of an unshifted flow teacher: t = 0.999, ..., 0.999 / k, sigma = t / (1 - t)."""
    t = torch.linspace(0.999, 0, k + 1, dtype=torch.float64)[:k]
    return tuple(float(s) for s in t / (1 - t))


def _printed_call(line):
    """The keyword arguments of the call the export line prints, ``...from_pretrained('out')(prompt, k=v, ...)``."""
    m = re.search(r"\.from_pretrained\('[^']*'\)\(prompt, ([^()]*)\)", line)
    assert m, line
    call = ast.parse(f"f({m.group(1)})", mode="eval").body
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}


def _round_trip(teacher, student, steps, out, seed=7):
    """(the exported pipeline's image called as printed, sample_maker's image), both [1, 3, H, W] in [0, 1]."""
    from diffusers import DiffusionPipeline

    line = teacher.export(student, out, steps)
    assert "\n" not in line
    kwargs = _printed_call(line)
    pipe = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe(PROMPT, generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs).images
        ours = (sample_maker(student, teacher, steps)([PROMPT], [seed]) + 1) / 2
    return theirs, ours, line, kwargs


def _assert_images_match(theirs, ours):
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max() <= 1 / 255


# -- Stable Diffusion -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, k", [("sd15", 2), ("sd15", 4), ("sdxl", 2)])
def test_sd_k_step_ode_export_gives_sample_makers_image(teachers, family, k, tmp_path):
    teacher = teachers(family)
    student = _student(teacher)
    steps = StudentSteps(_sd_levels(teacher, SD_TIMESTEPS[k]), "ode")
    theirs, ours, line, kwargs = _round_trip(teacher, student, steps, tmp_path / "out")
    assert kwargs == {"timesteps": SD_TIMESTEPS[k], "guidance_scale": 0}
    assert "EulerDiscreteScheduler" in line
    assert (tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text().count("EulerDiscreteScheduler")
    _assert_images_match(theirs, ours)
    one = (sample_maker(student, teacher, steps.sigmas[0])([PROMPT], [7]) + 1) / 2
    assert (one - ours).abs().max() > 4 / 255  # the k steps matter: not the one-step image


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_sd_sde_export_draws_the_same_noise_stream(teachers, family, tmp_path):
    """LCMScheduler draws each step's fresh noise from the pipeline's generator, after the latents: the stream
    sample_maker draws from the seed (one prompt, CPU)."""
    teacher = teachers(family)
    student = _student(teacher)
    steps = StudentSteps(_sd_levels(teacher, SD_TIMESTEPS[2]), "sde")
    theirs, ours, line, kwargs = _round_trip(teacher, student, steps, tmp_path / "out")
    assert kwargs == {"timesteps": [999, 499], "guidance_scale": 0} and "LCMScheduler" in line
    _assert_images_match(theirs, ours)
    ode = (sample_maker(student, teacher, StudentSteps(steps.sigmas, "ode"))([PROMPT], [7]) + 1) / 2
    assert (ode - ours).abs().max() > 4 / 255  # the fresh noise matters


@pytest.mark.parametrize("level", ["steps", "float"])
def test_sd_one_step_student_below_the_top_exports(teachers, level, tmp_path):
    """A one-step student at t = 500 (sigma 1.61828), refused before, is one Euler step from timesteps=[500]."""
    teacher = teachers("sd15")
    student = _student(teacher)
    steps = StudentSteps(_sd_levels(teacher, [500])) if level == "steps" else 1.61828
    theirs, ours, _, kwargs = _round_trip(teacher, student, steps, tmp_path / "out")
    assert kwargs == {"timesteps": [500], "guidance_scale": 0}
    _assert_images_match(theirs, ours)


def test_sd_one_step_at_the_top_is_exported_as_before(teachers, tmp_path):
    teacher = teachers("sd15")
    top = StudentSteps((teacher.denoiser.sigma_max,), "ode")
    line = teacher.export(teacher.denoiser, tmp_path / "a", top)
    assert line == teacher.export(teacher.denoiser, tmp_path / "b").replace(str(tmp_path / "b"), str(tmp_path / "a"))
    assert "num_inference_steps=1, guidance_scale=0) gives fdistill sample's image" in line
    assert '"DDIMScheduler"' in (tmp_path / "a" / "scheduler" / "scheduler_config.json").read_text()


def test_sd_off_grid_level_is_refused_in_one_line(teachers, tmp_path):
    teacher = teachers("sd15")
    steps = StudentSteps((teacher.denoiser.sigma_max, 1.5), "ode")
    with pytest.raises(ValueError, match=r"sigma 1\.5 .* nearest is t = 4\d\d \(sigma ") as e:
        teacher.export(teacher.denoiser, tmp_path / "out", steps)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


# -- flow teachers --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, k", [("sd3", 2), ("sd3", 4), ("flux", 2), ("qwen", 2)])
def test_flow_k_step_ode_export_gives_sample_makers_image(teachers, family, k, tmp_path):
    teacher = teachers(family)
    student = _student(teacher)
    steps = StudentSteps(_flow_levels(k), "ode")
    theirs, ours, line, kwargs = _round_trip(teacher, student, steps, tmp_path / "out")
    t = [s / (1 + s) for s in steps.sigmas]
    assert kwargs["sigmas"] == pytest.approx(t, rel=1e-8) and kwargs["height"] == kwargs["width"] == 16 * (
        1 + (family == "qwen"))
    assert "gives fdistill sample's image for the same seed" in line and "Euler steps" in line
    _assert_images_match(theirs, ours)
    one = (sample_maker(student, teacher, steps.sigmas[0])([PROMPT], [7]) + 1) / 2
    assert (one - ours).abs().max() > 4 / 255


def test_sana_sde_export_draws_the_same_noise_stream(teachers, tmp_path):
    """SanaPipeline hands its generator to FlowMatchEuler's stochastic step, on unpacked latents: the same stream."""
    teacher = teachers("sana")
    student = _student(teacher)
    sigma = teacher.denoiser.shift * torch.tensor([0.999, 0.5], dtype=torch.float64) / torch.tensor([0.001, 0.5])
    steps = StudentSteps(tuple(float(s) for s in sigma), "sde")
    theirs, ours, line, kwargs = _round_trip(teacher, student, steps, tmp_path / "out")
    assert "fresh noise drawn from generator" in line and kwargs["use_resolution_binning"] is False
    _assert_images_match(theirs, ours)
    ode = (sample_maker(student, teacher, StudentSteps(steps.sigmas, "ode"))([PROMPT], [7]) + 1) / 2
    assert (ode - ours).abs().max() > 4 / 255


def test_sd3_sde_export_says_its_noise_is_not_the_seeds(teachers, tmp_path):
    """StableDiffusion3Pipeline calls scheduler.step without its generator: the stochastic steps are the student's
    sampler, the noise is torch's global RNG's, and the line says the image is not fdistill sample's."""
    import json

    teacher = teachers("sd3")
    line = teacher.export(teacher.denoiser, tmp_path / "out", StudentSteps(_flow_levels(2), "sde"))
    assert "global RNG" in line and "not fdistill sample's image" in line
    config = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert config["stochastic_sampling"] is True and config["shift"] == 1.0 and not config["use_dynamic_shifting"]


def test_flow_steps_scheduler_leaves_the_given_sigmas_unshifted():
    """FLUX.1 and Qwen-Image pass mu; SD3's config shifts by 3: with the export's config the scheduler runs at the
    call's sigmas exactly, its Euler step the student's ode step."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fdistill.teachers import flow_matching as fm

    for base in (dict(shift=3.0), dict(shift=3.0, use_dynamic_shifting=True, shift_terminal=0.02)):
        config = fm.steps_scheduler_config(dict(FlowMatchEulerDiscreteScheduler(**base).config), "ode")
        sched = FlowMatchEulerDiscreteScheduler.from_config(config)
        sched.set_timesteps(sigmas=[0.999, 0.4], mu=0.8)
        torch.testing.assert_close(sched.sigmas, torch.tensor([0.999, 0.4, 0.0]))
        torch.testing.assert_close(sched.timesteps, torch.tensor([999.0, 400.0]))
        x_t, v = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
        x, x0 = x_t / (1 - 0.999), x_t - 0.999 * v  # EDM terms at sigma = t / (1 - t)
        s, s_next = 0.999 / 0.001, 0.4 / 0.6
        ode = x0 + s_next * (x - x0) / s
        torch.testing.assert_close(sched.step(v, sched.timesteps[0], x_t).prev_sample, ode * 0.6)
