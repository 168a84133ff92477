"""Wan2.2-A14B distilled one student per expert (``teacher_options.expert``, ``teachers/families/wan.py``), on a tiny
two-expert WanPipeline (tests/wan_pipelines.py) and random latent shards: a high- and a low-noise expert's student
distilled two iterations each through the CLI, every noise level any network saw in a run inside its expert's range,
the default level split, the low student's first input (real latents noised to its first level), bad configs refused
in one line, and the pair exported as one WanPipeline whose 3-step call runs transformer (the high student) at the
first two steps and transformer_2 (the low student) at the third, giving fdistill's own two-stage sample."""

import contextlib
import io
import json
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import wan_pipelines as wp  # noqa: E402

from fdistill.apps import cli, distill, images  # noqa: E402
from fdistill.teachers.families import wan  # noqa: E402
from fdistill.teachers.open import open_teacher  # noqa: E402

L = 16  # text tokens
SIZE = {"num_frames": wp.FRAMES, "height": wp.HEIGHT, "width": wp.WIDTH, "max_sequence_length": L}
OPTIONS = [f"teacher_options.{k}={v}" for k, v in SIZE.items()]
TINY = ["distill.batch_size=2", "distill.micro_batch=null", "distill.precision=fp32", "disc_hidden=8",
        "text.gradient_checkpointing=false", "distill.log_every=1"]
B = wp.BOUNDARY
PROMPT = "a red cat"
# The exported pipeline's video against fdistill's two-stage sample for the same seed, frames in [0, 1]: float32
# rounding of the same computation in another order (the 2-step export test of test_wan_cli.py uses the same).
TOL = 1e-4


def t_of(sigma) -> float:
    return float(sigma) / (1 + float(sigma))


def karras_middle(t1: float, t3: float, rho: float = 7.0) -> float:
    """The middle of 3 Karras levels from t1 to t3 (FlowMatchEulerDiscreteScheduler's conversion)."""
    return ((t1 ** (1 / rho) + t3 ** (1 / rho)) / 2) ** rho


def cli_run(args: list[str]) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = cli.main(args)
    return rc, stdout.getvalue(), stderr.getvalue()


def one_line_error(args: list[str], *expected: str) -> str:
    rc, _, err = cli_run(args)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("experts")


@pytest.fixture(scope="module")
def folder(root):
    return wp.wan22_a14b(root / "a14b")


@pytest.fixture(scope="module")
def shards(folder, root):
    return wp.latent_shards(root / "latents", open_teacher(folder, None, SIZE))


def _distill(folder, shards, out, expert: str, *extra: str) -> list[torch.Tensor]:
    """``fdistill distill --config wan`` of one expert's student, two iterations; returns the noise levels every
    WanDenoiser (teacher, generator, fake score) was called at."""
    seen, forward = [], wan.WanDenoiser.forward

    def recorded(self, x, sigma, cond=None, return_features=False):
        seen.append(torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).clone())
        return forward(self, x, sigma, cond, return_features)

    wan.WanDenoiser.forward = recorded
    try:
        rc, _, err = cli_run(["distill", "--config", "wan", "--teacher", str(folder), "--out", str(out),
                              "--no-progress", "--device", "cpu", f"data={shards}", "distill.iterations=2", *TINY,
                              *OPTIONS, f"teacher_options.expert={expert}", *extra])
    finally:
        wan.WanDenoiser.forward = forward
    assert rc == 0, err
    return seen


@pytest.fixture(scope="module")
def runs(folder, shards, root):
    """The low expert's one-step student (default level: the schedule's last t below the boundary), then the high
    expert's two-step student at Karras-spaced levels that end the pair's 3-level ramp at the low student's level
    (so that the exported scheduler config reproduces all three)."""
    low_seen = _distill(folder, shards, root / "low", "low")
    low_level = distill.read_run(root / "low")[2].sigmas[0]
    t2 = karras_middle(0.999, t_of(low_level))
    high_seen = _distill(folder, shards, root / "high", "high", "distill.generator_sigma=null",
                         f"distill.student_sigmas=[999.0,{t2 / (1 - t2)!r}]")
    return {"high": root / "high", "low": root / "low", "seen": {"high": high_seen, "low": low_seen}}


