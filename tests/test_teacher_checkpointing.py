"""Gradient checkpointing of the frozen teacher with separate networks (``text.gradient_checkpointing``,
``LatentTextToImageTeacher.prepare_students``) on tiny SD3, Wan2.1 and Stable Diffusion v1.5 folders: a student
step with the GAN term and a critic step with exact R1 give the gradients of the run without checkpointing, the
teacher's units recomputed on the attention kernels of their forward (``networks.attention.checkpoint``), and the
teacher's passes without grad never reach the checkpoint function."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import flow_pipelines  # noqa: E402
import t2i_pipelines  # noqa: E402
import wan_pipelines  # noqa: E402

from fdistill.apps import distill, images  # noqa: E402
from fdistill.networks import attention  # noqa: E402
from fdistill.teachers import flow_matching as fm  # noqa: E402

FAMILIES = ("sd3", "wan", "sd15")
# Same networks, weights and random streams: only float rounding may differ (bitwise equal on the CPU it was written
# on, one thread).
RTOL, ATOL = 1e-5, 1e-8
COMMON = ["disc_hidden=8", "distill.batch_size=2", "distill.micro_batch=null", "distill.tau=2", "distill.log_every=1",
          "distill.precision=fp32", "distill.r1_gamma=1.0", "distill.r1_form=exact", "distill.gan_weight=0.1",
          "text.lora_rank=0", "text.shared_base=false", "text.prompts=null"]
WAN_SIZE = {"num_frames": wan_pipelines.FRAMES, "height": wan_pipelines.HEIGHT, "width": wan_pipelines.WIDTH,
            "max_sequence_length": 8}


def _video_shards(folder, teacher, n=2):
    from fdistill.data.latent_shards import LatentShardWriter

    captions = [f"a clip number {i}" for i in range(n)]
    with LatentShardWriter(folder, shard_size=2) as w:
        w.add_batch([f"v{i}" for i in range(n)], torch.randn(n, *teacher.sample_shape,
                                                             generator=torch.Generator().manual_seed(0)),
                    teacher.text(captions).tensors(), captions)
    return folder


def _captioned(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(["a red square", "a blue circle"]):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return folder


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(the family's name, its teacher folder, the config for it, given whether to checkpoint)."""
    from fdistill.teachers.open import open_teacher

    name, root = request.param, tmp_path_factory.mktemp(request.param)
    if name == "sd3":
        folder = flow_pipelines.sd3(root / "sd3")
        data = flow_pipelines.latent_shards(root / "latents", fm.load_flow_pipeline(folder, 16, max_sequence_length=8),
                                            n=2)
        preset, run = "digits", ["disc_resolutions=[mid]", "guidance=2.0", "distill.sigmas.schedule=flow",
                                 "distill.sigmas.index_range=[0, 999]", "text.resolution=16",
                                 "teacher_options.max_sequence_length=8"]
    elif name == "wan":
        folder = wan_pipelines.wan21(root / "wan")
        data = _video_shards(root / "latents", open_teacher(folder, None, WAN_SIZE))
        preset, run = "wan", [f"teacher_options.{k}={v}" for k, v in WAN_SIZE.items()]
    else:
        folder, data = t2i_pipelines.sd15(root / "sd15"), _captioned(root / "captioned")
        preset, run = "digits", ["disc_resolutions=[4]", "guidance=1.75", "distill.sigmas.schedule=scaled_linear",
                                 "distill.sigmas.index_range=[1, 999]"]

    def config(checkpointing: bool):
        return images.load_config(preset, [f"data={data}", *COMMON, *run,
                                           f"text.gradient_checkpointing={str(checkpointing).lower()}"])
    return name, folder, config


def _backbone(denoiser):
    return getattr(denoiser, "unet", None) or denoiser.transformer


def _functions(denoiser) -> set:
    """The checkpoint functions of the network's checkpointed units (empty: not checkpointed)."""
    return {m._gradient_checkpointing_func for m in _backbone(denoiser).modules()
            if getattr(m, "gradient_checkpointing", False)}


def _count_calls(denoiser) -> list[int]:
    """Count the calls of the network's checkpoint function (diffusers calls it once per checkpointed unit)."""
    calls = [0]
    for m in _backbone(denoiser).modules():
        if getattr(m, "gradient_checkpointing", False):
            def counted(*args, _func=m._gradient_checkpointing_func, **kwargs):
                calls[0] += 1
                return _func(*args, **kwargs)
            m._gradient_checkpointing_func = counted
    return calls


