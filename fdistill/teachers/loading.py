"""Teachers from files: fdistill's own ``.safetensors``, NVlabs/edm ``.pkl`` snapshots and diffusers folders,
each presented as a denoiser ``D(x, sigma, cond)``; and the networks a distillation checkpoint rebuilds."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from fdistill.io import atomic_path
from fdistill.networks import edm
from fdistill.networks.edm_kwargs import check_network_kwargs
from fdistill.safe_pickle import one_line

TEACHER_FILE = "teacher.safetensors"  # what `fdistill train-teacher` writes into its run folder
TEACHER_KINDS = (f"a .safetensors from `fdistill train-teacher` (or its run folder holding {TEACHER_FILE}), "
                 "an NVlabs/edm .pkl snapshot, or a diffusers model folder")


def build_network(precond: str, kwargs: dict) -> nn.Module:
    """A randomly initialised network: an EDM preconditioning class with its constructor kwargs, or
    "diffusers" with ``load_diffusers_teacher``'s kwargs (the UNet and scheduler configs)."""
    if precond == "diffusers":
        from fdistill.teachers.diffusers_unet import build_diffusers_network

        return build_diffusers_network(kwargs)
    if precond not in edm.PRECONDS:
        raise ValueError(f"unknown preconditioning {precond!r}; expected one of "
                         f"{(*edm.PRECONDS, 'diffusers')}")
    check_network_kwargs(precond, kwargs)
    for name in ("img_resolution", "img_channels"):
        if name not in kwargs:
            raise ValueError(f"network kwargs lack {name!r} (the image size the network is built for)")
    return getattr(edm, precond)(**kwargs)


def save_network(net: nn.Module, precond: str, kwargs: dict, path: str | Path) -> Path:
    """Weights as safetensors; the constructor (class and kwargs) in the file's metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"fdistill": json.dumps({"precond": precond, "kwargs": kwargs})}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, tmp, metadata=meta)
    return path


def _what_is_there(path: Path) -> str:
    if not path.exists():
        return "nothing is there"
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir())[:8]
        return f"it is a folder holding {names}" if names else "it is an empty folder"
    return f"it is a {path.stat().st_size}-byte file"


def load_network(path: str | Path) -> tuple[nn.Module, str, dict]:
    """Load a teacher: a ``.safetensors`` written by ``save_network`` (or a folder holding ``teacher.safetensors``),
    an NVlabs/edm ``.pkl`` snapshot (``edm_pickle``) or a local diffusers folder with a DDPM ``UNet2DModel``
    (``diffusers_unet``, precond "diffusers"). Returns (net in eval mode, precond, constructor kwargs)."""
    path = Path(path)
    if path.suffix == ".pkl":  # an NVlabs/edm snapshot, loaded without running any of its code
        from fdistill.teachers.edm_pickle import load_edm_pickle

        return load_edm_pickle(path)
    if path.is_dir() and (path / TEACHER_FILE).is_file():  # a `fdistill train-teacher` run folder
        path = path / TEACHER_FILE
    elif path.is_dir() and ((path / "model_index.json").is_file() or (path / "config.json").is_file()):
        from fdistill.teachers.diffusers_unet import load_diffusers_teacher

        return load_diffusers_teacher(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher {path}: {_what_is_there(path)}; expected {TEACHER_KINDS}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = (f.metadata() or {}).get("fdistill")
            if meta is None:
                raise ValueError(f"{path} has no fdistill metadata (constructor kwargs); was it written by fdistill?")
            spec = _read_spec(path, meta)
            try:
                net = build_network(spec["precond"], spec["kwargs"])
            except (ValueError, TypeError, KeyError, RuntimeError, NotImplementedError) as e:
                raise ValueError(f"teacher {path}: its metadata does not describe a network fdistill can build "
                                 f"({one_line(e, 600)})") from None
            try:
                net.load_state_dict({k: f.get_tensor(k) for k in f.keys()}, strict=True)  # noqa: SIM118
            except (RuntimeError, ValueError, KeyError) as e:
                raise ValueError(f"teacher {path}: its weights do not fit the network its metadata describes "
                                 f"({one_line(e, 600)})") from None
    except (SafetensorError, OSError) as e:
        raise ValueError(f"teacher {path} is not a readable safetensors file ({e}); expected {TEACHER_KINDS}") from None
    return net.eval(), spec["precond"], spec["kwargs"]


def _read_spec(path: Path, meta: str) -> dict:
    """The ``{"precond": ..., "kwargs": {...}}`` record in a teacher file's metadata, checked for shape."""
    try:
        spec = json.loads(meta)
    except (json.JSONDecodeError, RecursionError):
        raise ValueError(f"teacher {path}: its fdistill metadata is not JSON; expected "
                         '{"precond": ..., "kwargs": {...}} as `fdistill train-teacher` writes it') from None
    if not (isinstance(spec, dict) and isinstance(spec.get("precond"), str) and isinstance(spec.get("kwargs"), dict)):
        got = f"a mapping with keys {sorted(spec)[:8]}" if isinstance(spec, dict) else f"a JSON {type(spec).__name__}"
        raise ValueError(f"teacher {path}: its fdistill metadata is {got}; expected "
                         '{"precond": ..., "kwargs": {...}} as `fdistill train-teacher` writes it')
    return spec