def test_every_noise_level_of_a_run_lies_in_its_experts_range(runs):
    """The runs' distillation levels (the saved sampler's support and its draws) and every level any network was
    called at lie in the expert's range: high t >= boundary_ratio, low t < boundary_ratio."""
    from fdistill.config import from_dict
    from fdistill.training import checkpoint
    from fdistill.training.distiller import DistillConfig

    for expert in ("high", "low"):
        cfg = from_dict(DistillConfig, checkpoint.read_meta(runs[expert])["config"])
        sampler = cfg.sigmas
        draws = sampler.sample(4096, generator=torch.Generator().manual_seed(0))
        seen = torch.cat(runs["seen"][expert])
        for levels in (sampler.support, draws, seen, torch.tensor(cfg.student_sigmas)):
            assert bool(wan.in_expert_range(levels, expert, B).all()), expert
        t = 1000 * sampler.support / (1 + sampler.support)
        if expert == "high":  # the preset's t grid on [0.001, 0.999] clipped at the boundary
            assert sampler.index_range == (875, 999) and float(t.min()) >= 875 and float(t.max()) == pytest.approx(999)
        else:
            assert sampler.index_range == (0, 874) and float(t.max()) < 875 and float(t.min()) == pytest.approx(1)
        assert len(seen) > 10
    low = from_dict(DistillConfig, checkpoint.read_meta(runs["low"])["config"])
    assert low.student_sigmas == [float(low.sigmas.support.max())]  # just below the boundary


def test_default_levels_split_at_the_boundary(folder, shards):
    """k levels of a high student: k equal steps of t from t_max 0.999 towards the boundary (the last step's end,
    the boundary, left out); of a low one: from the schedule's last t below the boundary towards 0 (the preset's
    generator_sigma 999 is the top only where it lies in the range). Teacher and students: that expert alone."""
    base = [f"data={shards}", *TINY, *OPTIONS]
    high = open_teacher(folder, None, {**SIZE, "expert": "high"})
    assert high.denoiser.transformer_2 is None and high.denoiser.expert == "high"
    cfg, first = high.distill_settings(images.load_config("wan", [*base, "distill.student_steps=3"]).distill)
    assert first == "noise" and cfg.generator_sigma is None and cfg.student_steps is None
    assert [t_of(s) for s in cfg.student_sigmas] == pytest.approx([0.999, 0.999 - 0.124 / 3, 0.999 - 0.248 / 3])
    low = open_teacher(folder, None, {**SIZE, "expert": "low"})
    cfg, first = low.distill_settings(images.load_config("wan", [*base, "distill.student_steps=2"]).distill)
    top = t_of(cfg.sigmas.support.max())
    assert first == "forward" and top < B and top == pytest.approx(0.874125, abs=1e-6)
    assert [t_of(s) for s in cfg.student_sigmas] == pytest.approx([top, top / 2])
    # the teacher of a low run is transformer_2 alone: its weights, its taps
    pair = open_teacher(folder, None, SIZE).denoiser
    assert all(torch.equal(a, b) for a, b in zip(low.denoiser.transformer.parameters(),
                                                  pair.transformer_2.parameters()))
    assert len(low.denoiser.blocks()) == 2
    with pytest.raises(ValueError, match=r"it takes t < 0.875 \(boundary_ratio\), got t = 0.9") as e:
        low.denoiser(torch.zeros(1, *low.sample_shape), torch.tensor([9.0]), low.text(["x"]))
    assert "\n" not in str(e.value)


def test_low_students_first_input_is_real_latents_noised_to_its_first_level(folder, shards):
    """A one-step low student never sees pure noise: its input is the drawn real latents plus sigma_1 eps."""
    low = open_teacher(folder, None, {**SIZE, "expert": "low"})
    d = distill.build_distiller(images.load_config("wan", [f"data={shards}", *TINY, *OPTIONS,
                                                           "teacher_options.expert=low"]), low)
    assert d.first_input == "forward" and d.student.steps == 1
    inputs = []
    hook = d.generator.register_forward_pre_hook(lambda m, args: inputs.append((args[0].clone(), args[1].clone())))
    draws = d._student_draws()
    with torch.no_grad():
        d._student_output(d._randn(), draws["cond"], draws, slice(None))
    hook.remove()
    (x, sigma), = inputs
    level = d.student.sigmas[0]
    assert torch.equal(sigma, torch.full((2,), level))
    torch.testing.assert_close(x, draws["x_real"] + level * draws["eps"], rtol=0, atol=0)


