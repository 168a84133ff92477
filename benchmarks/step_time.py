"""Training-step cost of Algorithm 1 with the CIFAR-10 DDPM++ teacher architecture (random weights).

    python benchmarks/step_time.py                 # CPU, batch 8, fp32
    python benchmarks/step_time.py --device cuda --batch 256 --bf16
    python benchmarks/step_time.py --model sd15    # Stable Diffusion v1.5 / sdxl: benchmarks/sd_cost.py's passes

Measures, as medians over --steps steps after --warmup steps:
  - the student step (generator update) and the critic step (fake score + discriminator, R1 as in
    Table 5's CIFAR-10 column, and without R1);
  - the student step's FLOPs (torch FlopCounterMode) and achieved TFLOP/s; sampling latency of the
    one-step generator vs the teacher's 35-NFE Heun sampler for one batch;
  - the passes a student step cannot avoid, timed alone: generator forward+backward, one teacher
    forward+backward through its input that also yields the discriminator features, one fake-score
    forward; and the critic's: generator forward, fake-score forward+backward, two feature passes.
Prints images/s and the ratio step / necessary passes, and peak memory (CUDA: max allocated;
CPU: the process's peak resident set, which includes everything allocated so far).
"""

from __future__ import annotations

import argparse
import copy
import resource
import runpy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.utils.flop_counter

from fdistill.apps.images import load_config
from fdistill.core.diffusion import SigmaSampler, edm_sampler
from fdistill.networks.edm import EDMPrecond
from fdistill.networks.heads import Discriminator
from fdistill.teachers.families.image import set_dropout
from fdistill.training.distiller import DistillConfig, Distiller

# NVlabs/edm's edm-cifar10-32x32-cond-vp.pkl architecture (55,735,299 parameters), as the cifar10 preset gives it.
CIFAR10_DDPMPP = dict(load_config("cifar10").teacher.network, img_resolution=32, img_channels=3, label_dim=10)


