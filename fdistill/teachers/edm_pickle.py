"""Load NVlabs/edm network pickles (e.g. ``edm-cifar10-32x32-cond-vp.pkl``) without their code and
without executing anything stored in the file.

EDM pickles each network as a call of ``torch_utils.persistence._reconstruct_persistent_obj(meta)``
whose ``meta`` carries the module's *source text* (``module_src``), the class name and the object's
``__dict__`` (parameters, buffers, submodules, constructor kwargs). Plain ``pickle.load`` would
execute ``module_src``. Here a restricted unpickler allows only the globals such files need
(tensor and storage rebuilding, ``OrderedDict``, numpy scalars, torch containers as inert records),
turns every persistence record into data, and refuses anything else with an error naming it.
The state dict and constructor kwargs are then read out of the records and loaded strictly into
``fdistill.networks.edm``'s classes.
"""

from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fdistill import require_torch
from fdistill.safe_pickle import LOAD_ERRORS, NUMPY_GLOBALS, UnreadablePickle, one_line, restricted_load

require_torch()  # its torch.load(weights_only=True) must not load TorchScript


EXPECTED = "expected an NVlabs/edm training snapshot (network-snapshot-*.pkl, e.g. edm-cifar10-32x32-cond-vp.pkl)"


class Record:
    """An inert stand-in for an object the file describes (a persistence record or a torch container)."""

    def __init__(self, class_name: str, state: dict | None = None) -> None:
        self.class_name, self.state = class_name, dict(state or {})

    def __setstate__(self, state: Any) -> None:  # BUILD on a container record: keep the data, run nothing
        self.state = dict(state) if isinstance(state, dict) else {"state": state}


class _AttrDict(dict):
    """dnnlib.EasyDict as a plain dict (BUILD state is ignored)."""

    def __setstate__(self, state: Any) -> None:
        pass


def _persistent_record(meta: dict) -> Record:
    """Stand-in for torch_utils.persistence._reconstruct_persistent_obj: keeps meta, never runs module_src."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or "state" not in meta:
        raise pickle.UnpicklingError("malformed persistence record (expected type='class' with a state)")
    return Record(str(meta.get("class_name")), meta["state"])


def _load_storage(b: bytes):
    """torch.storage._load_from_bytes, but through torch.load's weights-only unpickler."""
    return torch.load(io.BytesIO(b), weights_only=True)


def _newobj_record(name: str) -> type:
    """A class that NEWOBJ can instantiate in place of a torch container; it only stores its state."""

    class _R(Record):
        def __new__(cls, *args, **kwargs):
            obj = object.__new__(cls)
            Record.__init__(obj, name)
            return obj

        def __init__(self, *args, **kwargs) -> None:
            pass

    _R.__name__ = name
    return _R


ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("dnnlib.util", "EasyDict"): _AttrDict,
    ("torch.nn.modules.container", "ModuleDict"): _newobj_record("ModuleDict"),
    ("torch.nn.modules.container", "ModuleList"): _newobj_record("ModuleList"),
    ("torch.nn.modules.container", "Sequential"): _newobj_record("Sequential"),
    **NUMPY_GLOBALS,
}


def _state_dict(record: Record, prefix: str = "") -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of a module record, named as nn.Module.state_dict would."""
    state = record.state
    out: dict[str, torch.Tensor] = {}
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, t in (state.get(group) or {}).items():
            if t is not None and name not in skip:
                out[prefix + name] = t.detach() if isinstance(t, torch.Tensor) else torch.as_tensor(t)
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, Record):
            out.update(_state_dict(child, f"{prefix}{name}."))
    return out


def load_edm_pickle(path: str | Path, key: str = "ema") -> tuple[nn.Module, str, dict]:
    """Load the network ``key`` of an NVlabs/edm snapshot pickle as fdistill's EDM class.

    Returns (network in eval mode, preconditioning class name, constructor kwargs); nothing in the file runs.
    Raises ``UnreadablePickle`` (a pickle.UnpicklingError and a ValueError), one line naming the file, for a
    global outside the allow-list and for anything else that keeps the file from being such a snapshot.
    """
    from fdistill.networks import edm

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"EDM pickle not found: {path}")
    not_snapshot = f"{path} is not a readable NVlabs/edm network snapshot"
    try:
        with open(path, "rb") as f:
            data = restricted_load(f, ALLOWED)
    except UnreadablePickle as e:
        raise UnreadablePickle(f"{not_snapshot}: {e}; {EXPECTED}") from None
    record = data.get(key) if isinstance(data, dict) else data
    if not isinstance(record, Record):
        keys = sorted(str(k) for k in data)[:8] if isinstance(data, dict) else f"a {type(data).__name__}"
        raise UnreadablePickle(f"{path}: no network under {key!r} (found {keys}); {EXPECTED}")
    precond = record.class_name
    if precond not in edm.PRECONDS:
        raise UnreadablePickle(f"{path}: {key!r} is a {precond[:80]}, not one of {', '.join(edm.PRECONDS)}")
    try:
        from fdistill.networks.edm_kwargs import check_network_kwargs

        args, kwargs = tuple(record.state.get("_init_args") or ()), dict(record.state.get("_init_kwargs") or {})
        if args:
            names = ["img_resolution", "img_channels", "label_dim", "use_fp16"]
            kwargs.update(dict(zip(names, args)))
        check_network_kwargs(precond, kwargs, "constructor")
        net = getattr(edm, precond)(**kwargs)
        net.load_state_dict(_state_dict(record), strict=True)
    except LOAD_ERRORS as e:  # constructor kwargs or weights that do not make the network the file names
        raise UnreadablePickle(f"{not_snapshot} ({precond} under {key!r}: {one_line(e)}); {EXPECTED}") from None
    return net.eval(), precond, kwargs
