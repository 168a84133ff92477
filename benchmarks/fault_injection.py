"""Kill `fdistill distill` at random moments, resume until it completes, and compare the final weights with
an uninterrupted run.

    python benchmarks/fault_injection.py                  # 10 trials, ~5 minutes on 2 cores
    python benchmarks/fault_injection.py --trials 3 --iterations 12

Each trial distills a tiny digits teacher for --iterations iterations (a checkpoint every 2, the newest 2
kept) and is killed with SIGKILL again and again: half of the launches at a random time, half at a random
filesystem step of the checkpoint writer (each file written, each fsync, each rename or removal), where a
crash is most dangerous. The first launch of every trial is killed (at a step or time the run reaches).
After each kill the run is launched again with --resume (without it when the kill came before config.yaml
was written), until a launch completes. A launch that fails by itself, not by our kill, counts as a failed
resume. Prints trials, kills, failed resumes and how many trials ended bit-identical to the uninterrupted run.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD_FLAG = "--child"
TINY = ["teacher.network.model_channels=8", "teacher.network.channel_mult=[1, 2]", "teacher.network.num_blocks=1",
        "teacher.network.attn_resolutions=[]", "disc_hidden=8", "distill.batch_size=8", "distill.tau=2",
        "distill.checkpoint_every=2", "distill.keep_checkpoints=2", "distill.log_every=1"]


def child(argv: list[str]) -> int:
    """One launch of `fdistill distill argv`, killed by SIGKILL at filesystem step $FAULT_AT of a checkpoint
    write (0: never; the parent may still kill it on a timer)."""
    from fdistill import io
    from fdistill.apps import cli
    from fdistill.training import checkpoint

    fault_at, steps = int(os.environ.get("FAULT_AT", "0")), [0]

    def dying(fn):
        def wrapper(*args, **kwargs):
            steps[0] += 1
            if steps[0] == fault_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return wrapper

    checkpoint.save_file = dying(checkpoint.save_file)
    io.fsync_file = dying(io.fsync_file)  # each fsync of the checkpoint writer (fdistill.io.atomic_dir)
    io.fsync_dir = dying(io.fsync_dir)
    for name in ("rename", "replace"):
        setattr(os, name, dying(getattr(os, name)))
    shutil.rmtree = dying(shutil.rmtree)
    Path.write_text = dying(Path.write_text)
    status = cli.main(argv)
    if os.environ.get("FAULT_COUNT_FILE"):  # how many filesystem steps a whole run takes
        Path(os.environ["FAULT_COUNT_FILE"]).write_text(str(steps[0]))
    return status


def launch(run: Path, teacher: Path, iterations: int, fault_at: int, kill_after: float | None,
           count_file: Path | None = None) -> int:
    resume = ["--resume"] if (run / "config.yaml").is_file() else []
    argv = ["distill", "--teacher", str(teacher), "--out", str(run), "--no-progress", "--device", "cpu",
            f"distill.iterations={iterations}", *TINY, *resume]
    env = {**os.environ, "FAULT_AT": str(fault_at), "OMP_NUM_THREADS": "2", "FAULT_COUNT_FILE": str(count_file or "")}
    proc = subprocess.Popen([sys.executable, __file__, CHILD_FLAG, *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
    if proc.returncode not in (0, -signal.SIGKILL):
        print(f"    launch failed by itself (status {proc.returncode}): {err.strip().splitlines()[-1:]}", flush=True)
    return proc.returncode


def final_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    from fdistill.training import checkpoint

    return load_file(checkpoint.latest(run) / "model.safetensors")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--iterations", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    import torch

    from fdistill.apps import cli

    root = Path(tempfile.mkdtemp(prefix="fault-injection-"))
    t_start = time.perf_counter()
    teacher = root / "teacher"
    assert cli.main(["train-teacher", "--out", str(teacher), "--no-progress", "--device", "cpu",
                     "teacher.iterations=3", "teacher.batch_size=16", "teacher.warmup=1", *TINY[:5]]) == 0
    t0 = time.perf_counter()
    assert launch(root / "reference", teacher, args.iterations, 0, None, count_file=root / "steps") == 0
    clean_seconds = time.perf_counter() - t0
    fs_steps = int((root / "steps").read_text())
    reference = final_weights(root / "reference")
    print(f"uninterrupted run: {args.iterations} iterations in {clean_seconds:.1f} s (process start included), "
          f"{fs_steps} filesystem steps in its checkpoint writes", flush=True)

    kills = failed = identical = 0
    for trial in range(args.trials):
        run, launches, trial_kills = root / f"trial{trial}", 0, 0
        while True:
            launches += 1
            if launches > 60:
                raise RuntimeError(f"trial {trial} did not complete in 60 launches")
            # the first launch of a trial is always killed (a step the run reaches, a time before it ends);
            # the relaunches may draw a step or a time past their end and complete
            first = launches == 1
            on_disk = rng.random() < 0.5
            fault_at = rng.randint(1, fs_steps if first else 2 * fs_steps) if on_disk else 0
            kill_after = None if on_disk else rng.uniform(0.5, 0.9 * clean_seconds if first else clean_seconds)
            status = launch(run, teacher, args.iterations, fault_at, kill_after)
            if status == 0:
                break
            if status == -signal.SIGKILL:
                trial_kills += 1
            else:
                failed += 1
        kills += trial_kills
        weights = final_weights(run)
        same = weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in reference)
        identical += same
        print(f"trial {trial}: {trial_kills} kills, {launches} launches, final weights "
              f"{'bit-identical' if same else 'DIFFERENT'}", flush=True)
    print(f"\n| trials | kills | failed resumes | bit-identical | wall time |\n|---|---|---|---|---|\n"
          f"| {args.trials} | {kills} | {failed} | {identical}/{args.trials} | {time.perf_counter() - t_start:.0f} s |")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD_FLAG:
        sys.exit(child(sys.argv[2:]))
    main()
