#!/usr/bin/env bash
# The prepared GPU check: on one GPU, student/critic step time, images/s, peak memory, achieved
# TFLOP/s and 1-NFE vs 35-NFE sampling latency for the CIFAR-10 DDPM++ architecture at batch 256, in
# fp32 (TF32 matmuls), bf16 autocast, and bf16 with channels_last; the real training loop (cifar10
# preset, batch 256) in bf16 with and without torch.compile; then Stable Diffusion v1.5 at 512 px
# (random weights of the real architecture): the student and critic steps at batch 8 in bf16 with
# gradient checkpointing, and one-step vs teacher sampling latency (Table 4). At most 10 minutes.
# The SD part needs diffusers, transformers and ftfy: carry their wheels (pip download them here,
# `pip install --no-deps` them there) if the GPU machine lacks them.
# Usage (from the repository root, torch with CUDA installed): bash benchmarks/gpu_check.sh
# Needs torch, numpy, safetensors, pyyaml, tqdm, scipy; fdistill is used from this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
for flags in "" "--bf16" "--bf16 --channels-last"; do
    echo "=== batch 256 ${flags:-fp32/tf32}"
    timeout 110 $PY benchmarks/step_time.py --device cuda --batch 256 --steps 5 --warmup 2 $flags \
        || echo "(failed or timed out)"
done
tmp=$(mktemp -d)
for flags in "distill.precision=bf16" "distill.precision=bf16 distill.compile=true"; do
    echo "=== training loop, cifar10 preset, batch 256: $flags"
    timeout 60 $PY benchmarks/gpu_smoke.py "$tmp" distill.batch_size=256 $flags || echo "(failed or timed out)"
done
echo "=== Stable Diffusion v1.5, 512 px, batch 8, bf16, gradient checkpointing"
timeout 150 $PY benchmarks/gpu_sd15.py "$tmp" --batch 8 || echo "(failed or timed out)"
