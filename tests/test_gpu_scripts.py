"""The GPU check's Stable Diffusion and FLUX scripts run end to end at their --tiny sizes on CPU: a GPU session has
minutes, and a script that breaks there wastes them."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


# gpu_flux.py on the CPU: each step's line with the memory model's prediction beside "n/a" for the CUDA peaks
FLUX_STEP = (r"  (student|critic) step: [\d.]+ s; peak allocated n/a, reserved n/a \(not on a GPU\); "
             r"predicted ([\d.]+) MB \(states ([\d.]+) MB \+ activations ([\d.]+) MB\), "
             r"whole run ([\d.]+) MB; measured/predicted n/a\n")


@pytest.mark.parametrize("script, modes, lines", [("gpu_sd15.py", 1, {"sampling latency": 2}),
                                                   ("gpu_sd35.py", 2, {"sampling latency": 2}),
                                                   ("gpu_flux.py", 1, {FLUX_STEP: 2, "state: ": 4})])
def test_gpu_script_runs_tiny(tmp_path, script, modes, lines):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(BENCHMARKS / script), str(tmp_path), "--tiny", "--batch", "2"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = re.findall(r"student step ([\d.]+) s, critic step ([\d.]+) s", r.stdout)
    assert len(steps) == modes and all(float(s) > 0 and float(c) > 0 for s, c in steps)
    for line, count in lines.items():
        assert len(re.findall(line, r.stdout)) == count, (line, r.stdout[-3000:])
    if script == "gpu_flux.py":  # predicted step = states + its activations, within the whole run's
        for kind, step, states, activations, whole in re.findall(FLUX_STEP, r.stdout):
            assert float(activations) > 0 and abs(float(step) - float(states) - float(activations)) < 0.02
            assert 0 < float(step) <= float(whole)
        assert "losses finite" in r.stdout


def test_gpu_flux_refuses_full_size_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the full size would run")
    r = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_flux.py"), str(tmp_path)], capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 1 and "no CUDA device" in r.stderr and "--tiny" in r.stderr


def test_gpu_sd35_rejects_an_unknown_mode(tmp_path):
    r = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_sd35.py"), str(tmp_path), "--tiny", "--modes", "lora"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 2 and "unknown mode 'lora'" in r.stderr
