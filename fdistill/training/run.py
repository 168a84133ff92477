"""A run folder, the unit a user thinks in: ``config.yaml`` (the resolved configuration and where the
teacher and data came from, written at start), ``log.jsonl``, ``checkpoints/<iteration>/`` and
``tensorboard/`` (and a teacher run's ``teacher.safetensors`` and ``samples.png``). What ``--resume`` and
``--overwrite`` do with one, and what a command finds in one. A folder is a run only by its ``config.yaml``
(a run record, ``{run: ..., config: ...}``): one holding run files without it is refused, never replaced."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import yaml

from fdistill import __version__, io
from fdistill.config import RUN_CONFIG, read_yaml_file, to_dict
from fdistill.teachers.loading import TEACHER_FILE
from fdistill.training import checkpoint

# a run's own files: what --overwrite replaces (moved aside, deleted once the new run has started)
ARTIFACTS = (RUN_CONFIG, "log.jsonl", checkpoint.CHECKPOINTS, "tensorboard", TEACHER_FILE, "samples.png")
ASIDE = ".replaced-"  # <run>/.replaced-<pid>/: the replaced run's files while the new run starts


def read(run_dir: str | Path) -> dict | None:
    """``{"run": {...}, "config": {...}}`` from ``run_dir/config.yaml``, or None when there is none."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        data = read_yaml_file(path)
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML ({' '.join(str(e).split())})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text (YAML) file") from None
    if not isinstance(data, dict) or set(data) != {"run", "config"}:
        raise ValueError(f"{path} is not a run record (expected the keys 'run' and 'config')")
    return data


def _present(run_dir: Path) -> list[str]:
    return [name for name in ARTIFACTS if os.path.lexists(run_dir / name)]


def describe(run_dir: str | Path) -> str | None:
    """What a folder holds, in words (e.g. "a distill run, newest checkpoint at iteration 1500"), or None
    when it holds no run. A run is recognized by its config.yaml alone; one that is not a run record is an
    error naming it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not os.path.lexists(run_dir / RUN_CONFIG):
        return None
    if (run_dir / RUN_CONFIG).is_symlink() or not (run_dir / RUN_CONFIG).is_file():
        raise ValueError(f"{run_dir / RUN_CONFIG} is not a file fdistill wrote (a link or a folder): {run_dir} is "
                         "not an fdistill run; pick an empty --out, or remove it yourself")
    try:
        record = read(run_dir)
    except ValueError as e:
        raise ValueError(f"{e}: {run_dir} is not an fdistill run; pick an empty --out, or remove it yourself") from None
    kind = f"a {record['run'].get('command', 'fdistill')} run"
    newest = checkpoint.latest(run_dir)
    return f"{kind}, newest checkpoint at iteration {int(newest.name)}" if newest else f"{kind} with no checkpoint"


def refuse_existing(run_dir: str | Path, overwrite: bool) -> None:
    """A new run may not silently replace another: stop unless the folder holds no run or ``overwrite``. A
    folder holding a run's files (checkpoints/, log.jsonl, ...) without fdistill's config.yaml is refused
    either way: fdistill did not start it, so it neither continues nor deletes it."""
    run_dir = Path(run_dir)
    what = describe(run_dir)
    if what is None and _present(run_dir):
        raise ValueError(f"{run_dir} holds {', '.join(_present(run_dir))} but no {RUN_CONFIG} of an fdistill run, so "
                         "it is neither continued nor overwritten; pick an empty --out, or remove them yourself")
    if what and not overwrite:
        raise ValueError(f"{run_dir} holds {what}: pass --resume to continue it, or --overwrite to start over")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def clear(run_dir: str | Path) -> None:
    """Remove a previous run's files (ARTIFACTS) at once, nothing else (`fdistill demo` starts each run afresh);
    a folder holding run files without an fdistill config.yaml is refused, as by ``refuse_existing``."""
    refuse_existing(run_dir, overwrite=True)
    for name in _present(Path(run_dir)):
        _remove(Path(run_dir) / name)


class Start:
    """The start of a run in ``run_dir`` as one step that either happens or leaves the folder as it was:

        with Start(out, resume) as start:
            ...                                   # validate the config, open teacher and data, build
            start.begin("distill", cfg, ...)      # the old run's files moved aside, the new config.yaml written
            start.commit_after_first_step(trainer)
            training_loop(trainer, out)

    ``begin`` (when not resuming, over a run that ``refuse_existing`` let through) renames the old run's files
    into the hidden ``<run_dir>/.replaced-<pid>/`` and writes config.yaml. The start is committed (the old
    files deleted) once the first training step has returned: after it nothing of the user's input can fail any
    more (the configuration was validated, teacher and data opened, the networks built, a batch drawn and a
    step computed); what may fail later (a divergence, a full disk, a preemption) belongs to the new run. An
    exception before that removes what the start wrote and moves the old run back, so a failed start leaves no
    config.yaml behind and a replaced run intact. Only the process with ``main`` touches files."""

    def __init__(self, run_dir: str | Path, resume: bool = False, main: bool = True) -> None:
        self.run_dir, self.resume, self.main = Path(run_dir), resume, main
        self.begun = self.committed = False
        self.aside: Path | None = None
        self.moved: list[str] = []  # the old run's files, now in self.aside
        self.kept: set[str] = set()  # run files in the folder at begin that this start did not replace

    def __enter__(self) -> Start:
        return self

    def begin(self, command: str, cfg: Any, **run: Any) -> None:
        self.begun = True
        if not self.main:
            return
        if not self.resume and describe(self.run_dir) is not None:
            self.aside = self.run_dir / f"{ASIDE}{os.getpid()}"
            _remove(self.aside)  # a leftover of an earlier process with this id
            self.aside.mkdir()
            for name in _present(self.run_dir):
                os.rename(self.run_dir / name, self.aside / name)
                self.moved.append(name)
        self.kept = set(_present(self.run_dir))
        write(self.run_dir, command, cfg, **run)

    def commit_after_first_step(self, trainer: Any) -> None:
        step = trainer.step

        def first_step():
            logs = step()
            trainer.step = step
            self.commit()
            return logs
        trainer.step = first_step

    def commit(self) -> None:
        if self.committed or not self.begun:
            return
        self.committed = True
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)

    def rollback(self) -> None:
        if not (self.main and self.begun) or self.committed or self.resume:
            return
        for name in set(_present(self.run_dir)) - self.kept:  # written by this start
            _remove(self.run_dir / name)
        for name in self.moved:
            os.rename(self.aside / name, self.run_dir / name)
        if self.aside is not None:
            self.aside.rmdir()

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.commit()
            return
        try:
            self.rollback()
        except OSError as e:  # the original error is the one to report; say where the old run's files are
            warnings.warn(f"could not restore {self.run_dir} ({e}); the replaced run's files are in {self.aside}",
                          stacklevel=2)


def write(run_dir: str | Path, command: str, cfg: Any, **run: Any) -> Path:
    """Record the resolved configuration and where the inputs came from in ``run_dir/config.yaml``
    (atomically); ``fdistill ... --config RUN`` and ``--resume`` read it back."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"run": {"command": command, "fdistill": __version__, **run}, "config": to_dict(cfg)}
    text = f"# fdistill {command} run: the resolved configuration; `--resume` reads it\n" + \
        yaml.safe_dump(record, sort_keys=False)
    return io.write_text(run_dir / RUN_CONFIG, text)


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
