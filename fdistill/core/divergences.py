"""f-divergences for f-distill and their weighting functions h(r) = f''(r) r^2.

Their comparison (mode-seeking limit, tail rates, normalized variance; Sec. 4, Table 6, Fig. 5a) lives
with the command that prints it, ``fdistill.apps.analyze``.

D_f(p||q) = E_q[f(p/q)] with f convex and f(1) = 0 (Sec. 2.3). Theorem 1 / Eq. (3) turns the gradient of
D_f(p_t||q_t) into the VSD gradient weighted by h(r_t), r_t = p_t/q_t; Proposition 1 says any continuous,
non-negative h is the weighting of some f-divergence, which `from_h` builds numerically.

Registered divergences are those of Table 1 (in its order) plus Pearson and Neyman chi^2. `get` accepts
a registered name or alias, a Divergence, a callable h, or an expression string in ``r`` such as
``"r/(1+r)"``. Expressions are parsed with `ast` (never eval) and may only use numbers, ``r``, the
constants ``pi`` and ``e``, the operators ``+ - * / **`` (and unary ``-``/``+``) and the functions
exp, log, log1p, sqrt, tanh, sigmoid, softplus, abs, min(a, b), max(a, b).
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Divergence", "check", "from_h", "get", "names", "parse_expression"]

TensorFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Divergence:
    """An f-divergence: generator f and weighting h(r) = f''(r) r^2 (Table 1, Theorem 1)."""

    name: str  # canonical name, e.g. "js"
    f: TensorFn = field(repr=False)  # elementwise, convex, f(1) = 0
    h: TensorFn = field(repr=False)  # elementwise, h(r) = f''(r) r^2 >= 0
    mode_seeking: str  # "yes" | "medium" | "no" (Table 1); "-" where the paper does not say
    description: str  # human label, e.g. "Jensen-Shannon"


# ----------------------------------------------------------------------------------------------------------
# Table 1 (+ two chi^2 extras). Forms are chosen to stay finite in float32 for r in [1e-6, 1e6].


def _f_softened_rkl(r: Tensor) -> Tensor:
    return (r + 1) * torch.log((r + 1) / (2 * r))  # (r+1) log(1/2 + 1/(2r))


def _f_js(r: Tensor) -> Tensor:
    return r * torch.log(2 * r / (r + 1)) - torch.log((r + 1) / 2)  # = r log r - (r+1) log((r+1)/2)


_TABLE: tuple[Divergence, ...] = (
    Divergence("reverse_kl", lambda r: -torch.log(r), torch.ones_like, "yes", "reverse-KL"),
    Divergence("softened_rkl", _f_softened_rkl, lambda r: 1 / (r + 1), "yes", "softened RKL"),
    Divergence("js", _f_js, lambda r: r / (r + 1), "medium", "Jensen-Shannon"),
    Divergence("squared_hellinger", lambda r: 1 - torch.sqrt(r), lambda r: torch.sqrt(r) / 4, "medium",
               "squared Hellinger"),
    Divergence("forward_kl", lambda r: r * torch.log(r), lambda r: r.clone(), "no", "forward-KL"),
    Divergence("jeffreys", lambda r: (r - 1) * torch.log(r), lambda r: r + 1, "no", "Jeffreys"),
    Divergence("pearson", lambda r: (r - 1) ** 2, lambda r: 2 * r**2, "-", "Pearson chi^2"),
    Divergence("neyman", lambda r: (1 - r) ** 2 / r, lambda r: 2 / r, "-", "Neyman chi^2"),
)
_REGISTRY: dict[str, Divergence] = {d.name: d for d in _TABLE}
_ALIASES: dict[str, str] = {
    "rkl": "reverse_kl", "reverse_kl": "reverse_kl",
    "srkl": "softened_rkl", "sf": "softened_rkl", "softened_reverse_kl": "softened_rkl",
    "jsd": "js", "jensen_shannon": "js",
    "sh": "squared_hellinger", "hellinger": "squared_hellinger",
    "fkl": "forward_kl",  # no bare "kl": DMD readers mean the reverse, others the forward
    "jeffrey": "jeffreys", "jf": "jeffreys",
    "chi2": "pearson", "pearson_chi2": "pearson", "neyman_chi2": "neyman",
}


def names() -> list[str]:
    """Canonical registered names: Table 1 order, then the extras."""
    return list(_REGISTRY)


# ----------------------------------------------------------------------------------------------------------
# Safe expressions h(r) (Prop. 1).

_FUNCS: dict[str, tuple[int, Callable[..., Tensor]]] = {
    "exp": (1, torch.exp), "log": (1, torch.log), "log1p": (1, torch.log1p), "sqrt": (1, torch.sqrt),
    "tanh": (1, torch.tanh), "sigmoid": (1, torch.sigmoid), "softplus": (1, F.softplus),
    "abs": (1, torch.abs), "min": (2, torch.minimum), "max": (2, torch.maximum),
}
_CONSTS = {"pi": math.pi, "e": math.e}
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow}
_UNOPS = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_ALLOWED = ("numbers, r, pi, e, + - * / ** and unary -, and the functions "
            + ", ".join(f"{k}({', '.join('ab'[:n])})" for k, (n, _) in _FUNCS.items()))


def _compile(node: ast.AST, expr: str) -> TensorFn:
    """Turn one AST node into a tensor function of r; every sub-result is a tensor (no Python overflow)."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        v = float(node.value)
        return lambda r: torch.tensor(v, dtype=r.dtype, device=r.device)
    if isinstance(node, ast.Name):
        if node.id == "r":
            return lambda r: r
        if node.id in _CONSTS:
            c = _CONSTS[node.id]
            return lambda r: torch.tensor(c, dtype=r.dtype, device=r.device)
        raise ValueError(f"unknown name {node.id!r} in h expression {expr!r}; only r, pi and e are allowed")
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        op, a, b = _BINOPS[type(node.op)], _compile(node.left, expr), _compile(node.right, expr)
        return lambda r: op(a(r), b(r))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNOPS:
        uop, a = _UNOPS[type(node.op)], _compile(node.operand, expr)
        return lambda r: uop(a(r))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        fname = node.func.id
        if fname not in _FUNCS:
            raise ValueError(f"function {fname!r} is not allowed in h expression {expr!r}; "
                             f"allowed: {_ALLOWED}")
        arity, fn = _FUNCS[fname]
        if node.keywords or len(node.args) != arity:
            raise ValueError(f"{fname} takes {arity} positional argument(s) in {ast.unparse(node)!r}")
        args = [_compile(a, expr) for a in node.args]
        return lambda r: fn(*(a(r) for a in args))
    raise ValueError(f"unsupported syntax {ast.unparse(node)!r} ({type(node).__name__}) in h expression "
                     f"{expr!r}; allowed: {_ALLOWED}")


