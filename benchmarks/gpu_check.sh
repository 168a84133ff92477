#!/usr/bin/env bash
# The prepared GPU check: on one GPU, student/critic step time, images/s, peak memory, achieved
# TFLOP/s and 1-NFE vs 35-NFE sampling latency for the CIFAR-10 DDPM++ architecture at batch 256, in
# fp32 (TF32 matmuls), bf16 autocast, and bf16 with channels_last; the real training loop (cifar10
# preset, batch 256) in bf16 with and without torch.compile; then Stable Diffusion v1.5 at 512 px
# (random weights of the real architecture): the student and critic steps at batch 8 in bf16 with
# gradient checkpointing, and one-step vs teacher sampling latency (Table 4); then SD3.5-Medium at 512 px
# (random weights of the real 2.24B MMDiT-X) at batch 4, shared-base LoRA and full fine-tuning; then FLUX.1-dev at
# 512 px (random weights of the real 11.9B transformer, built on the GPU in fp32, 47.6 GB; nothing on disk): the
# flux preset's shared-base LoRA r64 with checkpointing, micro_batch 1, batch 2, each step's peak CUDA memory beside
# fdistill.memory's prediction (needs a GPU of 80 GB; about 2 minutes, at most 5). At most 10 minutes each part;
# all four take up to 18 (more than one device session's 15): give a part's name to run only it.
# The SD and FLUX parts need diffusers, transformers and ftfy, and peft for the LoRA modes: carry their wheels
# (pip download them here, `pip install --no-deps` them there) if the GPU machine lacks them.
# Usage (from the repository root, torch with CUDA installed): bash benchmarks/gpu_check.sh [cifar|sd15|sd35|flux]
# Needs torch, numpy, safetensors, pyyaml, tqdm, scipy; fdistill is used from this checkout.
set -euo pipefail
part=${1:-all}
case $part in all|cifar|sd15|sd35|flux) ;;
    *) echo "gpu_check.sh: unknown part '$part', expected cifar, sd15, sd35 or flux"; exit 2;; esac
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
tmp=$(mktemp -d)
if [[ $part == all || $part == cifar ]]; then
for flags in "" "--bf16" "--bf16 --channels-last"; do
    echo "=== batch 256 ${flags:-fp32/tf32}"
    timeout 110 $PY benchmarks/step_time.py --device cuda --batch 256 --steps 5 --warmup 2 $flags \
        || echo "(failed or timed out)"
done
for flags in "distill.precision=bf16" "distill.precision=bf16 distill.compile=true"; do
    echo "=== training loop, cifar10 preset, batch 256: $flags"
    timeout 60 $PY benchmarks/gpu_smoke.py "$tmp" distill.batch_size=256 $flags || echo "(failed or timed out)"
done
fi
if [[ $part == all || $part == sd15 ]]; then
echo "=== Stable Diffusion v1.5, 512 px, batch 8, bf16, gradient checkpointing"
timeout 150 $PY benchmarks/gpu_sd15.py "$tmp" --batch 8 || echo "(failed or timed out)"
fi
if [[ $part == all || $part == sd35 ]]; then
echo "=== SD3.5-Medium, 512 px, batch 4, bf16: shared-base LoRA r64, then full fine-tuning with checkpointing"
timeout 240 $PY benchmarks/gpu_sd35.py "$tmp" --batch 4 || echo "(failed or timed out)"
fi
if [[ $part == all || $part == flux ]]; then
echo "=== FLUX.1-dev, 512 px, batch 2, micro_batch 1, bf16, shared-base LoRA r64, checkpointing: peak memory vs model"
timeout 300 $PY benchmarks/gpu_flux.py "$tmp" --batch 2 || echo "(failed or timed out)"
fi
