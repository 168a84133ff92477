"""The checks every config dataclass runs in ``__post_init__``: one ``ValueError`` naming the key, the value
and what is expected (``batch_size must be a positive integer, got '0'``), so the CLI and the Python API refuse
the same things with the same words. ``fdistill.config.from_dict`` prefixes the section (``distill: ...``);
the value is quoted as an override spells it, so ``fdistill.config.load`` can name the override it came from."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def show(value: Any) -> str:
    """A value as a message quotes it: ``'0'``, ``'2'`` (a float with no fraction as an override writes it),
    ``'nan'``, ``'fp16'``."""
    if isinstance(value, float) and math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        value = int(value)
    return f"'{value}'"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(name: str, value: Any, minimum: int | None = None, maximum: int | None = None,
            none: bool = False) -> None:
    """``value`` is an int in [minimum, maximum] (or None when ``none``)."""
    if value is None and none:
        return
    ok = _is_int(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        what = "a positive integer" if minimum == 1 and maximum is None else \
            "a non-negative integer" if minimum == 0 and maximum is None else \
            f"an integer in [{minimum}, {maximum}]" if minimum is not None and maximum is not None else \
            f"an integer >= {minimum}" if minimum is not None else \
            f"an integer <= {maximum}" if maximum is not None else "an integer"
        raise ValueError(f"{name} must be {what}{' or null' if none else ''}, got {show(value)}")


def number(name: str, value: Any, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False, none: bool = False, what: str | None = None) -> None:
    """``value`` is a finite number in the interval from ``low`` to ``high`` (each end closed unless ``*_open``;
    None: unbounded), or None when ``none``. ``what`` words the expectation (default: the interval)."""
    if value is None and none:
        return
    ok = _is_number(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if what is None:
            if low is not None and high is not None:
                what = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            elif low is not None:
                what = f"a finite number {'>' if low_open else '>='} {low:g}"
                what = "a positive number" if (low, low_open) == (0, True) else \
                    "a non-negative number" if (low, low_open) == (0, False) else what
            elif high is not None:
                what = f"a finite number {'<' if high_open else '<='} {high:g}"
            else:
                what = "a finite number"
        raise ValueError(f"{name} must be {what}{' or null' if none else ''}, got {show(value)}")


def choice(name: str, value: Any, options: Iterable[str]) -> None:
    options = tuple(options)
    if value not in options:
        listed = ", ".join(repr(o) for o in options[:-1]) + f" or {options[-1]!r}" if len(options) > 1 \
            else repr(options[0])
        raise ValueError(f"{name} must be {listed}, got {show(value)}")


def below(low_name: str, low: Any, high_name: str, high: Any, why: str = "") -> None:
    """Refuse ``low >= high`` for a range given as two keys (checked as numbers first)."""
    if low >= high:
        raise ValueError(f"{low_name} must be below {high_name}{' (' + why + ')' if why else ''}, got {low_name} "
                         f"{show(low)} and {high_name} {show(high)}")