MAX_DEPTH = 100  # the deepest nesting an h expression may have


def _depth(node: ast.AST) -> int:
    """The nesting depth of an expression tree, counted without recursion."""
    deepest, stack = 0, [(node, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


def parse_expression(expr: str) -> TensorFn:
    """Compile an expression in ``r`` (see the module docstring for the grammar) into h(r)."""
    if len(expr) > 1000:
        raise ValueError("h expression is too long (over 1000 characters)")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"cannot parse h expression {expr!r}: {e.msg}") from None
    except (RecursionError, MemoryError):
        raise ValueError(f"h expression is nested too deeply (at most {MAX_DEPTH} levels of operators and calls)") \
            from None
    if _depth(tree.body) > MAX_DEPTH:  # before compiling: both the compiler and h itself recurse per level
        raise ValueError(f"h expression is nested too deeply (at most {MAX_DEPTH} levels of operators and calls)")
    body = _compile(tree.body, expr)

    def h(r: Tensor) -> Tensor:
        out = body(r)
        return out if out.shape == r.shape else out.expand(r.shape).clone()

    return h


# ----------------------------------------------------------------------------------------------------------
# Proposition 1: f from h, tabulated on a log grid and Hermite-interpolated.

_TABLE_LOG_R = math.log(1e6)  # f is tabulated for r in [1e-6, 1e6] (where h is finite and >= 0)
_TABLE_HALF = 12_000  # nodes on each side of r = 1 (1e-4 and 1e4 are nodes too)
_CHECK_RANGE = (1e-4, 1e4)  # h must be finite and non-negative here


def _cumtrapz_from_center(y: Tensor, ds: float, c: int) -> Tensor:
    """Cumulative trapezoid integral of y(s) from s[c] to each s[i] on a uniform grid."""
    out = torch.zeros_like(y)
    out[c + 1:] = torch.cumsum((y[c:-1] + y[c + 1:]) * (ds / 2), 0)
    left = (y[:c] + y[1:c + 1]) * (ds / 2)
    out[:c] = -torch.flip(torch.cumsum(torch.flip(left, [0]), 0), [0])
    return out


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def from_h(h: TensorFn | str, name: str = "custom") -> Divergence:
    """Build the f-divergence whose weighting is h (Prop. 1): f'' = h/r^2, f(1) = f'(1) = 0.

    f(r) = int_1^r (r - u) h(u)/u^2 du = r A(r) - B(r) with A = int_1^r h(u)/u^2 du (= f') and
    B = int_1^r h(u)/u du, both integrated in s = log u (du = u ds) by the cumulative trapezoid rule on
    [1e-6, 1e6] (trimmed to where h is finite and >= 0), then evaluated by cubic Hermite interpolation in s
    using f and df/ds = r f'; outside the table f is continued linearly (which keeps it convex).
    The returned ``h`` is the given h itself, evaluated directly.
    """
    if isinstance(h, str):
        expr = h.strip()
        hfn = parse_expression(expr)
        what, description = f"h(r) = {expr}", f"custom h(r) = {expr} (Prop. 1)"
    elif callable(h):
        hfn, what, description = h, "h", "custom h (Prop. 1)"
    else:
        raise TypeError(f"h must be a callable or an expression string, got {type(h).__name__}")

    n, ds = _TABLE_HALF, _TABLE_LOG_R / _TABLE_HALF
    s = torch.arange(-n, n + 1, dtype=torch.float64) * ds
    r = torch.exp(s)  # r[n] == 1 exactly
    try:
        hv = torch.as_tensor(hfn(r), dtype=torch.float64).expand(r.shape)
    except Exception as e:  # a user callable may fail in many ways
        raise ValueError(f"evaluating {what} on a float64 tensor failed: {e}") from e
    valid = torch.isfinite(hv) & (hv >= 0)
    lo_c, hi_c = _CHECK_RANGE
    in_check = (r >= lo_c * (1 - 1e-9)) & (r <= hi_c * (1 + 1e-9))
    bad = (in_check & ~valid).nonzero()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{what} must be finite and non-negative on r in [{lo_c:g}, {hi_c:g}] (Prop. 1), "
                         f"but h({_fmt(r[i].item())}) = {_fmt(hv[i].item())}")
    if not (hv[in_check] > 0).any():
        raise ValueError(f"{what} is identically zero on [{lo_c:g}, {hi_c:g}]; it defines no divergence")

    # Keep the contiguous valid stretch around r = 1 (h may blow up beyond the checked range).
    invalid = (~valid).nonzero().flatten()
    lo = int(invalid[invalid < n].max()) + 1 if (invalid < n).any() else 0
    hi = int(invalid[invalid > n].min()) - 1 if (invalid > n).any() else 2 * n
    s, r, hv = s[lo:hi + 1], r[lo:hi + 1], hv[lo:hi + 1]
    c = n - lo
    A = _cumtrapz_from_center(hv * torch.exp(-s), ds, c)  # f'(r)
    B = _cumtrapz_from_center(hv, ds, c)
    F_tab = r * A - B  # f(r)
    D_tab = r * A  # df/ds

    slopes = torch.diff(F_tab) / torch.diff(r)
    d2 = torch.diff(slopes)
    noise = (F_tab[:-2].abs() + F_tab[1:-1].abs() + F_tab[2:].abs()) / torch.diff(r)[1:]  # rounding in slopes
    tol = 1e-9 * (1 + slopes[1:].abs()) + 1e-12 * noise
    nonconvex = (d2 < -tol).nonzero()
    if len(nonconvex):
        i = int(nonconvex[0]) + 1
        raise ValueError(f"the f tabulated from {what} is not convex near r = {_fmt(r[i].item())} "
                         f"(second difference {d2[i - 1].item():.3g})")

    s0, m = float(s[0]), len(s)
    r_lo, r_hi = float(r[0]), float(r[-1])
    f_lo, f_hi, a_lo, a_hi = float(F_tab[0]), float(F_tab[-1]), float(A[0]), float(A[-1])

    def f(x: Tensor) -> Tensor:
        x64 = x.to(torch.float64)
        Ft, Dt = F_tab.to(x64.device), D_tab.to(x64.device)
        u = (torch.log(x64.clamp(r_lo, r_hi)) - s0) / ds
        i = u.detach().floor().clamp(0, m - 2).long()
        t = u - i
        t2, t3 = t * t, t * t * t
        inner = ((2 * t3 - 3 * t2 + 1) * Ft[i] + (t3 - 2 * t2 + t) * ds * Dt[i]
                 + (3 * t2 - 2 * t3) * Ft[i + 1] + (t3 - t2) * ds * Dt[i + 1])
        out = torch.where(x64 < r_lo, f_lo + a_lo * (x64 - r_lo),
                          torch.where(x64 > r_hi, f_hi + a_hi * (x64 - r_hi), inner))
        return out.to(x.dtype)

    return Divergence(name, f, hfn, "-", description)