# Dense bf16 tensor-core peaks (TFLOP/s) from NVIDIA's data sheets, for the fraction printed at the end.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10": 125.0}


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def timeit(fn, device: torch.device, warmup: int, steps: int) -> float:
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    if "--model" in sys.argv and sys.argv[sys.argv.index("--model") + 1] in ("sd15", "sdxl"):
        runpy.run_path(str(Path(__file__).with_name("sd_cost.py")), run_name="__main__")  # same argv
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["cifar10", "sd15", "sdxl"], default="cifar10")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (DistillConfig.precision)")
    p.add_argument("--channels-last", action="store_true", help="NHWC networks (DistillConfig.channels_last)")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks (DistillConfig.compile)")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    teacher = EDMPrecond(**CIFAR10_DDPMPP)
    teacher.feature_resolutions = [32, 16, 8]  # Table 5, CIFAR-10
    disc = Discriminator.conv(teacher.feature_channels(), head="fastgen")  # the cifar10 preset's heads
    n_params = sum(p.numel() for p in teacher.parameters())
    cfg = DistillConfig(divergence="forward_kl", batch_size=args.batch, tau=5, gan_weight=1e-3, r1_gamma=1.0,
                        lr=1e-4, sigmas=SigmaSampler(), precision="bf16" if args.bf16 else "fp32",
                        channels_last=args.channels_last, compile=args.compile)
    B = args.batch

    def real_data(n, part=slice(None)):
        x = torch.rand(n, 3, 32, 32, device=device) * 2 - 1
        return x[part], torch.eye(10, device=device)[torch.randint(10, (n,))][part]

    students = [copy.deepcopy(teacher).train() for _ in range(2)]
    for m in students:
        set_dropout(m, 0.0)  # as ImageConfig.student_dropout gives them
    d = Distiller(cfg, teacher, *students, disc, real_data,
                  sample_shape=(3, 32, 32), sample_cond=lambda n, part: real_data(n, part)[1], device=device)

    def under_amp(fn):  # the components as the steps run them (the steps enter autocast themselves)
        def run():
            with d.autocast():
                fn()
        return run

    sigma = torch.full((B,), 2.5, device=device)
    z = torch.randn(B, 3, 32, 32, device=device)
    labels = real_data(B)[1]

    def gen_fwd_bwd():
        d.generate(z, labels).square().mean().backward(inputs=d.gen_params)

    def teacher_fwd_bwd():
        x_t = (z * 0.5).requires_grad_(True)
        x0, feats = d.teacher(x_t, sigma, labels, return_features=True)
        torch.autograd.grad(d.discriminator(feats).sum(), x_t)

    def fake_fwd():
        with torch.no_grad():
            d.fake_score(z, sigma, labels)

    def gen_fwd():
        with torch.no_grad():
            d.generate(z, labels)

    def fake_fwd_bwd():
        d.fake_score(z, sigma, labels).square().mean().backward()

    def features_fwd():
        with torch.no_grad():
            d.teacher.features(z, sigma, labels)

    def critic_no_r1():
        d.cfg.r1_gamma = 0.0
        d.critic_step()
        d.cfg.r1_gamma = 1.0

    rows = []
    for name, fn in [("student step", d.student_step), ("critic step (R1, gamma=1)", d.critic_step),
                     ("critic step (no R1)", critic_no_r1), ("  generator fwd+bwd", gen_fwd_bwd),
                     ("  teacher fwd+bwd to input, with features", teacher_fwd_bwd), ("  fake score fwd", fake_fwd),
                     ("  generator fwd", gen_fwd), ("  fake score fwd+bwd", fake_fwd_bwd),
                     ("  teacher features only (encoder)", features_fwd)]:
        rows.append((name, timeit(under_amp(fn), device, args.warmup, args.steps), peak_mb(device)))
        print(f"  measured {name.strip()}: {rows[-1][1]:.3f} s", flush=True)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        under_amp(d.student_step)()
    student_flops = counter.get_total_flops()
    with torch.no_grad():
        latency = {"one-step generator (1 NFE)": timeit(under_amp(gen_fwd), device, args.warmup, args.steps),
                   "teacher, EDM Heun 18 steps (35 NFE)": timeit(
                       under_amp(lambda: edm_sampler(d.teacher, z, labels, num_steps=18)), device, 0, 1)}
    t = {name.strip(): s for name, s, _ in rows}
    student_needed = t["generator fwd+bwd"] + t["teacher fwd+bwd to input, with features"] + t["fake score fwd"]
    critic_needed = t["generator fwd"] + t["fake score fwd+bwd"] + 2 * t["teacher features only (encoder)"]

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nCIFAR-10 DDPM++ ({n_params / 1e6:.1f}M parameters), batch {B}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}{', channels_last' if args.channels_last else ''}"
          f"{', compiled' if args.compile else ''}, {dev}; median of {args.steps} after {args.warmup} warm-up\n")
    print("| measurement | seconds | images/s | peak memory MB |")
    print("|---|---|---|---|")
    for name, s, mem in rows:
        print(f"| {name} | {s:.3f} | {B / s:.1f} | {mem:.0f} |")
    print(f"| necessary passes of a student step (sum) | {student_needed:.3f} | {B / student_needed:.1f} | |")
    print(f"| necessary passes of a critic step without R1 (sum) | {critic_needed:.3f} | {B / critic_needed:.1f} | |")
    print(f"\nstudent step: {student_flops / 1e12:.3f} TFLOP (FlopCounterMode), "
          f"{student_flops / t['student step'] / 1e12:.2f} TFLOP/s achieved")
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if device.type == "cuda" and k in dev), None)
    if peak:
        print(f"  = {100 * student_flops / t['student step'] / 1e12 / peak:.1f}% of the chip's dense bf16 peak "
              f"({peak} TFLOP/s)")
    print(f"\n| sampling a batch of {B} | seconds |\n|---|---|")
    for name, s in latency.items():
        print(f"| {name} | {s:.3f} |")
    print(f"\nstudent step / its necessary passes: {t['student step'] / student_needed:.2f}")
    print(f"critic step (no R1) / its necessary passes: {t['critic step (no R1)'] / critic_needed:.2f}")


if __name__ == "__main__":
    main()
