"""Teacher training with the rectified-flow loss (TeacherConfig.noise="flow"): the loss in D form equals the
velocity MSE ||v - (eps - x0)||^2 computed directly through a tiny SD3 transformer, the time samplers stay in
range, and a short run on a tiny problem lowers the loss."""

import copy

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import flow_pipelines  # noqa: E402

from fdistill.data.conditions import TextCondition  # noqa: E402
from fdistill.teachers import flow_matching as fm  # noqa: E402
from fdistill.training.loop import training_loop  # noqa: E402
from fdistill.training.teacher_training import (  # noqa: E402
    TeacherConfig,
    TeacherTrainer,
    flow_matching_loss,
    flow_times,
)

PROMPTS = ["a handwritten seven", "a handwritten one"]


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return fm.load_flow_pipeline(flow_pipelines.sd3(tmp_path_factory.mktemp("flow") / "sd3"), 16,
                                 max_sequence_length=8)


def test_the_loss_is_the_velocity_mse_through_the_transformer(sd3):
    cond = sd3.text(PROMPTS)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([0.05, 0.8])
    with torch.no_grad():
        loss = flow_matching_loss(sd3.denoiser, x0, t, cond, eps)
        x_t = (1 - t).reshape(-1, 1, 1, 1) * x0 + t.reshape(-1, 1, 1, 1) * eps  # rectified flow's x_t
        v = sd3.denoiser.transformer(hidden_states=x_t, encoder_hidden_states=cond.embeds,
                                     pooled_projections=cond.pooled, timestep=1000 * t, return_dict=False)[0]
        direct = (v - (eps - x0)).square().mean()
    assert loss.item() == pytest.approx(direct.item(), rel=1e-4)


@pytest.mark.parametrize("kind", ["uniform", "logit_normal"])
def test_flow_times_stay_in_range(kind):
    t = flow_times(4000, kind, 0.01, 0.9)
    assert t.min() >= 0.01 and t.max() <= 0.9
    if kind == "logit_normal":  # sigmoid(N(0, 1)): median 1/2, most mass in the middle
        assert abs(t.median().item() - 0.5) < 0.03 and ((t > 0.25) & (t < 0.75)).float().mean() > 0.6


def test_bad_flow_settings_are_refused():
    with pytest.raises(ValueError, match="flow_t"):
        TeacherConfig(noise="flow", flow_t="lognormal")
    with pytest.raises(ValueError, match="t_max"):
        TeacherConfig(noise="flow", t_min=0.5, t_max=0.2)
    with pytest.raises(ValueError, match="noise"):
        TeacherConfig(noise="rectified")


def test_a_short_flow_training_run_lowers_the_loss(sd3):
    torch.manual_seed(0)
    net = copy.deepcopy(sd3.denoiser)  # a fresh copy of the tiny transformer, trained from its random weights
    net.transformer = type(net.transformer).from_config(net.transformer.config)
    cond = sd3.text(PROMPTS)
    x0 = torch.randn(2, 4, 8, 8)

    def real_data(n: int):
        i = torch.arange(n) % 2
        return x0[i], TextCondition(cond.embeds[i], cond.pooled[i])

    g = torch.Generator().manual_seed(1)
    t_eval, eps = torch.rand(64, generator=g) * 0.9 + 0.05, torch.randn(64, 4, 8, 8, generator=g)

    def held_out(model) -> float:
        x, c = real_data(64)
        with torch.no_grad():
            return flow_matching_loss(model, x, t_eval, c, eps).item()

    before = held_out(net)
    cfg = TeacherConfig(iterations=60, batch_size=16, lr=3e-3, warmup=5, ema_beta=0.0, label_dropout=0.1,
                        noise="flow", flow_t="logit_normal", log_every=1000)
    trainer = TeacherTrainer(cfg, net, real_data)
    training_loop(trainer, progress=False)
    assert trainer.iteration == 60
    assert held_out(trainer.net) < 0.7 * before
