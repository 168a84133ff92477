"""Unpickling without running code: one restricted unpickler with one allow-list policy.

Plain ``pickle.load`` can call any global a file names. Here a file may only name the globals in an
explicit allow-list (module, name) -> object; anything else is refused with an error naming it.
CIFAR-10 python batches (``fdistill.data``) and NVlabs/edm network snapshots
(``fdistill.teachers.edm_pickle``) each pass their own list.
"""

from __future__ import annotations

import pickle
from typing import Any, BinaryIO

import numpy as np

_multiarray = getattr(np, "_core", None) or np.core  # numpy >= 2 renamed numpy.core to numpy._core

# numpy arrays, dtypes and scalars, under numpy 1's and numpy 2's module names.
NUMPY_GLOBALS: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
for _mod in ("numpy.core", "numpy._core"):
    NUMPY_GLOBALS[(f"{_mod}.multiarray", "_reconstruct")] = _multiarray.multiarray._reconstruct
    NUMPY_GLOBALS[(f"{_mod}.multiarray", "scalar")] = _multiarray.multiarray.scalar
    NUMPY_GLOBALS[(f"{_mod}.numeric", "_frombuffer")] = _multiarray.numeric._frombuffer


class UnreadablePickle(pickle.UnpicklingError, ValueError):
    """A file that is no readable pickle, or names a global outside the allow-list: one line saying so (a
    ValueError too, so a command reports it as a mistake in its input)."""


# What unpickling a damaged or hostile file raises (a truncated stream, a bad opcode, an allowed callable
# given the wrong arguments, a claimed length beyond memory, a structure nested past the recursion limit).
LOAD_ERRORS = (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, KeyError, IndexError,
               RuntimeError, RecursionError, MemoryError, OverflowError, UnicodeDecodeError)


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line of at most ``limit`` characters, after its type's name (but a plain
    ValueError's, whose message is fdistill's own)."""
    text = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
    if type(e) is not ValueError:  # the kind says what went wrong (RecursionError, EOFError, ...)
        text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of ``allowed`` (to the objects given there)."""

    def __init__(self, file: BinaryIO, allowed: dict[tuple[str, str], Any], **kwargs) -> None:
        super().__init__(file, **kwargs)
        self.allowed = allowed

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UnreadablePickle(f"refusing to unpickle global {module}.{name}: the file may only use "
                                   f"{sorted(f'{m}.{n}' for m, n in self.allowed)}") from None


def restricted_load(file: BinaryIO, allowed: dict[tuple[str, str], Any], **kwargs) -> Any:
    """``pickle.load`` through ``RestrictedUnpickler`` (kwargs: e.g. ``encoding="bytes"``). Whatever a damaged
    file makes the unpickler raise becomes one ``UnreadablePickle`` (the reason on one line)."""
    try:
        return RestrictedUnpickler(file, allowed, **kwargs).load()
    except UnreadablePickle:
        raise
    except LOAD_ERRORS as e:
        raise UnreadablePickle(f"not a readable pickle ({one_line(e)})") from None
