"""Tests for fdistill.divergences: Table 1, Table 6, Theorem 1, Prop. 1 and the Fig. 5a variance."""

import math

import numpy as np
import pytest
import torch

from fdistill.core import divergences as D

TABLE1 = ["reverse_kl", "softened_rkl", "js", "squared_hellinger", "forward_kl", "jeffreys"]
CUSTOM = "1 + tanh(log(r))"  # = 2 r^2 / (1 + r^2), a non-canonical h (Prop. 1)
F64 = torch.float64


def _t(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=F64)


def _second_derivative(f, r: torch.Tensor) -> torch.Tensor:
    r = r.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(r).sum(), r, create_graph=True)
    (g2,) = torch.autograd.grad(g.sum(), r)
    return g2


# --- Table 1 ------------------------------------------------------------------------------------------------


def test_names_follow_table1_then_extras():
    assert D.names() == TABLE1 + ["pearson", "neyman"]
    assert [D.get(n).mode_seeking for n in TABLE1] == ["yes", "yes", "medium", "medium", "no", "no"]


@pytest.mark.parametrize("name", D.names())
def test_registered_f_and_h(name):
    d = D.get(name)
    assert d.name == name
    assert abs(d.f(_t([1.0])).item()) < 1e-15  # f(1) = 0
    r = torch.logspace(-3, 3, 61, dtype=F64)
    torch.testing.assert_close(_second_derivative(d.f, r) * r**2, d.h(r), rtol=1e-6, atol=0)  # h = f'' r^2
    r = torch.logspace(-4, 4, 401, dtype=F64)
    fr = d.f(r)
    slopes = torch.diff(fr) / torch.diff(r)
    assert (torch.diff(slopes) >= -1e-9 * (1 + slopes[1:].abs())).all()  # convex


@pytest.mark.parametrize("name", D.names() + [CUSTOM])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_any_shape(name, dtype):
    d = D.get(name)
    r = torch.logspace(-6, 6, 60, dtype=dtype).reshape(3, 4, 5)
    for fn in (d.f, d.h):
        out = fn(r)
        assert out.shape == r.shape and out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("alias,name", [
    ("rkl", "reverse_kl"), ("Reverse-KL", "reverse_kl"), ("FKL", "forward_kl"),
    ("forward-kl", "forward_kl"), ("jsd", "js"), ("Jensen_Shannon", "js"), ("JS", "js"),
    ("sh", "squared_hellinger"), ("hellinger", "squared_hellinger"), ("srkl", "softened_rkl"),
    ("sf", "softened_rkl"), ("jeffrey", "jeffreys"), ("Jeffreys", "jeffreys"), ("jf", "jeffreys"),
    ("chi2", "pearson"), ("neyman", "neyman"),
])
def test_aliases(alias, name):
    assert D.get(alias) is D.get(name)


def test_get_passes_divergences_through():
    d = D.get("js")
    assert D.get(d) is d


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="reverse_kl.*forward_kl"):
        D.get("wasserstein")


def test_ambiguous_kl_is_refused():
    """DMD readers say "KL" for the reverse, others for the forward: the bare name is not guessed."""
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        D.check("kl")


def test_check_does_not_build_a_custom_f(monkeypatch):
    monkeypatch.setattr(D, "from_h", lambda *a, **k: pytest.fail("check must not tabulate f (Prop. 1)"))
    D.check("sqrt(r)/(1+r)")
    with pytest.raises(ValueError, match="unknown divergence"):
        D.check("sqrt(q)")


# --- Proposition 1 ------------------------------------------------------------------------------------------


def _gauss_logpdf(x, mu, var):
    return -0.5 * (x - mu) ** 2 / var - 0.5 * np.log(2 * np.pi * var)


X = np.linspace(-30.0, 30.0, 30001)


def _trapz(y) -> float:
    return float(np.trapezoid(y, X)) if hasattr(np, "trapezoid") else float(np.trapz(y, X))


def _df_gauss(d, mu_p, var_p, mu_q, var_q) -> float:
    """D_f(p||q) = int q f(p/q) dx for 1-D Gaussians (trapezoid rule in float64)."""
    lq = _gauss_logpdf(X, mu_q, var_q)
    r = np.exp(_gauss_logpdf(X, mu_p, var_p) - lq)
    return _trapz(np.exp(lq) * d.f(_t(r)).numpy())


