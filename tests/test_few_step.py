"""k-step students (fdistill.core.few_step): the samplers against hand-written loops, default levels per schedule,
backward simulation and forward input in the Distiller, exact resume, k = 1 unchanged, bad levels refused."""

import copy

import pytest
import torch

from fdistill.core import few_step
from fdistill.core.diffusion import SigmaSampler, one_step
from fdistill.core.few_step import StudentSteps
from fdistill.networks.heads import Discriminator
from fdistill.networks.mlp import MLPDenoiser
from fdistill.teachers.gmm import GaussianMixture
from fdistill.training.distiller import DistillConfig, Distiller
from fdistill.training.loop import training_loop

MIX = GaussianMixture([[2.0, -1.0], [-1.5, 1.0]], [0.4, 0.4], [0.7, 0.3])
LEVELS = (20.0, 3.0, 0.5, 0.05)


def make(cfg: DistillConfig, seed=0) -> Distiller:
    torch.manual_seed(seed)
    net = MLPDenoiser(2, hidden=32, depth=2, sigma_data=MIX.data_std())
    return Distiller(cfg, copy.deepcopy(net), copy.deepcopy(net), copy.deepcopy(net),
                     Discriminator.mlp(net.feature_channels(), hidden=16),
                     real_data=lambda n, part: (MIX.sample(n)[part], None), sample_shape=(2,))


def small(**kw) -> DistillConfig:
    base = dict(iterations=12, batch_size=16, lr=1e-3, tau=3, sigmas=SigmaSampler(sigma_max=20.0), log_every=1)
    return DistillConfig(**{**base, **kw})


