"""The shared-base mode (``text.shared_base``): generator and fake score as two LoRA adapters on the teacher's
one frozen network compute what three separate networks holding the same weights compute (losses, gradients,
updates), with and without gradient checkpointing (recomputed with the adapter of the pass that ran), keep the base
untouched, hold one copy of it, resume exactly and reload as a plain student."""

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import flow_pipelines  # noqa: E402

from fdistill.apps import distill, images  # noqa: E402
from fdistill.networks.shared_base import AdapterView, lora_state_dict  # noqa: E402
from fdistill.teachers import flow_matching as fm  # noqa: E402
from fdistill.training.loop import training_loop  # noqa: E402

MSL = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    folders = {"sd3": flow_pipelines.sd3(root / "sd3"), "flux": flow_pipelines.flux(root / "flux")}
    data = {f: flow_pipelines.latent_shards(root / f"latents-{f}", fm.load_flow_pipeline(
        folders[f], 16, max_sequence_length=MSL)) for f in folders}
    return folders, data


def _cfg(data, family, *overrides):
    return images.load_config("digits", [
        f"data={data}", "disc_resolutions=[mid]", "disc_hidden=8", f"guidance={2.0 if family == 'sd3' else 1.0}",
        "distill.batch_size=4", "distill.tau=2", "distill.log_every=1", "distill.r1_form=approx",
        "distill.iterations=4", "distill.sigmas.schedule=flow", "distill.sigmas.index_range=[0, 999]",
        "distill.lr=1e-2", "distill.gan_weight=0.1", "text.prompts=null", "text.resolution=16",
        f"teacher_options.max_sequence_length={MSL}", "text.lora_rank=2", *overrides])


def _shared(folder, cfg):
    d = distill.make_distiller(cfg, folder)
    torch.manual_seed(1)
    with torch.no_grad():  # peft starts lora_B at zero: make both adapters matter
        for view in (d.generator, d.fake_score):
            for k, p in view.named_parameters():
                if "lora_B" in k:
                    p.normal_(std=0.1)
        d.generator_ema.load_state_dict(d.generator.state_dict())
    return d


def _as_separate(shared, folder, cfg):
    """Three separate networks (peft adapter "default" on each student) holding the shared run's weights."""
    cfg.text.shared_base = False
    d = distill.make_distiller(cfg, folder)
    for name in ("generator", "generator_ema", "fake_score"):
        missing, unexpected = getattr(d, name).load_state_dict(
            lora_state_dict(getattr(shared, name).state_dict()), strict=False)
        assert not unexpected and not any("lora" in k for k in missing)
    d.discriminator.load_state_dict(shared.discriminator.state_dict())
    return d


def _grads(net):
    return {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}


K_STEP = {"1": [],
          "3-backward": ["distill.student_steps=3", "distill.student_input=backward", "distill.student_sampler=sde"],
          "2-forward": ["distill.student_steps=2", "distill.student_input=forward", "distill.student_sampler=ode"]}


@pytest.mark.parametrize("family,student,checkpointing", [
    ("sd3", "1", False), ("flux", "1", False), ("sd3", "3-backward", False), ("flux", "2-forward", False),
    ("sd3", "1", True), ("flux", "2-forward", True)])
def test_shared_base_equals_three_separate_networks(setup, family, student, checkpointing):
    """Also for k-step students: the backward simulation runs the generator's adapter, without gradient. With
    gradient checkpointing (shared: every pass through the one network, the teacher's too; separate: the students)."""
    folders, data = setup
    cfg = _cfg(data[family], family, "text.shared_base=true", *K_STEP[student],
               f"text.gradient_checkpointing={str(checkpointing).lower()}")
    shared = _shared(folders[family], cfg)
    assert isinstance(shared.generator, AdapterView) and isinstance(shared.generator_ema, AdapterView)
    separate = _as_separate(shared, folders[family], cfg)
    for step in ("student", "critic", "student"):
        logs = [d.step() for d in (shared, separate)]
        assert [lg["kind"] for lg in logs] == [step, step]
        for k, v in logs[0].items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(v, logs[1][k], rtol=1e-5, atol=1e-6, msg=f"{step} {k}")
        for name in ("generator", "fake_score"):
            got = lora_state_dict({k: g for k, g in _grads(getattr(shared, name)).items()})
            want = _grads(getattr(separate, name))
            assert got.keys() == want.keys() and (got or name != step.replace("critic", "fake_score")
                                                  .replace("student", "generator"))
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-7, msg=f"{step} {name} {k}")
    for name in ("generator", "generator_ema", "fake_score"):
        got, want = lora_state_dict(getattr(shared, name).state_dict()), getattr(separate, name).state_dict()
        for k, v in got.items():
            torch.testing.assert_close(v, want[k], rtol=1e-4, atol=1e-6, msg=f"{name} {k}")


