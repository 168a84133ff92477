"""Stable Diffusion v1.5 / SDXL teachers: loading real folder layouts offline (tiny random pipelines written
by diffusers' save_pretrained), the latent denoiser against diffusers' own schedulers, CFG, features."""

import json
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import t2i_pipelines  # noqa: E402

from fdistill.core.diffusion import vp_sigmas  # noqa: E402
from fdistill.data.conditions import TextCondition  # noqa: E402
from fdistill.teachers.families.stable_diffusion import load_stable_diffusion  # noqa: E402
from fdistill.teachers.guidance import GuidedDenoiser  # noqa: E402
from fdistill.teachers.open import family_of  # noqa: E402

PROMPTS = ["a handwritten seven", "a photo of a cat on a bike"]


@pytest.fixture(scope="session")
def sd15_folder(tmp_path_factory):
    return t2i_pipelines.sd15(tmp_path_factory.mktemp("sd15") / "pipe")


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory):
    return t2i_pipelines.sdxl(tmp_path_factory.mktemp("sdxl") / "pipe")


@pytest.fixture(scope="session", params=["sd15", "sdxl"])
def folder(request, sd15_folder, sdxl_folder):
    return {"sd15": sd15_folder, "sdxl": sdxl_folder}[request.param]


def test_folders_load_offline_with_each_familys_conditioning(folder):
    assert family_of(folder).kind in ("sd15", "sdxl")
    sd = load_stable_diffusion(folder)
    cond = sd.text(PROMPTS)
    if sd.denoiser.family == "sd15":
        assert cond.embeds.shape == (2, 77, 16) and cond.pooled is None
    else:  # both encoders' penultimate states (16 + 16), the pooled projection, the size/crop ids
        assert cond.embeds.shape == (2, 77, 32) and cond.pooled.shape == (2, 16)
        assert cond.time_ids.tolist() == [[16, 16, 0, 0, 16, 16]] * 2
    assert sd.latent_shape == (4, 8, 8) and sd.kwargs["resolution"] == 16
    assert sd.denoiser.sigma_max == pytest.approx(float(vp_sigmas()[-1]), rel=1e-6)


def _pipeline(folder):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder, local_files_only=True)


@pytest.mark.parametrize("t", [0, 1, 250, 500, 999])
def test_denoiser_is_the_schedulers_x0_prediction(folder, t):
    """D(x, sigma_t) with x = x_t sqrt(1 + sigma_t^2) equals DDPMScheduler's pred_original_sample of the UNet."""
    from diffusers import DDPMScheduler

    sd = load_stable_diffusion(folder)
    pipe = _pipeline(folder)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    cond = sd.text(PROMPTS)
    torch.manual_seed(t)
    x_t = torch.randn(2, *sd.latent_shape)
    tt = torch.tensor([t, t])
    with torch.no_grad():
        added = None if cond.pooled is None else {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        eps = pipe.unet(x_t, tt, encoder_hidden_states=cond.embeds, added_cond_kwargs=added).sample
        ref = sched.step(eps[:1], t, x_t[:1]).pred_original_sample
        sigma = torch.tensor(float(vp_sigmas()[t]), dtype=torch.float64).expand(2)
        d = sd.denoiser(x_t * (1 + sigma.float()[:, None, None, None] ** 2).sqrt(), sigma, cond)
    torch.testing.assert_close(d[:1], ref, rtol=1e-4, atol=1e-4 * (1 + float(sigma[0])))


def test_cfg_in_x0_space_equals_cfg_in_eps_space(folder):
    sd = load_stable_diffusion(folder)
    cond = sd.text(PROMPTS)
    null = sd.denoiser.null_condition(cond)
    if sd.denoiser.family == "sd15":  # the encoded empty prompt
        torch.testing.assert_close(null.embeds, sd.text(["", ""]).embeds)
    else:  # SDXL: zeros, as its pipeline's force_zeros_for_empty_prompt
        assert null.embeds.abs().sum() == 0 and null.pooled.abs().sum() == 0
        assert torch.equal(null.time_ids, cond.time_ids)
    x, s, w = torch.randn(2, *sd.latent_shape), torch.tensor([0.7, 3.0]), 4.5
    with torch.no_grad():
        guided = GuidedDenoiser(sd.denoiser, w)(x, s, cond)
        t = sd.denoiser.timestep(s)
        x_t = x / (1 + s[:, None, None, None] ** 2).sqrt()
        eps_c, eps_u = sd.denoiser._call(x_t, t, cond), sd.denoiser._call(x_t, t, null)
        by_eps = x - s[:, None, None, None] * (eps_u + w * (eps_c - eps_u))
    torch.testing.assert_close(guided, by_eps, rtol=1e-5, atol=1e-5)


def test_hooked_features_equal_the_full_forwards_and_features_stop_at_the_mid_block(folder, monkeypatch):
    sd = load_stable_diffusion(folder)
    net = sd.denoiser
    assert net.feature_channels() == {8: 8, 4: 16}  # 4 x 4: the mid block
    cond, x, s = sd.text(PROMPTS), torch.randn(2, *sd.latent_shape), torch.tensor([1.0, 2.0])
    seen = {}
    hook = net.unet.mid_block.register_forward_hook(lambda m, a, o: seen.__setitem__("mid", o))
    with torch.no_grad():
        d, feats = net(x, s, cond, return_features=True)
        assert torch.equal(d, net(x, s, cond))
    hook.remove()
    torch.testing.assert_close(feats[4], seen["mid"])
    for block in net.unet.up_blocks:  # the critic step's features never run the decoder
        monkeypatch.setattr(block, "forward", lambda *a, **k: pytest.fail("the up path ran"))
    only = net.features(x, s, cond)
    assert only.keys() == {8, 4} and all(torch.equal(only[r], feats[r]) for r in only)


def test_text_condition_slices_and_moves_like_a_tensor(sdxl_folder):
    cond = load_stable_diffusion(sdxl_folder).text(PROMPTS)
    part = cond[1:]
    assert len(part) == 1 and torch.equal(part.pooled, cond.pooled[1:])
    assert torch.equal(part.time_ids, cond.time_ids[1:])
    assert torch.equal(TextCondition.cat([cond[:1], part]).embeds, cond.embeds)
    assert cond.to(torch.float64).embeds.dtype == torch.float64


def test_bad_folders_name_the_missing_file(sd15_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="Stable Diffusion folder not found"):
        load_stable_diffusion(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(sd15_folder, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(FileNotFoundError, match=r"lacks text_encoder/config.json; expected a diffusers"):
        load_stable_diffusion(broken)
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="holds a KandinskyPipeline"):
        load_stable_diffusion(broken)


def test_export_refuses_a_student_level_off_the_timestep_grid(sd15_folder, tmp_path):
    """A pipeline feeds its UNet integer timesteps: a student trained at a sigma between two of them is refused in one
    line naming the nearest, not written as a pipeline that would sample it at another noise level (a level on the
    grid below the top, t = 500 at 1.61828, exports: tests/test_few_step_export.py)."""
    from fdistill.teachers.open import open_teacher

    teacher = open_teacher(sd15_folder)
    with pytest.raises(ValueError, match=r"generator_sigma .* nearest is t = 491 ") as e:
        teacher.export(teacher.denoiser, tmp_path / "out", 1.57)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
