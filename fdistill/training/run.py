"""A run folder, the unit a user thinks in: ``config.yaml`` (the resolved configuration and where the
teacher and data came from, written at start), ``log.jsonl``, ``checkpoints/<iteration>/`` and
``tensorboard/``. What ``--resume`` and ``--overwrite`` do with one, and what a command finds in one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from fdistill import __version__
from fdistill.config import RUN_CONFIG, to_dict
from fdistill.training import checkpoint

ARTIFACTS = (RUN_CONFIG, "log.jsonl", checkpoint.CHECKPOINTS, "tensorboard")  # what --overwrite removes


def read(run_dir: str | Path) -> dict | None:
    """``{"run": {...}, "config": {...}}`` from ``run_dir/config.yaml``, or None when there is none."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML ({e})") from None
    if not isinstance(data, dict) or set(data) != {"run", "config"}:
        raise ValueError(f"{path} is not a run record (expected the keys 'run' and 'config')")
    return data


def describe(run_dir: str | Path) -> str | None:
    """What a folder holds, in words (e.g. "a distill run, newest checkpoint at iteration 1500"), or None
    when it holds no run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not any((run_dir / name).exists() for name in ARTIFACTS):
        return None
    record = read(run_dir) if (run_dir / RUN_CONFIG).is_file() else None
    kind = f"a {record['run'].get('command', 'fdistill')} run" if record else "a run"
    newest = checkpoint.latest(run_dir)
    return f"{kind}, newest checkpoint at iteration {int(newest.name)}" if newest else f"{kind} with no checkpoint"


def refuse_existing(run_dir: str | Path, overwrite: bool) -> None:
    """A new run may not silently replace another: stop unless the folder holds no run or ``overwrite``."""
    what = describe(run_dir)
    if what and not overwrite:
        raise ValueError(f"{run_dir} holds {what}: pass --resume to continue it, or --overwrite to start over")


def clear(run_dir: str | Path) -> None:
    """Remove a previous run's artifacts (config.yaml, log.jsonl, checkpoints/, tensorboard/), nothing else."""
    for name in ARTIFACTS:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def write(run_dir: str | Path, command: str, cfg: Any, **run: Any) -> Path:
    """Record the resolved configuration and where the inputs came from in ``run_dir/config.yaml``
    (atomically); ``fdistill ... --config RUN`` and ``--resume`` read it back."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"run": {"command": command, "fdistill": __version__, **run}, "config": to_dict(cfg)}
    text = f"# fdistill {command} run: the resolved configuration; `--resume` reads it\n" + \
        yaml.safe_dump(record, sort_keys=False)
    tmp = run_dir / f".{RUN_CONFIG}.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, run_dir / RUN_CONFIG)
    return run_dir / RUN_CONFIG


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def check_resume(run_dir: str | Path, saved: dict, new: dict, allowed: set[str], ignored: tuple[str, ...] = ()) -> None:
    """Refuse to resume with a configuration that changes what the run is: every changed key outside
    ``allowed`` (and outside the ``ignored`` prefixes, parts the command does not use) is named."""
    before, after = _flat(saved), _flat(new)
    changed = [k for k in sorted(set(before) | set(after))
               if before.get(k) != after.get(k) and k not in allowed and not k.startswith(ignored)]
    if changed:
        shown = ", ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in changed)
        raise ValueError(f"cannot resume {run_dir} with a changed configuration ({shown}); these define the run. "
                         f"Start a new run folder instead. Resuming may change: {', '.join(sorted(allowed))}")
