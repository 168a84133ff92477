"""The memory model (``fdistill.memory``) against what a small real network does on the CPU: the bytes it counts on
the meta device equal what autograd saves in the real forward, and its predicted peak of a forward + backward
brackets the peak the profiler measures; and ``distill``'s refusal of a run predicted not to fit a (faked) GPU."""

import dataclasses
import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from fdistill import memory  # noqa: E402
from fdistill.data.conditions import TextCondition  # noqa: E402

# A FLUX.1-like transformer: 2 double- and 2 single-stream blocks, 64 wide, on 32 x 32 latents (256 image tokens)
# with 16 text tokens; LoRA rank 4 on the attention projections as in shared-base mode.
CONFIG = dict(patch_size=1, in_channels=16, out_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
              num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
              axes_dims_rope=[4, 6, 6])
PIXELS, TOKENS, BATCH, RANK = 256, 16, 2, 4
PEAK_TOLERANCE = 0.15  # predicted / measured peak within [1 - 0.15, 1 + 0.15]


@pytest.fixture(scope="module")
def case():
    """(the memory model's profile on the meta device, the same network on the CPU as a shared base)."""
    from diffusers import FluxTransformer2DModel

    from fdistill.networks.shared_base import SharedBase
    from fdistill.teachers.families.flux import FluxDenoiser, FluxTeacher
    from fdistill.teachers.pipeline_folders import add_lora

    subject = memory.meta_subject("flux", dict(CONFIG), PIXELS, tokens=TOKENS)
    run = memory.Run(micro_batch=BATCH, precision="fp32", lora_rank=RANK, shared_base=True, disc_head="fdistill",
                     r1="exact")  # the teacher's GAN pass on fused attention, and its R1 pass on the math kernel
    profile = memory.profile(subject, run)
    torch.manual_seed(0)
    denoiser = FluxDenoiser(FluxTransformer2DModel(**CONFIG), PIXELS // 8, 4, 64, None, None, 1.0, guidance=3.5)
    denoiser.feature_resolutions = subject.denoiser.feature_resolutions
    shared = SharedBase(denoiser, "transformer", lambda net, r, name: add_lora(net.transformer, r,
                                                                                FluxTeacher.lora_targets, name), RANK)
    return profile, shared, shared.add("generator").train(), shared.teacher()


def _inputs(grad: bool):
    x = torch.randn(BATCH, 4, PIXELS // 8, PIXELS // 8).requires_grad_(grad)
    return x, torch.full((BATCH,), 1.0), TextCondition(torch.randn(BATCH, TOKENS, 32), torch.randn(BATCH, 32))


def _passes(generator, teacher):
    """{pass: forward} as the distiller runs them: the generator with grad to its adapter, the teacher with grad to
    its input for the GAN term (fused attention) and for exact R1 (inside ``double_backward``: the math kernel)."""
    from fdistill.networks.attention import double_backward

    def student():
        x, s, c = _inputs(False)
        return generator(x, s, c)

    def gan():
        x, s, c = _inputs(True)
        return teacher(x, s, c, return_features=True)[1]

    def r1():
        with double_backward():
            return gan()
    return {"student": student, "teacher_fused": gan, "teacher_math": r1}


def saved_bytes(forward, params, held=()) -> int:
    """The distinct storages ``forward`` saves for backward (and those of ``held``, filled as it runs), parameters
    excluded."""
    keys = {p.untyped_storage()._cdata for p in params}
    sizes, keep = {}, []

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in keys:
            sizes.setdefault(key, t.untyped_storage().nbytes())
            keep.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    for t in held:
        pack(t)
    return sum(sizes.values())


def _measured_peak(fn, tmp_path) -> int:
    """The most bytes the CPU allocator held during ``fn`` beyond what was allocated before (the profiler's
    memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")


def test_meta_count_equals_what_autograd_saves_on_cpu(case):
    """The fused-attention stand-in and the meta device's ops save what the CPU's kernels save (fp32: flash
    attention saves q, k, v, output and log-sum-exp; the math kernel its L x L probabilities)."""
    profile, shared, generator, teacher = case
    shared.backbone.disable_gradient_checkpointing()
    for name, forward in _passes(generator, teacher).items():
        got = saved_bytes(forward, shared.denoiser.parameters())
        assert got == pytest.approx(profile.passes[name, "total"].at(BATCH), rel=1e-6), name


@pytest.mark.parametrize("function", ["SharedBase.checkpoint", "attention.checkpoint"])
def test_meta_count_with_checkpointing_equals_what_autograd_keeps_on_cpu(case, function):
    """With checkpointing a forward keeps what is saved outside the checkpointed units and the units' inputs (the
    count's ``kept``), the teacher's passes included: checkpointed on the shared base (``SharedBase.checkpoint``) or as
    a separate network (``networks.attention.checkpoint``, what ``prepare_students`` gives the teacher). So the
    activation peaks of the two modes are the same; only their states differ."""
    from fdistill.networks import attention

    profile, shared, generator, teacher = case
    function = shared.checkpoint if function == "SharedBase.checkpoint" else attention.checkpoint
    held = []  # tensors a unit's checkpoint holds as plain objects (inside tuples, kwargs), not by saving them

    def holding(module, *args, **kwargs):
        held.extend(t for a in (*args, kwargs) if not isinstance(a, torch.Tensor) for t in memory._tensors(a))
        return function(module, *args, **kwargs)

    shared.backbone.enable_gradient_checkpointing(holding)
    for name, forward in _passes(generator, teacher).items():
        held.clear()
        got = saved_bytes(forward, shared.denoiser.parameters(), held)
        assert got == pytest.approx(profile.passes[name, "kept"].at(BATCH), rel=1e-6), name
    run = memory.Run(micro_batch=BATCH, precision="fp32", lora_rank=RANK, disc_head="fdistill", r1="exact",
                     checkpointing=True)
    one, separate = (memory.estimate(profile, dataclasses.replace(run, shared_base=s)) for s in (True, False))
    assert (one.student, one.critic) == (separate.student, separate.critic)
    assert separate.student < memory.estimate(profile, dataclasses.replace(run, checkpointing=False)).student


@pytest.mark.parametrize("checkpointing", [False, True])
def test_predicted_peak_brackets_the_profiler_on_cpu(case, tmp_path, checkpointing):
    profile, shared, generator, teacher = case
    if checkpointing:
        shared.backbone.enable_gradient_checkpointing(shared.checkpoint)
    else:
        shared.backbone.disable_gradient_checkpointing()
    for name, forward in _passes(generator, teacher).items():
        def step():
            out = forward()
            out = out if isinstance(out, torch.Tensor) else torch.cat([f.flatten() for f in out.values()])
            out.square().mean().backward()
        shared.denoiser.zero_grad(set_to_none=True)
        measured = _measured_peak(step, tmp_path)
        predicted = memory.pass_peak(profile, name, BATCH, checkpointing)
        print(f"{name} checkpointing={checkpointing}: measured {measured}, predicted {predicted:.0f}, "
              f"ratio {predicted / measured:.3f}")
        assert abs(predicted / measured - 1) <= PEAK_TOLERANCE, (name, measured, predicted)


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    import flow_pipelines

    return flow_pipelines.flux(tmp_path_factory.mktemp("memory") / "flux")


def _config(*overrides):
    from fdistill.apps import images

    return images.load_config("digits", [
        "data=unused", "disc_resolutions=[mid]", "disc_hidden=8", "guidance=1.0", "distill.batch_size=8",
        "distill.sigmas.schedule=flow", "distill.sigmas.index_range=[0, 999]", "text.prompts=null",
        "text.resolution=16", "teacher_options.max_sequence_length=8", "text.lora_rank=2", "text.shared_base=true",
        *overrides])


def _fake_gpu(monkeypatch, total: float) -> None:
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=int(total)))


def test_distill_refuses_a_run_that_does_not_fit_the_gpu_before_loading(flux_folder, monkeypatch):
    """On a (faked) GPU between what micro_batch 1 and the whole batch need: refused in one line naming a
    micro_batch that fits, before the teacher is opened; distill.memory_check=false skips the check."""
    from fdistill.apps import distill

    cfg = _config()
    subject = memory.folder_subject(flux_folder, 16, {"max_sequence_length": 8})
    run = memory.Run.of_config(cfg)
    prof = memory.profile(subject, run)
    whole, one = (memory.estimate(prof, memory.Run.of_config(_config(f"distill.micro_batch={m}"))).total
                  for m in (8, 1))
    assert whole > one
    _fake_gpu(monkeypatch, (whole + one) / 2 / memory.HEADROOM)

    def opened(*args, **kwargs):
        raise AssertionError("the teacher was opened")

    monkeypatch.setattr(distill, "open_teacher", opened)
    with pytest.raises(ValueError, match=r"would fit: distill\.micro_batch=[124] ") as e:
        distill.make_distiller(cfg, flux_folder, device="cuda")
    assert "\n" not in str(e.value) and "distill.memory_check=false" in str(e.value)
    assert memory.check_distill(_config("distill.micro_batch=1"), flux_folder, torch.device("cuda")).total == \
        pytest.approx(one)
    with pytest.raises(AssertionError, match="the teacher was opened"):  # past the check
        distill.make_distiller(_config("distill.memory_check=false"), flux_folder, device="cuda")
    _fake_gpu(monkeypatch, 1000)  # nothing fits: the states alone are larger
    with pytest.raises(ValueError, match="nothing fits this GPU by micro_batch and checkpointing"):
        memory.check_distill(cfg, flux_folder, torch.device("cuda"))
    assert memory.check_distill(cfg, flux_folder, torch.device("cpu")) is None  # CPU: not checked


def test_a_folder_is_sized_as_it_loads(flux_folder):
    """The meta network has the loaded one's parameters, the frozen text encoders and VAE its bytes (read from the
    safetensors headers)."""
    from fdistill.teachers.open import open_teacher

    subject = memory.folder_subject(flux_folder, 16, {"max_sequence_length": 8})
    teacher = open_teacher(flux_folder, 16, {"max_sequence_length": 8})
    assert subject.parameters() == sum(p.numel() for p in teacher.denoiser.parameters())
    assert subject.frozen_bytes == sum(p.numel() * p.element_size() for m in (teacher.text, teacher.codec)
                                       for p in m.parameters())
    assert subject.sample_shape == teacher.sample_shape
    assert memory.folder_subject(flux_folder.parent, 16) is None  # not a pipeline folder: not modelled


def test_the_model_follows_the_settings(flux_folder):
    """Checkpointing, shared base and micro_batch move the prediction the way they move memory."""
    subject = memory.folder_subject(flux_folder, 16, {"max_sequence_length": 8})
    prof = memory.profile(subject, memory.Run.of_config(_config()))

    def total(*overrides):
        return memory.estimate(prof, memory.Run.of_config(_config(*overrides))).total

    assert total("text.gradient_checkpointing=true") < total()
    assert total("distill.micro_batch=1") < total("distill.micro_batch=2") < total()
    assert total("text.shared_base=false") > total()  # three copies of the base instead of one


def test_a_run_from_latent_shards_releases_the_text_encoders(flux_folder, tmp_path):
    """The shards hold every prompt's embeddings: distill drops the text encoders (the null condition was encoded at
    loading), trains as before, and the memory model leaves them out; encoding a prompt is refused in one line."""
    import flow_pipelines

    from fdistill.apps import distill
    from fdistill.teachers import flow_matching as fm
    from fdistill.teachers.latent_t2i import ReleasedText
    from fdistill.training.loop import training_loop

    pipe = fm.load_flow_pipeline(flux_folder, 16, max_sequence_length=8)
    shards = flow_pipelines.latent_shards(tmp_path / "latents", pipe)
    text_bytes = sum(p.numel() * p.element_size() for p in pipe.text.parameters())
    cfg = _config(f"data={shards}", "distill.iterations=2", "distill.batch_size=4", "distill.tau=2")
    d = distill.make_distiller(cfg, flux_folder)
    teacher = d.real_data.pipe
    assert isinstance(teacher.text, ReleasedText) and list(teacher.text.parameters()) == []
    assert teacher.text.released == sum(p.numel() for p in pipe.text.parameters()) > 0
    training_loop(d, progress=False)
    with pytest.raises(ValueError, match="its text encoders were released") as e:
        teacher.text(["a red square"])
    assert "\n" not in str(e.value)
    with_text, without = (memory.folder_subject(flux_folder, 16, {"max_sequence_length": 8}, text_encoders=t)
                          for t in (True, False))
    assert with_text.frozen_bytes - without.frozen_bytes == text_bytes