def test_one_frozen_base_untouched_and_only_adapters_trained(setup, tmp_path):
    folders, data = setup
    cfg = _cfg(data["sd3"], "sd3", "text.shared_base=true")
    d = _shared(folders["sd3"], cfg)
    base = d.teacher.net.shared.denoiser
    before = {k: v.clone() for k, v in base.state_dict().items() if "lora" not in k}
    trained = {id(p) for p in d.opt_g.param_groups[0]["params"]} | \
        {id(p) for p in d.opt_fake.param_groups[0]["params"]}
    assert all(".lora_" in k for k, p in base.named_parameters() if id(p) in trained)
    assert list(d.teacher.parameters()) == []  # the teacher's view owns nothing: the base is not copied
    gen_start = {k: v.clone() for k, v in d.generator.state_dict().items()}
    history = training_loop(d, run_dir=tmp_path / "run", progress=False)
    assert all(np.isfinite(v) for h in history for v in h.values() if isinstance(v, float))
    for k, v in base.state_dict().items():
        if "lora" not in k:
            assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, gen_start[k]) for k, v in d.generator.state_dict().items())
    assert all(p.requires_grad for p in d.generator.parameters()) and \
        not any(p.requires_grad for p in d.generator_ema.parameters())  # peft's switching reset them: restored
    from safetensors.torch import load_file

    ckpt = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    assert all("lora" in k or k.split(".")[0] in ("discriminator", "ratio_norm")  # no base weights
               for k in load_file(ckpt / "model.safetensors"))
    net, student, teacher = distill.load_generator(tmp_path / "run")  # a plain network, adapters fused
    sigma_gen = student.sigmas[0]
    assert not any("lora" in k for k in net.state_dict())
    x, s = torch.randn(2, *teacher.sample_shape), torch.full((2,), sigma_gen)
    cond = teacher.condition(["a red square", "a blue circle"])
    with torch.no_grad():
        torch.testing.assert_close(net(x, s, cond), d.generator_ema(x, s, cond), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("student", ["1", "3-backward"])
def test_shared_base_resume_is_exact(setup, tmp_path, student):
    folders, data = setup
    cfg = _cfg(data["sd3"], "sd3", "text.shared_base=true", *K_STEP[student])
    full = distill.make_distiller(cfg, folders["sd3"])
    training_loop(full, progress=False)
    cfg.distill.iterations = 2
    first = distill.make_distiller(cfg, folders["sd3"])
    training_loop(first, run_dir=tmp_path, progress=False)
    cfg.distill.iterations = 4
    resumed = distill.make_distiller(cfg, folders["sd3"])
    resumed.load(tmp_path)
    training_loop(resumed, progress=False)
    for name in ("generator", "generator_ema", "fake_score"):
        for k, v in getattr(full, name).state_dict().items():
            assert torch.equal(v, getattr(resumed, name).state_dict()[k]), (name, k)


def test_bad_shared_base_settings_are_one_line_errors(setup):
    folders, data = setup
    for overrides, message in ((["text.lora_rank=0"], "needs text.lora_rank > 0"),
                               (["distill.compile=true"], "cannot be combined with distill.compile")):
        with pytest.raises(ValueError, match=message) as e:
            distill.make_distiller(_cfg(data["sd3"], "sd3", "text.shared_base=true", *overrides), folders["sd3"])
        assert "\n" not in str(e.value)


def _kernels_only(module, *args):
    """A checkpoint function that keeps the attention kernels of the forward but not its adapter: what the shared
    base's own (``SharedBase.checkpoint``) adds is the adapter."""
    from fdistill.networks import shared_base

    backends = shared_base._sdpa_backends()

    def run(*a):
        with shared_base._sdpa_kernels(backends):
            return module(*a)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_checkpointed_shared_base_recomputes_with_the_adapter_that_ran(setup, family):
    """Gradient checkpointing on the shared base: a student and a critic step give the gradients of the run without
    checkpointing, the teacher's GAN-term pass (adapters off, math attention kernel) and exact R1 included. A
    checkpoint that recomputes with whichever adapter is active at backward (the fake score's, after its no-grad
    pass) fails: its recomputation saves other tensors, or gives other gradients."""
    folders, data = setup
    runs = {}
    for name, ckpt in (("plain", "false"), ("checkpointed", "true"), ("kernels only", "true")):
        cfg = _cfg(data[family], family, "text.shared_base=true", "distill.r1_form=exact",
                   f"text.gradient_checkpointing={ckpt}")
        runs[name] = d = _shared(folders[family], cfg)
        if name == "kernels only":
            d.generator.shared.backbone.enable_gradient_checkpointing(_kernels_only)
        assert d.generator.shared.backbone.gradient_checkpointing == (ckpt == "true")
    for d in list(runs.values())[1:]:  # the same adapter weights, head and random streams
        for role in ("generator", "fake_score", "discriminator"):
            getattr(d, role).load_state_dict(getattr(runs["plain"], role).state_dict())
    for step in ("student", "critic"):
        logs = {name: runs[name].step() for name in ("plain", "checkpointed")}
        assert logs["plain"]["kind"] == step
        for role in ("generator", "discriminator") if step == "student" else ("fake_score", "discriminator"):
            got, want = _grads(getattr(runs["checkpointed"], role)), _grads(getattr(runs["plain"], role))
            assert got.keys() == want.keys() and (got or role == "discriminator")
            for k in got:
                torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-7, msg=f"{step} {role} {k}")
        for k, v in logs["plain"].items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(logs["checkpointed"][k], v, rtol=1e-5, atol=1e-6, msg=f"{step} {k}")
    with pytest.raises(torch.utils.checkpoint.CheckpointError):  # the teacher's units, with the fake score's adapter
        runs["kernels only"].step()
    # Without the GAN term the generator's units are recomputed with the fake score's adapter: same shapes, silently
    # other gradients.
    plain, wrong = (_shared(folders[family], _cfg(data[family], family, "text.shared_base=true",
                                                  "distill.gan_weight=0", f"text.gradient_checkpointing={c}"))
                    for c in ("false", "true"))
    wrong.generator.shared.backbone.enable_gradient_checkpointing(_kernels_only)
    for role in ("generator", "fake_score", "discriminator"):
        getattr(wrong, role).load_state_dict(getattr(plain, role).state_dict())
    plain.step(), wrong.step()
    got, want = _grads(wrong.generator), _grads(plain.generator)
    assert any(not torch.allclose(got[k], want[k], rtol=1e-3, atol=1e-6) for k in want)
