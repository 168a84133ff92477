"""distill.disc_features: the discriminator head on the teacher's features (App. B), on the fake score's with the
head's loss reaching the head only ("fake_score"), or on the fake score's with that loss also training the fake
score ("dmd2", DMD2's guidance-model classifier). Which parameters each loss reaches."""

import pytest
import torch
from test_trainer import make, small

from fdistill.training.distiller import DistillConfig, disc_accuracy


def grads(m):
    return [None if p.grad is None else p.grad.clone() for p in m.parameters()]


def same(a, b):
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in zip(a, b))


def critic_grads(features: str, critics: int = 1, **kw):
    """The gradients of the ``critics``-th critic step (after the first student step)."""
    d = make(small(disc_features=features, **kw))
    for _ in range(critics):  # the student step, then critic steps (tau = 3)
        d.step()
    logs = d.critic_step()
    return d, grads(d.fake_score), grads(d.discriminator), logs


@pytest.mark.parametrize("r1_form", ["exact", "approx"])
def test_head_only_leaves_the_fake_score_update_to_denoising(r1_form):
    """"fake_score": the fake score's gradient is line 14's denoising loss alone, the same as with the teacher's
    features (same draws); the head's gradient differs once the fake score has moved off the teacher."""
    _, fake_t, head_t, _ = critic_grads("teacher", 2, r1_form=r1_form)
    d, fake_h, head_h, logs = critic_grads("fake_score", 2, r1_form=r1_form)
    assert all(g is not None for g in fake_h) and same(fake_t, fake_h)
    assert all(g is not None for g in head_h) and not same(head_t, head_h)
    assert 0.0 <= float(logs["disc_accuracy"]) <= 1.0


def test_dmd2_trains_the_fake_score_with_the_head_loss():
    """Adversarial-only (no denoising loss): with "dmd2" the fake score gets the head's loss gradient, with
    "fake_score" none, and the head gets it in both."""
    _, fake_h, head_h, _ = critic_grads("fake_score", fdistill_weight=0.0)
    _, fake_d, head_d, _ = critic_grads("dmd2", fdistill_weight=0.0)
    assert all(g is None for g in fake_h)
    # the layers up to the tapped hidden activation get it (the output layer after the tap cannot)
    assert sum(g is not None and float(g.abs().sum()) > 0 for g in fake_d) >= 2 and fake_d[-1] is None
    assert same(head_h, head_d)  # same features (the fake score has not moved yet), same head loss
    _, fake_dsm, _, _ = critic_grads("fake_score")
    _, fake_both, _, _ = critic_grads("dmd2")
    assert not same(fake_dsm, fake_both)  # with the denoising loss, dmd2 adds the head loss's gradient


def moved(d):
    """``d`` with its fake score moved off the teacher (the same way each call)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in d.fake_score.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return d


@pytest.mark.parametrize("features", ["fake_score", "dmd2"])
def test_student_step_reads_the_fake_score_features_into_the_generator_only(features):
    d = moved(make(small(disc_features=features, divergence="forward_kl")))
    before = [p.detach().clone() for p in d.generator.parameters()]
    logs = d.student_step()
    assert all(p.grad is None for p in d.fake_score.parameters())
    assert all(p.grad is None for p in d.discriminator.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, d.generator.parameters()))
    # the generator's GAN gradient runs through the fake score: it differs from the teacher's-features one
    t = moved(make(small(divergence="forward_kl")))
    t.student_step()
    assert not same(grads(d.generator), grads(t.generator))
    assert float(logs["loss_gan_g"]) > 0


def test_disc_features_checked():
    with pytest.raises(ValueError, match="disc_features"):
        DistillConfig(disc_features="generator")


def test_disc_accuracy():
    real, fake = torch.tensor([1.0, -1.0, 2.0, 3.0]), torch.tensor([-1.0, -2.0, 0.5, -3.0])
    assert float(disc_accuracy(real, fake)) == pytest.approx((0.75 + 0.75) / 2)
