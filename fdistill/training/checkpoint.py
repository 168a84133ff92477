"""Checkpoints as safetensors (all tensors) plus JSON (everything else), with RNG states for exact resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor


def _flatten(prefix: str, obj: Any, tensors: dict[str, Tensor]) -> Any:
    """Move every tensor in a nested dict/list into ``tensors`` under a dotted key; return the rest."""
    if isinstance(obj, Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {str(k): _flatten(f"{prefix}.{k}", v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_flatten(f"{prefix}.{i}", v, tensors) for i, v in enumerate(obj)]
    return obj


def _unflatten(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def _int_keys(state: dict) -> dict:
    """JSON turned optimizer state indices into strings; torch wants them back as ints."""
    return {int(k): v for k, v in state.items()}


def rng_state() -> dict[str, Tensor | list[Tensor]]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: str | Path, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
         meta: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` (module weights), ``state.safetensors`` + ``state.json``
    (optimizers, RNG, ``meta``: JSON values and tensors) into directory ``path``; written to a temp
    dir, then renamed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    weights = {f"{name}.{k}": v.detach().cpu().contiguous().clone()
               for name, m in modules.items() for k, v in m.state_dict().items()}
    save_file(weights, tmp / "model.safetensors")
    tensors: dict[str, Tensor] = {}
    state = {
        "optimizers": {n: _flatten(f"optim.{n}", o.state_dict(), tensors) for n, o in optimizers.items()},
        "rng": _flatten("rng", rng_state(), tensors),
        "meta": _flatten("meta", meta, tensors),
    }
    save_file(tensors, tmp / "state.safetensors")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if path.exists():
        for f in path.iterdir():
            f.unlink()
        path.rmdir()
    tmp.rename(path)
    return path


def _module_weights(weights: dict[str, Tensor], name: str) -> dict[str, Tensor]:
    """The entries of module ``name`` in a checkpoint's weights, without the ``name.`` prefix."""
    return {k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")}


def _check_files(path: Path) -> None:
    for name in ("model.safetensors", "state.safetensors", "state.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint {path} is missing {name}")


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``meta`` a checkpoint was saved with (iteration, config, info), without loading any weights.
    Tensors in it come back as tensors."""
    path = Path(path)
    _check_files(path)
    state = json.loads((path / "state.json").read_text())
    return _unflatten(state["meta"], load_file(path / "state.safetensors"))


def load(path: str | Path, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
         restore_rng: bool = True) -> dict[str, Any]:
    """Load a checkpoint written by ``save`` into existing modules/optimizers (strict); returns ``meta``."""
    path = Path(path)
    _check_files(path)
    weights = load_file(path / "model.safetensors")
    for name, m in modules.items():
        m.load_state_dict(_module_weights(weights, name), strict=True)
    tensors = load_file(path / "state.safetensors")
    state = json.loads((path / "state.json").read_text())
    for name, opt in optimizers.items():
        sd = _unflatten(state["optimizers"][name], tensors)
        sd["state"] = _int_keys(sd["state"])
        opt.load_state_dict(sd)
    if restore_rng:
        set_rng_state(_unflatten(state["rng"], tensors))
    return _unflatten(state["meta"], tensors)


def load_weights(path: str | Path, name: str) -> dict[str, Tensor]:
    """The state dict of one module (e.g. ``generator_ema``) from a checkpoint directory or file."""
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no weights at {file}")
    weights = load_file(file)
    sub = _module_weights(weights, name)
    if not sub:
        names = sorted({k.split(".")[0] for k in weights})
        raise KeyError(f"{file} holds no module {name!r}; it holds {names}")
    return sub
