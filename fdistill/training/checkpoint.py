"""Checkpoints as safetensors (all tensors) plus JSON (everything else), with RNG states for exact resume;
written crash-safe, verified on load, named by iteration in a run folder and pruned to the newest few."""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from fdistill.io import atomic_dir, other_temps, sha256


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
    """JSON turned optimizer state indices into strings; torch wants them back as ints (a sharded run's
    optimizer states are keyed by parameter name and stay so)."""
    return {int(k) if k.isdigit() else k: v for k, v in state.items()}


def rng_state() -> dict[str, Tensor | list[Tensor]]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


FILES = ("model.safetensors", "state.safetensors", "state.json")
CHECKPOINTS = "checkpoints"  # a run folder's checkpoints: checkpoints/<iteration, 9 digits>/


def _state(obj) -> dict:
    """A module's or optimizer's state dict, or a state dict given as such (e.g. gathered from shards)."""
    return obj if isinstance(obj, dict) else obj.state_dict()


def save(path: str | Path, modules: dict[str, torch.nn.Module | dict],
         optimizers: dict[str, torch.optim.Optimizer | dict], meta: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` (module weights), ``state.safetensors`` + ``state.json`` (optimizers, RNG,
    ``meta``: JSON values and tensors, and the size and sha256 of both safetensors files) into folder ``path``.

    Crash-safe at every instant: the files go into a temporary sibling folder and are fsynced, the folder
    is renamed to ``path`` and the parent fsynced, so ``path`` is either absent or complete and durable;
    any other checkpoint is untouched. On an error (e.g. a full disk) the temporary folder is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_dir(path, durable=True) as tmp:  # the same iteration again: the old one is put aside first
            weights = {f"{name}.{k}": v.detach().cpu().contiguous().clone()
                       for name, m in modules.items() for k, v in _state(m).items()}
            save_file(weights, tmp / "model.safetensors")
            tensors: dict[str, Tensor] = {}
            state = {
                "optimizers": {n: _flatten(f"optim.{n}", _state(o), tensors) for n, o in optimizers.items()},
                "rng": _flatten("rng", rng_state(), tensors),
                "meta": _flatten("meta", meta, tensors),
            }
            save_file(tensors, tmp / "state.safetensors")
            state["files"] = {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256(tmp / name)}
                              for name in FILES[:2]}
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
    except OSError as e:  # e.g. a full disk: say what was being written and what is kept
        raise OSError(e.errno, f"writing checkpoint {path} failed ({e.strerror or e}); nothing of it was kept, "
                      "earlier checkpoints are untouched") from e
    return path


def _read_state(path: Path) -> dict:
    """state.json of checkpoint ``path``, after checking that every file is there with the recorded size."""
    for name in FILES:
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint {path} is missing {name}")
    try:
        state = json.loads((path / "state.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint {path}: state.json is damaged ({e})") from None
    except RecursionError:
        raise ValueError(f"checkpoint {path}: state.json is nested too deeply to be a checkpoint's") from None
    _check_state(path, state)
    for name, rec in state.get("files", {}).items():
        size = (path / name).stat().st_size
        if size != rec["bytes"]:
            raise ValueError(f"checkpoint {path}: {name} is truncated or damaged ({size} bytes, "
                             f"{rec['bytes']} expected)")
    return state


STATE_KEYS = ("optimizers", "rng", "meta")  # what state.json holds besides "files"
META_KEYS = {"iteration": int, "config": dict, "info": dict}  # what a training run's checkpoint meta holds


def _check_state(path: Path, state: Any) -> None:
    """state.json's shape as ``save`` writes it, or one line naming the checkpoint and the key at fault."""
    where = f"checkpoint {path}: state.json"
    if not isinstance(state, dict):
        raise ValueError(f"{where} holds a JSON {type(state).__name__}, not a checkpoint record (expected the keys "
                         f"{', '.join(STATE_KEYS)})")
    for key in STATE_KEYS:
        if not isinstance(state.get(key), dict):
            what = "lacks" if key not in state else f"has a {type(state[key]).__name__} under"
            raise ValueError(f"{where} {what} {key!r}; expected a mapping there, as fdistill writes it")
    files = state.get("files", {})
    if not isinstance(files, dict) or set(files) - set(FILES[:2]) or not all(
            isinstance(r, dict) and isinstance(r.get("bytes"), int) and isinstance(r.get("sha256"), str)
            for r in files.values()):
        raise ValueError(f"{where}: 'files' must map {' and '.join(FILES[:2])} to their bytes and sha256")


def _verify(path: Path, state: dict) -> None:
    for name, rec in state.get("files", {}).items():
        if sha256(path / name) != rec["sha256"]:
            raise ValueError(f"checkpoint {path}: {name} is corrupt (its sha256 differs from the one recorded)")


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``run_dir/checkpoints`` (all files present with their recorded
    sizes), or None. Incomplete ones are skipped with a warning; temporary folders are ignored."""
    folder = Path(run_dir) / CHECKPOINTS
    found = sorted((p for p in folder.glob("*") if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    for path in reversed(found):
        try:
            _read_state(path)
            return path
        except (OSError, ValueError) as e:
            warnings.warn(f"skipping an incomplete checkpoint: {e}", stacklevel=2)
    return None


def _complete(path: Path) -> bool:
    try:
        _read_state(path)
        return True
    except (OSError, ValueError):
        return False


def prune(run_dir: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints of ``run_dir`` (by iteration) and remove the rest (an
    incomplete one, skipped by a resume, does not take a good one's place), and any temporary folder left
    by an interrupted save."""
    folder = Path(run_dir) / CHECKPOINTS
    found = sorted((p for p in folder.glob("*") if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    kept = [p for p in found if _complete(p)][-max(keep, 1):]
    for path in found:
        if path not in kept:
            shutil.rmtree(path)
    for stale in other_temps(folder):
        shutil.rmtree(stale, ignore_errors=True)


def checkpoint_path(run_dir: str | Path, iteration: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{iteration:09d}"


def resolve(path: str | Path) -> Path:
    """A checkpoint folder given either directly or as the run folder holding it (its newest one)."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    if (path / CHECKPOINTS).is_dir():
        found = latest(path)
        if found is None:
            raise FileNotFoundError(f"{path}/{CHECKPOINTS} holds no complete checkpoint")
        return found
    what = "nothing is there" if not path.exists() else \
        f"a folder holding {sorted(p.name for p in path.iterdir())[:8]}" if path.is_dir() else "a file"
    raise FileNotFoundError(f"{path} is not a checkpoint or a run folder ({what}); expected a run folder with "
                            f"{CHECKPOINTS}/ or a checkpoint folder with {', '.join(FILES)}")


def _module_weights(weights: dict[str, Tensor], name: str) -> dict[str, Tensor]:
    """The entries of module ``name`` in a checkpoint's weights, without the ``name.`` prefix."""
    return {k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")}


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``meta`` a checkpoint was saved with (iteration, config, info), without loading any weights.
    Tensors in it come back as tensors."""
    path = resolve(path)
    state = _read_state(path)
    try:
        tensors = load_file(path / "state.safetensors")
    except SafetensorError as e:
        raise ValueError(f"checkpoint {path}: state.safetensors is damaged ({e})") from None
    meta = _unflatten_checked(path, state["meta"], tensors)
    where = f"checkpoint {path}: state.json's meta"
    for key, kind in META_KEYS.items():
        if key not in meta:
            raise ValueError(f"{where} lacks {key!r} (expected {', '.join(META_KEYS)}, as fdistill writes them)")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise ValueError(f"{where}.{key} must be {'a mapping' if kind is dict else 'an integer'}, got "
                             f"{meta[key]!r:.80}")
    info = meta["info"]
    if "family" in info or "precond" in info or "network" in info:
        name = info.get("family", info.get("precond"))
        if not (isinstance(name, str) and isinstance(info.get("network"), dict)):
            raise ValueError(f"{where}.info must hold 'family' (a name) and 'network' (the generator's "
                             "constructor kwargs)")
        from fdistill.networks.edm import PRECONDS

        if info.get("precond") in PRECONDS:
            from fdistill.networks.edm_kwargs import check_network_kwargs

            try:
                check_network_kwargs(info["precond"], info["network"], "info.network")
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
    return meta


def _unflatten_checked(path: Path, obj: Any, tensors: dict[str, Tensor]) -> Any:
    """``_unflatten``, with what a damaged or foreign state.json makes it raise as one line naming the checkpoint."""
    try:
        return _unflatten(obj, tensors)
    except KeyError as e:
        raise ValueError(f"checkpoint {path}: state.json refers to tensor {e.args[0]!r:.80}, which state.safetensors "
                         "lacks") from None
    except (RecursionError, TypeError) as e:
        raise ValueError(f"checkpoint {path}: state.json is not a checkpoint record fdistill wrote "
                         f"({type(e).__name__})") from None


@dataclass
class Contents:
    """A checkpoint read back: weights by module, optimizer states by name, the RNG state and ``meta``."""

    path: Path
    weights: dict[str, dict[str, Tensor]]
    optimizers: dict[str, dict]
    rng: dict
    meta: dict[str, Any]


def read(path: str | Path) -> Contents:
    """Read a checkpoint written by ``save`` (a checkpoint folder, or a run folder: its newest), after
    verifying the sizes and checksums of its files."""
    path = resolve(path)
    state = _read_state(path)
    _verify(path, state)
    weights = load_file(path / "model.safetensors")
    names = {k.split(".")[0] for k in weights}
    tensors = load_file(path / "state.safetensors")
    optimizers = {}
    for name, flat in state["optimizers"].items():
        optimizers[name] = _unflatten(flat, tensors)
        optimizers[name]["state"] = _int_keys(optimizers[name]["state"])
    return Contents(path, {n: _module_weights(weights, n) for n in names}, optimizers,
                    _unflatten(state["rng"], tensors), _unflatten(state["meta"], tensors))


def load_module(contents: Contents, name: str, module: torch.nn.Module, load=None) -> None:
    """Module ``name``'s weights into ``module`` (strict; ``load(module, state_dict)`` instead of
    ``module.load_state_dict`` when given), with an error naming what does not fit."""
    try:
        (load or (lambda m, sd: m.load_state_dict(sd, strict=True)))(module, contents.weights.get(name, {}))
    except (RuntimeError, KeyError, ValueError) as e:
        detail = " ".join(str(e).split())[:300]
        raise ValueError(f"checkpoint {contents.path} does not fit this run's {name}: {detail}") from None


def load(path: str | Path, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
         restore_rng: bool = True) -> dict[str, Any]:
    """Load a checkpoint written by ``save`` into existing modules/optimizers (strict), after verifying the
    checksums of its files; returns ``meta``."""
    contents = read(path)
    for name, m in modules.items():
        load_module(contents, name, m)
    for name, opt in optimizers.items():
        opt.load_state_dict(contents.optimizers[name])
    if restore_rng:
        set_rng_state(contents.rng)
    return contents.meta


def load_weights(path: str | Path, name: str, fallback: str | None = None) -> dict[str, Tensor]:
    """The state dict of one module (e.g. ``generator_ema``, else ``fallback`` when the checkpoint has none)
    from a checkpoint (a run folder, a checkpoint folder, whose checksums are verified, or its model.safetensors)."""
    path = Path(path)
    if path.is_dir() or not path.exists():
        path = resolve(path)
        _verify(path, _read_state(path))
        path = path / "model.safetensors"
    weights = load_file(path)
    sub = _module_weights(weights, name) or (_module_weights(weights, fallback) if fallback else {})
    if not sub:
        names = sorted({k.split(".")[0] for k in weights})
        raise KeyError(f"{path} holds no module {name!r}; it holds {names}")
    return sub