class Recorder(torch.nn.Module):
    """A denoiser that records its inputs: D(x, sigma) = a x / (1 + sigma) + b (differentiable in a, b)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.tensor(0.7)), torch.nn.Parameter(torch.tensor(0.1))
        self.calls = []

    def prior_std(self, sigma):
        return sigma

    def forward(self, x, sigma, cond=None):
        self.calls.append((x.detach().clone(), sigma.detach().clone()))
        return self.a * x / (1 + sigma[:, None]) + self.b


@pytest.mark.parametrize("sampler", ["sde", "ode"])
def test_samplers_match_a_hand_written_loop(sampler):
    net, student = Recorder(), StudentSteps(LEVELS, sampler)
    z = torch.randn(5, 2)
    noises = [torch.randn(5, 2) for _ in range(3)]
    it = iter(noises)
    got = few_step.run_steps(net, z, student, noise=lambda: next(it))
    with torch.no_grad():
        x = z * LEVELS[0]
        for i, s in enumerate(LEVELS):
            x0 = 0.7 * x / (1 + s) + 0.1
            if i < 3:
                eps = noises[i] if sampler == "sde" else (x - x0) / s
                x = x0 + LEVELS[i + 1] * eps
    torch.testing.assert_close(got.detach(), x0)
    assert [float(s[0]) for _, s in net.calls] == pytest.approx(LEVELS)


def test_one_step_student_is_the_one_step_generator():
    net, z = Recorder(), torch.randn(4, 2)
    assert torch.equal(few_step.run_steps(net, z, StudentSteps((20.0,))), one_step(net, z, 20.0))


def test_default_levels_follow_the_published_lists():
    ddpm = SigmaSampler(schedule="scaled_linear", index_range=(0, 999))
    grid = ddpm.grid
    assert few_step.default_levels(ddpm, 4) == pytest.approx([float(grid[t]) for t in (999, 749, 499, 249)])
    assert few_step.default_levels(ddpm, 2) == pytest.approx([float(grid[t]) for t in (999, 499)])
    # FastGen's Wan list 0.999/0.937/0.833/0.624 is linspace(0.999, 0, 5) through shift 5
    flow = SigmaSampler(schedule="flow", shift=5.0, index_range=(0, 999))
    t = [s / (1 + s) for s in few_step.default_levels(flow, 4)]
    assert t == pytest.approx([0.999, 0.937, 0.833, 0.624], abs=1e-3)
    karras = SigmaSampler()
    assert few_step.default_levels(karras, 4) == pytest.approx([80.0, 17.5, 2.52, 0.17], rel=0.02)
    for schedule in (ddpm, flow, karras):  # k = 1 is today's generator sigma, exactly
        assert few_step.default_levels(schedule, 1) == [schedule.largest]
        assert few_step.default_levels(schedule, 3, top=1.5)[0] == 1.5
    # ending above 0 (an expert's boundary): k equal steps of unshifted t from the top to that end, end left out
    end = 5.0 * 0.5 / (1 - 0.5)  # unshifted t = 0.5
    t_u = [s / (5.0 + s) for s in few_step.default_levels(flow, 4, bottom=end)]
    assert t_u == pytest.approx(torch.linspace(t_u[0], 0.5, 5, dtype=torch.float64)[:4].tolist())
    with pytest.raises(ValueError, match="defined for a flow schedule, not distill.sigmas.schedule=karras"):
        few_step.default_levels(karras, 2, bottom=1.0)


def test_fewer_steps_take_every_other_level():
    student = StudentSteps(LEVELS, "ode")
    assert student.fewer(2) == StudentSteps((20.0, 0.5), "ode") and student.fewer(1).sigmas == (20.0,)
    with pytest.raises(ValueError, match=r"--student-steps 3: .* 1, 2, 4"):
        student.fewer(3)


def test_backward_simulation_has_no_gradient_and_uses_the_current_weights():
    net, student = Recorder(), StudentSteps(LEVELS, "ode")
    z, step = torch.randn(6, 2), torch.tensor([0, 1, 2, 3, 3, 1])
    x = few_step.simulate(net, z * LEVELS[0], student, step)
    assert not x.requires_grad
    with torch.no_grad():  # each sample's input by hand: the single-sample loop stopped at its step
        for b in range(6):
            xb = z[b:b + 1] * LEVELS[0]
            for i in range(int(step[b])):
                x0 = net.a * xb / (1 + LEVELS[i]) + net.b
                xb = x0 + LEVELS[i + 1] * (xb - x0) / LEVELS[i]
            torch.testing.assert_close(x[b:b + 1], xb)
    with torch.no_grad():
        net.a.add_(0.5)  # new weights, new inputs
    assert not torch.allclose(few_step.simulate(net, z * LEVELS[0], student, step)[step > 0], x[step > 0])
    # the batches: only the samples still moving are run (3 of 6 after step 0, 2 after step 1)
    net.calls.clear()
    few_step.simulate(net, z * LEVELS[0], student, step)
    assert [len(x) for x, _ in net.calls] == [5, 3, 2]


@pytest.mark.parametrize("mode", ["backward", "forward"])
def test_student_step_feeds_each_sample_its_steps_input(mode):
    """The generator's graded call sees, per sample, the input of its drawn step: pure noise at step 0, else the
    backward simulation (no gradient reaches earlier calls) or the real sample noised to sigma_i."""
    d = make(small(student_sigmas=list(LEVELS), student_sampler="ode", student_input=mode))
    draws = d._student_draws()
    z = d._randn()
    calls = []
    hook = d.generator.register_forward_hook(lambda m, args, out: calls.append((args[0].detach(), args[1], out)))
    x = d._student_output(z, None, draws, slice(None))
    hook.remove()
    step = draws["step"]
    levels = torch.tensor(LEVELS)
    x_in, sigma, _ = calls[-1]
    torch.testing.assert_close(sigma, levels[step])
    torch.testing.assert_close(x_in[step == 0], z[step == 0] * LEVELS[0])
    if mode == "forward":
        want = draws["x_real"] + levels[step][:, None] * draws["eps"]
        torch.testing.assert_close(x_in[step > 0], want[step > 0])
        assert len(calls) == 1
    else:
        expected = few_step.simulate(d.generator, z * LEVELS[0], d.student, step)
        torch.testing.assert_close(x_in, expected)
        assert all(not out.requires_grad for _, _, out in calls[:-1]) and x.requires_grad


@pytest.mark.parametrize("mode,sampler", [("backward", "sde"), ("forward", "ode")])
def test_k_step_resume_is_exact(tmp_path, mode, sampler):
    cfg = small(student_steps=3, student_input=mode, student_sampler=sampler, divergence="js")
    full = make(cfg)
    torch.manual_seed(123)  # the real data's stream
    training_loop(full, progress=False)
    first = make(copy.deepcopy(cfg))
    first.cfg.iterations = 5
    torch.manual_seed(123)
    training_loop(first, run_dir=tmp_path / "run", progress=False)
    resumed = make(cfg)  # the same frozen teacher; the trained parts come from the checkpoint
    with torch.no_grad():
        for p in resumed.generator.parameters():
            p.add_(1.0)
    resumed.load(tmp_path / "run" / "checkpoints" / "000000005")
    training_loop(resumed, progress=False)
    for name, m in full.modules().items():
        other = resumed.modules()[name].state_dict()
        for k, v in m.state_dict().items():
            assert torch.equal(v, other[k]), f"{name}.{k} differs after resume"


def test_one_step_config_is_todays_student():
    """student_steps=1 and student_sigmas=[sigma_max] train exactly as the default config (no extra draws)."""
    runs = [make(small(**kw)) for kw in ({}, {"student_steps": 1}, {"student_sigmas": [20.0]})]
    for d in runs:
        torch.manual_seed(123)  # the real data's stream
        training_loop(d, progress=False)
    for d in runs[1:]:
        for a, b in zip(runs[0].generator.parameters(), d.generator.parameters()):
            assert torch.equal(a, b)


def test_k_step_training_reduces_the_loss_and_samples_in_k_calls():
    d = make(small(student_steps=4, iterations=30, student_sampler="sde"))
    training_loop(d, progress=False)
    calls = []
    d.generator_ema.register_forward_hook(lambda *a: calls.append(1))
    x = d.sample(64)
    assert x.shape == (64, 2) and torch.isfinite(x).all() and len(calls) == 4


@pytest.mark.parametrize("kw,match", [
    ({"student_sigmas": [1.0, 2.0]}, r"student_sigmas=\[1.0, 2.0\] must be strictly decreasing"),
    ({"student_sigmas": [30.0, 1.0]}, r"distill.student_sigmas=\[30.0, 1.0\]: 30 is outside the teacher's schedule"),
    ({"student_steps": 0}, r"student_steps must be a positive integer or null, got '0'"),
    ({"student_sigmas": []}, r"student_sigmas must be a list of positive noise levels"),
    ({"student_sigmas": [2.0, 1.0], "student_steps": 3}, r"student_steps=3 but student_sigmas has 2 levels"),
    ({"student_sigmas": [2.0, 1.0], "generator_sigma": 2.0}, r"generator_sigma and student_sigmas are both given"),
    ({"student_sampler": "euler"}, r"student_sampler must be 'sde' or 'ode'"),
    ({"student_input": "real"}, r"student_input must be 'backward' or 'forward'"),
])
def test_bad_student_levels_are_refused_in_one_line(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        make(small(**kw))
    assert "\n" not in str(e.value)