def test_low_expert_run_resumes_bit_exact(runs, folder, shards, tmp_path):
    """Its first input is not in the config but follows from teacher_options.expert: two iterations, --resume to
    three, equal three straight."""
    from fdistill.training import checkpoint

    straight = tmp_path / "straight"
    _distill(folder, shards, straight, "low", "distill.iterations=3")
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["low"], resumed)
    rc, _, err = cli_run(["distill", "--out", str(resumed), "--resume", "--no-progress", "--device", "cpu",
                          "distill.iterations=3"])
    assert rc == 0, err
    a, b = (checkpoint.load_weights(r / "checkpoints" / "000000003", "generator", "generator")
            for r in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_expert_configs_are_refused_in_one_line(folder, shards, root):
    wan21 = wp.wan21(root / "wan21")
    base = ["distill", "--config", "wan", "--out", str(root / "refused"), "--no-progress", "--device", "cpu",
            f"data={shards}", *TINY, *OPTIONS]
    one_line_error([*base, "--teacher", str(folder)], "two-expert Wan2.2 pipeline",
                   "expected teacher_options.expert=high or teacher_options.expert=low")
    one_line_error([*base, "--teacher", str(wan21), "teacher_options.expert=high"],
                   "teacher_options.expert=high:", "has one transformer", "expected null here")
    one_line_error([*base, "--teacher", str(folder), "teacher_options.expert=middle"],
                   "teacher_options.expert must be null, high or low")
    one_line_error([*base, "--teacher", str(folder), "teacher_options.expert=high", "distill.generator_sigma=null",
                    "distill.student_sigmas=[999,3]"],
                   "distill.student_sigmas=[999.0, 3.0]: 3 (t = 0.75) is outside the high-noise expert's range, "
                   "t >= 0.875")
    one_line_error([*base, "--teacher", str(folder), "teacher_options.expert=low", "distill.generator_sigma=null",
                    "distill.student_sigmas=[9,1]"],
                   "9 (t = 0.9) is outside the low-noise expert's range, t < 0.875")
    one_line_error([*base, "--teacher", str(folder), "teacher_options.expert=high", "distill.generator_sigma=3"],
                   "distill.generator_sigma=3 (t = 0.75) is below the high-noise expert's range")
    one_line_error([*base, "--teacher", str(folder), "teacher_options.expert=low",
                    "distill.sigmas.index_range=[900,999]"], "distill.sigmas: its levels (index_range [900, 999]",
                   "have none in the low-noise expert's range")


def _hooked(pipe_or_net, names=("transformer", "transformer_2")):
    """Record (which transformer, its timestep) at each call."""
    calls, hooks = [], []
    for name in names:
        module = getattr(pipe_or_net, name)
        hooks.append(module.register_forward_pre_hook(
            lambda m, args, kwargs, name=name: calls.append((name, float(kwargs["timestep"].reshape(-1)[0]))),
            with_kwargs=True))
    return calls, hooks


def test_pair_exports_as_one_wan_pipeline_routing_each_step_to_its_student(runs, tmp_path):
    """export --checkpoint HIGH --checkpoint-low LOW: transformer = the high student, transformer_2 = the low one,
    the 3-step call runs transformer at the high levels and transformer_2 at the low one, and gives fdistill's own
    two-stage sample (``load_expert_pair`` + ``sample_maker``) for the same seed to TOL."""
    from diffusers import WanPipeline

    out = tmp_path / "pair"
    rc, stdout, err = cli_run(["export", "--checkpoint", str(runs["high"]), "--checkpoint-low", str(runs["low"]),
                               "--diffusers", str(out)])
    assert rc == 0, err
    assert stdout.count("\n") == 1 and f"WanPipeline.from_pretrained('{out}')(prompt, num_inference_steps=3, " \
        "guidance_scale=1, height=32, width=48, num_frames=5, max_sequence_length=16)" in stdout
    assert "runs the high-noise student (transformer) at t = [0.999, 0.9" in stdout
    assert "gives fdistill sample's video for the same seed" in stdout
    pair, student, teacher = distill.load_expert_pair(runs["high"], runs["low"])
    times = [t_of(s) for s in student.sigmas]
    assert student.steps == 3 and times[1] >= B > times[2]
    assert json.loads((out / "model_index.json").read_text())["boundary_ratio"] == B
    pipe = WanPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for mine, theirs in ((pair.transformer, pipe.transformer), (pair.transformer_2, pipe.transformer_2)):
        assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()))
    calls, hooks = _hooked(pipe)
    with torch.no_grad():
        video = pipe(PROMPT, num_inference_steps=3, guidance_scale=1.0, height=32, width=48, num_frames=5,
                     max_sequence_length=L, generator=torch.Generator().manual_seed(4), output_type="pt").frames
    for h in hooks:
        h.remove()
    assert [name for name, _ in calls] == ["transformer", "transformer", "transformer_2"]
    assert [t for _, t in calls] == pytest.approx([1000 * t for t in times], rel=1e-6)
    ours_calls, hooks = _hooked(pair)
    ours = distill.sample_maker(pair, teacher, student)([PROMPT], [4])
    for h in hooks:
        h.remove()
    assert [name for name, _ in ours_calls] == ["transformer", "transformer", "transformer_2"]
    torch.testing.assert_close(video.transpose(1, 2), (ours + 1) / 2, rtol=TOL, atol=TOL)
    # fdistill sample of the pair through the CLI: the same routing, an MP4 per prompt
    rc, stdout, err = cli_run(["sample", "--checkpoint", str(runs["high"]), "--checkpoint-low", str(runs["low"]),
                               "--prompt", PROMPT, "--out", str(tmp_path / "samples"), "--no-progress",
                               "--device", "cpu"])
    assert rc == 0, err
    assert "wrote 1 MP4s" in stdout and "3 network calls" in stdout and (tmp_path / "samples" / "000000.mp4").is_file()


