"""The GPU check's Stable Diffusion scripts run end to end at their --tiny sizes on CPU: a GPU session has
minutes, and a script that breaks there wastes them."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script, modes", [("gpu_sd15.py", 1), ("gpu_sd35.py", 2)])
def test_gpu_script_runs_tiny(tmp_path, script, modes):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(BENCHMARKS / script), str(tmp_path), "--tiny", "--batch", "2"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = re.findall(r"student step ([\d.]+) s, critic step ([\d.]+) s", r.stdout)
    assert len(steps) == modes and all(float(s) > 0 and float(c) > 0 for s, c in steps)
    assert r.stdout.count("sampling latency") == 2


def test_gpu_sd35_rejects_an_unknown_mode(tmp_path):
    r = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_sd35.py"), str(tmp_path), "--tiny", "--modes", "lora"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 2 and "unknown mode 'lora'" in r.stderr