def _grads(net):
    return {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def runs(family):
    """{checkpointing: distiller} holding the same weights."""
    _, folder, config = family
    runs = {ck: distill.make_distiller(config(ck), folder) for ck in (False, True)}
    for role in ("generator", "fake_score", "discriminator"):
        getattr(runs[True], role).load_state_dict(getattr(runs[False], role).state_dict())
    return runs


def test_checkpointed_teacher_gives_the_same_gradients(family, runs):
    """A student step with the GAN term and a critic step with exact R1: the generator's, fake score's and head's
    gradients and the logs with the teacher (and students) checkpointed equal those without, to float rounding."""
    for ck, d in runs.items():
        for net in (d.teacher.net, d.generator, d.fake_score):
            assert _functions(net) == ({attention.checkpoint} if ck else set()), (family[0], ck)
    calls = _count_calls(runs[True].teacher.net)
    for step, roles in (("student", ("generator",)), ("critic", ("fake_score", "discriminator"))):
        before = calls[0]
        logs = {}
        for ck, d in runs.items():
            torch.manual_seed(0)  # the VAE samples its posterior (SD1.5's captioned images) from the global stream
            logs[ck] = d.step()
        assert logs[True]["kind"] == step and calls[0] > before  # the teacher's pass with grad was checkpointed
        for role in roles:
            got, want = (_grads(getattr(runs[ck], role)) for ck in (True, False))
            assert got.keys() == want.keys() and got, (step, role)
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=ATOL,
                                           msg=lambda m, w=f"{step} {role} {k}": f"{w}: {m}")
        assert "r1" in logs[True] or step == "student"
        for k, v in logs[False].items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(logs[True][k], v, rtol=RTOL, atol=ATOL,
                                           msg=lambda m, w=f"{step} {k}": f"{w}: {m}")


def test_teacher_passes_without_grad_are_not_checkpointed(family, runs):
    """The guided teacher's pass and its features without grad, and a critic step whose teacher passes all run
    without grad (approximate R1), never call the checkpoint function; one pass with grad to the input does."""
    d = runs[True]
    calls = _count_calls(d.teacher.net)
    x = torch.randn(2, *d.sample_shape)
    s, c = d._sigma(), d.sample_cond(2, slice(None))
    with torch.no_grad():
        d.teacher(x, s, c, return_features=True)
        d.teacher.features(x, s, c)
    assert calls[0] == 0
    d.cfg = dataclasses.replace(d.cfg, r1_form="approx")
    d.iteration = 1
    assert d.step()["kind"] == "critic" and calls[0] == 0
    d.teacher.features(x.requires_grad_(True), s, c)
    assert calls[0] > 0


@pytest.mark.parametrize("family", ["sd3"], indirect=True)
def test_recomputation_needs_the_kernels_of_the_forward(family):
    """diffusers' own checkpoint function recomputes exact R1's units on the fused attention kernel (the
    recomputation runs in backward, outside ``double_backward()``), which saves other tensors than the math kernel
    did: the critic step fails, where ``networks.attention.checkpoint`` passes (above)."""
    _, folder, config = family
    d = distill.make_distiller(config(True), folder)
    _backbone(d.teacher.net).enable_gradient_checkpointing()
    d.iteration = 1
    with pytest.raises(torch.utils.checkpoint.CheckpointError, match="different metadata"):
        d.step()


@pytest.mark.parametrize("family", ["sd3"], indirect=True)
@pytest.mark.parametrize("features", ["fake_score", "dmd2"])
def test_fake_score_features_with_checkpointing(family, features):
    """The head on the fake score's features (``distill.disc_features``): a student step and a critic step with
    exact R1 (a double backward through the checkpointed fake score) give the gradients of the run without
    checkpointing."""
    _, folder, config = family
    runs = {}
    for ck in (False, True):
        cfg = config(ck)
        cfg.distill = dataclasses.replace(cfg.distill, disc_features=features)
        runs[ck] = distill.make_distiller(cfg, folder)
    for role in ("generator", "fake_score", "discriminator"):
        getattr(runs[True], role).load_state_dict(getattr(runs[False], role).state_dict())
    for roles in (("generator",), ("fake_score", "discriminator")):
        for d in runs.values():
            torch.manual_seed(0)
            d.step()
        for role in roles:
            got, want = (_grads(getattr(runs[ck], role)) for ck in (True, False))
            assert got.keys() == want.keys() and got
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=ATOL)
