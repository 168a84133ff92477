"""Which family a teacher belongs to, decided once: from its path when it is opened, from a checkpoint's
record when a run is reloaded. The families are the modules of ``fdistill/teachers/families/``, each registering
its ``Teacher`` subclass (``teachers.base.register``); a new family is a new module there, nothing here."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from fdistill.teachers import families as _families
from fdistill.teachers.base import FAMILIES, Teacher

# Records written before info["family"] existed name the family by "precond" (and, for pipelines, by the
# variant in info["network"]["family"]); every other precond was an image network's preconditioning.
_LEGACY_PIPELINES = ("stable_diffusion", "flow_matching")


def families() -> list[type[Teacher]]:
    """Every registered family, in the order they are asked about a path (catch-alls last)."""
    for module in pkgutil.iter_modules(_families.__path__):
        importlib.import_module(f"{_families.__name__}.{module.name}")
    return sorted(FAMILIES.values(), key=lambda f: (f.order, f.kind))


def family_named(kind: str, where: str = "the checkpoint") -> type[Teacher]:
    known = {f.kind: f for f in families()}
    if kind not in known:
        raise ValueError(f"{where} names teacher family {kind!r:.60}, which this fdistill does not know; expected one "
                         f"of: {', '.join(known)}")
    return known[kind]


def family_of(path: str | Path) -> type[Teacher]:
    """The family that recognises ``path`` (the image family takes any other file or folder and says why not)."""
    return next(f for f in families() if f.recognises(path))


def open_teacher(path: str | Path, resolution: int | None = None, options: dict | None = None) -> Teacher:
    """The teacher at ``path``, at ``resolution`` pixels (default the teacher's own) with ``options`` (the config's
    ``teacher_options:``, checked by the family's ``Options``): a pipeline folder of a text-to-image family, or an
    image denoiser (a fdistill teacher file or run folder, an NVlabs/edm .pkl, a diffusers UNet folder)."""
    return family_of(path).open(path, resolution, options)


def record_family(info: dict) -> str:
    """The family a checkpoint's ``info`` names: ``info["family"]``, or for a record written before that key
    existed, what its ``precond`` meant then."""
    if "family" in info:
        return info["family"]
    precond = info.get("precond")
    if precond in _LEGACY_PIPELINES:
        return info["network"]["family"]
    return "image"


def teacher_from_info(info: dict, where: str = "the checkpoint") -> Teacher:
    """The teacher a checkpoint's ``info`` records."""
    return family_named(record_family(info), where).from_info(info, where)
