"""Tests for the divergence comparison of Sec. 4 / App. C (``fdistill analyze``): the mode-seeking limit,
the Table 6 tail rates and the Fig. 5a normalized variance."""

import math

import numpy as np
import pytest

from fdistill.apps import analyze as A

CUSTOM = "1 + tanh(log(r))"  # = 2 r^2 / (1 + r^2), a non-canonical h (Prop. 1)


# --- Section 4: mode-seeking, Table 6 tails, Fig. 5a variance -----------------------------------------------


@pytest.mark.parametrize("name,limit", [
    ("reverse_kl", 0.0), ("softened_rkl", -math.log(2)), ("js", math.log(2)), ("squared_hellinger", 0.0),
    ("forward_kl", math.inf), ("jeffreys", math.inf), ("pearson", math.inf), ("neyman", 1.0),
    ("r/(1+r)", math.log(2)), (CUSTOM, math.pi / 2),
])
def test_mode_seeking_limit(name, limit):
    got = A.mode_seeking_limit(name)
    assert got == limit if math.isinf(limit) else abs(got - limit) < 1e-3


@pytest.mark.parametrize("name,rates", [  # Table 6
    ("reverse_kl", (-2, -2)), ("softened_rkl", (-3, -2)), ("js", (-2, -1)),
    ("squared_hellinger", (-1.5, -1.5)), ("forward_kl", (-1, -1)), ("jeffreys", (-1, -2)),
    ("pearson", (0, 0)), ("neyman", (-3, -3)),
    (CUSTOM, (-2, 0)),
])
def test_tail_rates(name, rates):
    assert A.tail_rates(name) == pytest.approx(rates, abs=0.05)


CLOSED_FORM_VARIANCE = {
    "reverse_kl": lambda g: 0.0,
    "forward_kl": lambda g: math.exp(g * g) - 1,
    "jeffreys": lambda g: (3 + math.exp(g * g)) / 4 - 1,
    "squared_hellinger": lambda g: math.exp(g * g / 4) - 1,  # E_q[sqrt r] = exp(-g^2/8), E_q[r] = 1
    "neyman": lambda g: math.exp(g * g) - 1,
    "pearson": lambda g: math.exp(4 * g * g) - 1,
}


@pytest.mark.parametrize("name", CLOSED_FORM_VARIANCE)
@pytest.mark.parametrize("gap", [0.5, 1.0, 2.0, 3.0])
def test_normalized_variance_closed_forms(name, gap):
    expect = CLOSED_FORM_VARIANCE[name](gap)
    got = A.normalized_variance(name, gap)
    assert abs(got) < 1e-12 if expect == 0 else abs(got / expect - 1) < 1e-2


def test_js_variance_stays_below_forward_kl():  # Fig. 5a
    assert A.normalized_variance("js", 0.0) == pytest.approx(0.0, abs=1e-12)
    for gap in np.linspace(1.0, 3.0, 9):
        assert A.normalized_variance("js", gap) < A.normalized_variance("forward_kl", gap)
        assert A.normalized_variance("js", gap) < A.normalized_variance("jeffreys", gap)