# ----------------------------------------------------------------------------------------------------------


def _registered(name: str) -> Divergence | None:
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    return _REGISTRY.get(_ALIASES.get(key, key))


def check(name: str | TensorFn | Divergence) -> None:
    """Raise ValueError unless ``name`` is a registered name/alias, an h expression that parses, a
    callable or a Divergence. Cheap: a custom h's f (Prop. 1) is not built here."""
    if isinstance(name, str) and _registered(name) is None:
        try:
            parse_expression(name)
        except ValueError as e:
            raise ValueError(f"unknown divergence {name!r}: valid names are {', '.join(names())} (aliases: "
                             f"{', '.join(sorted(_ALIASES))}), or an expression h(r) ({e})") from None
    elif not (isinstance(name, (str, Divergence)) or callable(name)):
        raise TypeError(f"expected a divergence name, expression, callable h or Divergence, "
                        f"got {type(name).__name__}")


def get(name: str | TensorFn | Divergence) -> Divergence:
    """Resolve a name/alias (case-insensitive, '-' = '_'), a Divergence, a callable h or an h expression.
    A custom h builds its f by Prop. 1 (``from_h``), so resolve once per run and keep the result."""
    check(name)
    if isinstance(name, Divergence):
        return name
    if isinstance(name, str):
        return _registered(name) or from_h(name, name=name.strip())
    return from_h(name)
