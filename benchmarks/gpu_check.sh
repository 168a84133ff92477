#!/usr/bin/env bash
# The prepared GPU check (issue 4): on one H100, student/critic step time, images/s, peak memory,
# achieved TFLOP/s and 1-NFE vs 35-NFE sampling latency for the CIFAR-10 DDPM++ architecture at
# batch 256, in fp32 (TF32 matmuls), bf16 autocast, and bf16 with channels_last. Random weights; at
# most 8 minutes.
# Usage (from the repository root, torch with CUDA installed): bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
for flags in "" "--bf16" "--bf16 --channels-last"; do
    echo "=== batch 256 ${flags:-fp32/tf32}"
    timeout 150 python benchmarks/step_time.py --device cuda --batch 256 --steps 5 --warmup 2 $flags
done