def test_expression_reproduces_js():
    custom, js = D.from_h("r/(1+r)"), D.get("js")
    assert custom.mode_seeking == "-"
    r = torch.logspace(-3, 3, 13, dtype=F64)
    torch.testing.assert_close(custom.h(r), js.h(r))
    # numeric f'' (central differences of the tabulated f) is h / r^2
    e = 1e-3 * r
    f2 = (custom.f(r + e) - 2 * custom.f(r) + custom.f(r - e)) / e**2
    torch.testing.assert_close(f2 * r**2, js.h(r), rtol=1e-3, atol=0)
    # f(1) = f'(1) = 0, and D_f equals the analytic JS divergence (an affine c (r - 1) integrates to 0)
    assert abs(custom.f(_t([1.0])).item()) < 1e-12
    assert abs((custom.f(_t([1 + 1e-4])) - custom.f(_t([1 - 1e-4]))).item()) / 2e-4 < 1e-6
    for p, q in [((0.0, 1.0), (1.5, 0.5)), ((0.0, 1.0), (-3.0, 2.0))]:
        assert _df_gauss(custom, *p, *q) == pytest.approx(_df_gauss(js, *p, *q), abs=1e-3)


def test_callable_and_string_via_get():
    by_callable = D.get(lambda r: r)  # forward-KL's h
    by_string = D.get(" r ")
    assert by_string.name == "r"
    fkl = D.get("forward_kl")
    r = torch.logspace(-3, 3, 13, dtype=F64)
    for d in (by_callable, by_string):
        torch.testing.assert_close(d.f(r), fkl.f(r) - (r - 1), rtol=1e-6, atol=1e-9)  # f'(1) = 0 gauge
        torch.testing.assert_close(d.h(r), r)
    # the tabulated f keeps autograd working (used for |f'| in Fig. 4)
    torch.testing.assert_close(_second_derivative(by_string.f, r) * r**2, r, rtol=1e-3, atol=0)


@pytest.mark.parametrize("expr,match", [
    ("r - 2", r"non-negative.*h\(0\.0001\) = -2"),
    ("log(r)", r"non-negative.*h\(0\.0001\) = -9\.21"),
    ("1/(r-1)", "finite and non-negative"),
    ("exp(r)", r"h\(7\d\d\.\d\) = inf"),
    ("0*r", "identically zero"),
    ("__import__('os').system('x')", r"unsupported syntax.*__import__"),
    ("r.real", r"unsupported syntax 'r\.real'"),
    ("open('x')", "function 'open' is not allowed"),
    ("x + 1", "unknown name 'x'"),
    ("r +", "cannot parse"),
    ("max(r)", "max takes 2"),
])
def test_invalid_h_rejected(expr, match):
    with pytest.raises(ValueError, match=match):
        D.from_h(expr)
    with pytest.raises(ValueError):
        D.get(expr)


def test_invalid_callable_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        D.from_h(lambda r: torch.cos(r))


def test_expression_grammar():
    h = D.parse_expression("max(sqrt(r), 2*pi) - min(abs(-r), e) + sigmoid(log1p(r)) + softplus(-r) ** 2")
    r = _t([0.5, 3.0, 50.0])
    expect = (torch.maximum(r.sqrt(), _t(2 * math.pi)) - torch.minimum(r, _t(math.e))
              + torch.sigmoid(torch.log1p(r)) + torch.nn.functional.softplus(-r) ** 2)
    torch.testing.assert_close(h(r), expect)
    assert D.parse_expression("3")(torch.ones(2, 3)).shape == (2, 3)


# --- Theorem 1 ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", D.names() + [CUSTOM])
@pytest.mark.parametrize("sigma", [0.5, 1.0])
def test_theorem1_gradient(name, sigma):
    """E_{z,eps}[-h(r)(grad log p_t - grad log q_t) dG/dtheta] = d/dtheta D_f(p_t||q_t) (Eq. (3)).

    Teacher p = N(0, 1), generator G(z) = theta + s z, so q_t = N(theta, s^2 + sigma^2) and dG/dtheta = 1.
    """
    d, theta, s = D.get(name), 0.7, 0.8
    var_p, var_q = 1 + sigma**2, s**2 + sigma**2
    lq = _gauss_logpdf(X, theta, var_q)
    r = np.exp(_gauss_logpdf(X, 0.0, var_p) - lq)
    score_diff = -X / var_p + (X - theta) / var_q
    lhs = _trapz(np.exp(lq) * -d.h(_t(r)).numpy() * score_diff)
    delta = 1e-4
    d_plus, d_minus = (_df_gauss(d, 0.0, var_p, theta + t, var_q) for t in (delta, -delta))
    rhs = (d_plus - d_minus) / (2 * delta)
    assert abs(lhs - rhs) < max(1e-6 * abs(rhs), 1e-9), (lhs, rhs)  # agreement is ~1e-8 or better
    assert rhs > 0  # moving the generator away from the teacher increases every divergence