def _edited_copy(run, out, edit):
    """A copy of ``run`` whose newest checkpoint's meta is changed by ``edit(meta)``."""
    shutil.copytree(run, out)
    state = out / "checkpoints" / "000000002" / "state.json"
    data = json.loads(state.read_text())
    edit(data["meta"])
    state.write_text(json.dumps(data))
    return out


def test_bad_pairs_are_refused_in_one_line(runs, folder, root, tmp_path):
    high, low = str(runs["high"]), str(runs["low"])
    x = ["export", "--diffusers", str(tmp_path / "x")]
    one_line_error([*x, "--checkpoint", high], "a Wan2.2-A14B high-noise expert's student exports with the other "
                   "expert's", "--checkpoint HIGH_RUN --checkpoint-low LOW_RUN")
    one_line_error([*x, "--checkpoint", high, "--checkpoint-low", high],
                   "is the high-noise expert's run and --checkpoint-low", "the high-noise expert's; expected the high "
                   "expert's run, then the low expert's")
    one_line_error([*x, "--checkpoint", low, "--checkpoint-low", high], "is the low-noise expert's run")
    other = root / "a14b-copy"
    shutil.copytree(folder, other)
    moved = _edited_copy(runs["low"], tmp_path / "moved", lambda m: m["info"]["network"].update(folder=str(other)))
    one_line_error([*x, "--checkpoint", high, "--checkpoint-low", str(moved)], "were distilled from different "
                   "teachers (folder", "expected the same Wan2.2-A14B folder and teacher_options but the expert")

    def narrowed(meta):
        meta["config"]["sigmas"]["index_range"] = [0, 500]

    short = _edited_copy(runs["low"], tmp_path / "short", narrowed)
    one_line_error([*x, "--checkpoint", high, "--checkpoint-low", str(short)], "distillation levels stop at t = 0.5",
                   "the two experts' ranges do not meet")
    def two_levels(meta):
        meta["config"]["student_sigmas"] = [meta["config"]["student_sigmas"][0], 1.0]

    four = _edited_copy(runs["low"], tmp_path / "four", two_levels)
    one_line_error([*x, "--checkpoint", high, "--checkpoint-low", str(four)], "the pair's 4 levels t = [0.999, ",
                   "(2 of the high student, 2 of the low) cannot be exported")
    one_line_error(["sample", "--checkpoint", low, "--prompt", PROMPT, "--out", str(tmp_path / "s"), "--device",
                    "cpu"], "is the student of Wan2.2-A14B's low-noise expert", "--checkpoint-low")
    one_line_error(["export", "--checkpoint", high, "--checkpoint-low", low, "--lora", str(tmp_path / "l")],
                   "--lora writes one network's adapter")
    assert not (tmp_path / "x").exists()


def test_memory_model_sizes_one_expert_and_not_the_routed_pair(folder):
    """An expert's run holds one of the two transformers: the memory model sizes it with the other left out of the
    frozen bytes (the pair, never distilled, is not sized)."""
    from fdistill import memory

    assert memory.folder_subject(folder, None, SIZE) is None
    high, low = (memory.folder_subject(folder, None, {**SIZE, "expert": e}) for e in wan.EXPERTS)
    assert high.frozen_bytes == low.frozen_bytes == sum(
        memory.component_bytes(folder / name, as_stored=name == "text_encoder") for name in ("vae", "text_encoder"))
    assert high.sample_shape == open_teacher(folder, None, SIZE).sample_shape
