"""The training loop: run a trainer's steps to ``cfg.iterations``, with progress, logs, a divergence guard,
checkpoints and preemption. One loop serves distillation (``Distiller``) and teacher training
(``TeacherTrainer``).

A trainer has ``cfg`` (``iterations``, ``log_every``, ``checkpoint_every``, ``keep_checkpoints``),
``iteration``, ``rank``, ``device``, ``step() -> {"iteration", "kind", quantity: 0-d tensor, ...}``,
``modules()`` and ``save(path)``. Step values stay on the device between log lines: nothing waits for
the accelerator except on the iterations that log or checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fdistill.io import write_text
from fdistill.training import checkpoint, distributed

EXIT_PREEMPTED = 75  # the exit status of a run stopped by SIGTERM/SIGINT after its checkpoint (EX_TEMPFAIL)


class Preempted(Exception):
    """The run stopped on SIGTERM or SIGINT, after finishing its step and writing a checkpoint."""

    def __init__(self, iteration: int, path: Path | None) -> None:
        super().__init__(f"stopped by a signal at iteration {iteration}"
                         + (f"; wrote {path}, continue with --resume" if path else ""))
        self.iteration, self.path = iteration, path


@contextlib.contextmanager
def stop_signals(enabled: bool = True):
    """While active, SIGTERM (how SLURM and Kubernetes preempt) and SIGINT set ``flag["stop"]`` instead of
    killing the process; a second SIGINT stops at once. Only in the main thread."""
    flag = {"stop": False}
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = True

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)

STATUS_SECONDS = 30.0  # without a terminal, a plain status line at most this often
SHOWN = {"score_diff": "|s_t - s_f|", "h_min": "h min", "h_max": "h max", "loss_gan_d": "D loss",
         "loss": "loss"}  # steady quantities for the progress bar


class FiniteGuard:
    """Remembers, on the device, the first iteration at which each logged quantity was not finite
    (one comparison per step, no synchronization); ``check`` reads it back and raises."""

    def __init__(self) -> None:
        self.first_bad: dict[str, tuple[list[str], Tensor]] = {}  # step kind -> (quantity names, iterations)

    def update(self, kind: str, iteration: int, values: dict[str, Tensor]) -> None:
        names = sorted(values)
        if not names:
            return
        flags = ~torch.isfinite(torch.stack([values[k].float() for k in names]))
        known = self.first_bad.get(kind)
        if known is None or known[0] != names:
            known = (names, torch.full((len(names),), -1, dtype=torch.long, device=flags.device))
        first = torch.where(flags & (known[1] < 0), iteration, known[1])
        self.first_bad[kind] = (names, first)

    def check(self, modules: dict[str, torch.nn.Module]) -> None:
        for names, first in self.first_bad.values():
            bad = [(it, name) for name, it in zip(names, first.tolist()) if it >= 0]
            if bad:
                it, name = min(bad)
                raise FloatingPointError(f"training diverged: {name} is not finite at iteration {it}; "
                                         "try a lower lr or gan_weight")
        for name, module in modules.items():  # a sharded module: each rank checks its shards, all agree
            tensors = [t.to_local() if hasattr(t, "to_local") else t for t in module.state_dict().values()]
            tensors = [t for t in tensors if t.is_floating_point()]
            local = bool(tensors) and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
            if distributed.any_rank(local, tensors[0].device if tensors else "cpu"):
                raise FloatingPointError(f"training diverged: the weights of {name} are not finite")


def _record(logs: dict, latest: dict[str, Tensor]) -> dict:
    """A log line: the iteration, its step kind, and the latest value of every quantity, as floats
    (one transfer from the device)."""
    names = sorted(latest)
    values = torch.stack([latest[k].float().reshape(()) for k in names]).tolist() if names else []
    return {"iteration": logs["iteration"], "kind": logs.get("kind", ""), **dict(zip(names, values))}


def _summary(record: dict) -> dict[str, str]:
    return {label: f"{record[k]:.3g}" for k, label in SHOWN.items() if k in record}


class RunLog:
    """``<run_dir>/log.jsonl``, one JSON line per logged iteration. On resume at iteration N, lines of
    iterations >= N (written after the checkpoint being resumed) and a line torn by a crash are dropped
    (the file is replaced atomically), so each iteration appears once."""

    def __init__(self, path: Path, start: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in self._lines(path) if _iteration(line) < start] if start > 0 else []
        write_text(path, "".join(line + "\n" for line in kept))
        self.file = open(path, "a")  # noqa: SIM115 - closed by close()

    @staticmethod
    def _lines(path: Path) -> list[str]:
        return path.read_text().splitlines() if path.is_file() else []

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _iteration(line: str) -> float:
    """A log line's iteration; a line torn by a crash counts as past every checkpoint (dropped)."""
    try:
        return json.loads(line)["iteration"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def training_loop(trainer, run_dir: str | Path | None = None, progress: bool = True, desc: str = "",
                  log_fn: Callable[[dict], None] | None = None) -> list[dict]:
    """Run ``trainer`` from its current iteration to ``cfg.iterations``.

    Every ``log_every`` iterations and at the last one, the latest value of every quantity is logged
    (returned, appended to <run_dir>/log.jsonl, passed to ``log_fn``, e.g. a TensorBoard writer).
    A quantity that turned non-finite at any step, or non-finite weights, stop the run with the
    iteration and the quantity named, before anything is logged or checkpointed, so the last good
    checkpoint stays. Checkpoints go to <run_dir>/checkpoints/<iteration> every ``checkpoint_every``
    iterations and at the end; the newest ``keep_checkpoints`` are kept. With a run folder, SIGTERM and
    SIGINT finish the current step, write a checkpoint and raise ``Preempted`` (all ranks stop at the
    same step). With several ranks, only rank 0 shows progress and writes files; logged values are rank 0's.
    """
    cfg = trainer.cfg
    main = trainer.rank == 0
    run_dir = Path(run_dir) if run_dir else None
    log = RunLog(run_dir / "log.jsonl", trainer.iteration) if run_dir and main else None
    tty = sys.stderr.isatty()
    bar = tqdm(total=cfg.iterations, initial=trainer.iteration, desc=desc, disable=not (progress and main and tty),
               leave=False, dynamic_ncols=True)
    guard, latest, history = FiniteGuard(), {}, []
    last_status, saved_at = time.monotonic(), trainer.iteration

    def save() -> Path:
        nonlocal saved_at
        guard.check(trainer.modules())
        path = checkpoint.checkpoint_path(run_dir, trainer.iteration)
        trainer.save(path)
        if main:
            checkpoint.prune(run_dir, cfg.keep_checkpoints)
        saved_at = trainer.iteration
        return path

    try:
        with stop_signals(run_dir is not None) as signals:
            while trainer.iteration < cfg.iterations:
                logs = trainer.step()
                values = {k: v for k, v in logs.items() if isinstance(v, Tensor)}
                guard.update(logs.get("kind", ""), logs["iteration"], values)
                latest.update(values)
                bar.update(1)
                done = trainer.iteration == cfg.iterations
                if logs["iteration"] % cfg.log_every == 0 or done:
                    guard.check(trainer.modules())
                    record = _record(logs, latest)
                    history.append(record)
                    if log:
                        log.write(record)
                    if log_fn and main:
                        log_fn(record)
                    bar.set_postfix(_summary(record))
                    if progress and main and not tty and (done or time.monotonic() - last_status >= STATUS_SECONDS):
                        shown = " ".join(f"{k} {v}" for k, v in _summary(record).items())
                        print(f"{desc} iteration {trainer.iteration}/{cfg.iterations} {shown}", flush=True)
                        last_status = time.monotonic()
                if run_dir and (done or (cfg.checkpoint_every and trainer.iteration % cfg.checkpoint_every == 0)):
                    save()
                if run_dir and distributed.any_rank(signals["stop"], trainer.device):
                    raise Preempted(trainer.iteration, (save() if saved_at != trainer.iteration else
                                                        checkpoint.checkpoint_path(run_dir, trainer.iteration)))
    finally:
        bar.close()
        if log:
            log.close()
    return history
