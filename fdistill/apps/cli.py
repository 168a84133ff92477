"""The ``fdistill`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _demo(args: argparse.Namespace) -> None:
    import torch

    from fdistill.apps import lab2d

    torch.set_num_threads(args.threads or torch.get_num_threads())
    cfg = lab2d.load_config(args.config or lab2d.PRESET, args.overrides)
    t0 = time.perf_counter()
    print(lab2d.run_demo(cfg, args.out, progress=not args.no_progress))
    print(f"total wall time {time.perf_counter() - t0:.0f} s")


def _analyze(args: argparse.Namespace) -> None:
    from fdistill.apps.analyze import analyze

    print(analyze(args.out, args.custom))


DIGITS_PRESET = "digits"  # the default preset of the image commands (fdistill/configs/digits.yaml)


def _train_teacher(args: argparse.Namespace) -> None:
    from fdistill.apps import images

    cfg = images.load_config(args.config or DIGITS_PRESET, args.overrides)
    t0 = time.perf_counter()
    path = images.train_teacher(cfg, args.out, progress=not args.no_progress)
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s, {cfg.teacher.iterations} iterations)")


def _distill(args: argparse.Namespace) -> None:
    """Single process, or one process per GPU under torchrun (data parallel, see fdistill.training.distributed)."""
    from fdistill.apps import images
    from fdistill.training import distributed
    from fdistill.training.loop import training_loop

    cfg = images.load_config(args.config or DIGITS_PRESET, args.overrides)
    device = distributed.init_from_env(args.device)
    try:
        main = distributed.rank() == 0
        d = images.make_distiller(cfg, args.teacher, device=device)
        ckpt = Path(args.out) / "checkpoint"
        if args.resume:
            d.load(ckpt)
            if main:
                print(f"resumed {ckpt} at iteration {d.iteration}")
        if main:
            print(f"{distributed.world_size()} process(es) on {device}: global batch {cfg.distill.batch_size}, "
                  f"{len(d.passes)} pass(es) of {d.passes[0].stop} per process and step")
        t0 = time.perf_counter()
        writer = tensorboard_writer(Path(args.out) / "tensorboard") if args.tensorboard and main else None

        def log_fn(logs: dict) -> None:
            for k, v in logs.items():
                if isinstance(v, float):
                    writer.add_scalar(k, v, logs["iteration"])

        training_loop(d, run_dir=args.out, progress=not args.no_progress, desc=d.divergence.name,
                      log_fn=log_fn if writer else None)
        if writer:
            writer.close()
        if main:
            print(f"wrote {ckpt} ({d.iteration} iterations, {time.perf_counter() - t0:.0f} s this run)")
    finally:
        distributed.shutdown()


def tensorboard_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ValueError("--tensorboard needs the tensorboard package: pip install 'fdistill[tensorboard]'") from e
    return SummaryWriter(str(log_dir))


def _sample(args: argparse.Namespace) -> None:
    import numpy as np

    from fdistill.apps import images
    from fdistill.data.datasets import to_uint8
    from fdistill.data.writers import save_image_grid
    from fdistill.device import pick_device
    from fdistill.teachers.loading import load_network

    if bool(args.checkpoint) == bool(args.teacher):
        raise ValueError("give exactly one of --checkpoint (a one-step generator) or --teacher (multi-step sampling)")
    if args.checkpoint:
        net, sigma_gen, info = images.load_generator(args.checkpoint)
        kwargs = info["network"]
    else:
        net, _, kwargs = load_network(args.teacher)
        sigma_gen = None
    shape = (kwargs["img_channels"], kwargs["img_resolution"], kwargs["img_resolution"])
    t0 = time.perf_counter()
    device = pick_device(args.device)
    x, labels = images.generate(net, args.num, shape, kwargs.get("label_dim", 0), sigma_gen, args.steps,
                                args.guidance, batch_size=args.batch, seed=args.seed, device=device,
                                progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    uint8 = to_uint8(x)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"images": uint8} if labels is None else {"images": uint8, "labels": labels.argmax(1).numpy()}
    np.savez(out, **arrays)
    grid = save_image_grid(x[: args.grid_size], out.with_suffix(".png"), nrow=10, scale=max(1, 64 // shape[1]))
    nfe = 1 if sigma_gen is not None else 2 * args.steps - 1
    print(f"wrote {out} and {grid}: {args.num} samples, {nfe} NFE each, {seconds:.1f} s "
          f"({1000 * seconds / args.num:.1f} s per 1000)")


def _evaluate(args: argparse.Namespace) -> None:
    from fdistill.evaluation import evaluate

    res = evaluate.evaluate_file(args.samples, args.data, k=args.k, inception=args.inception, ref=args.ref,
                                   batch_size=args.batch, progress=not args.no_progress, device=args.device)
    print(evaluate.format_report(res))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fdistill", description=__doc__.strip() + " See README.md.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="distill one-step generators on the 2-D lab and compare divergences")
    d.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. distill.iterations=500 "
                   "'runs=[js]' teacher.kind=gmm")
    d.add_argument("--config", default=None, help="YAML config (default: configs/toy2d.yaml)")
    d.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    d.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    d.set_defaults(func=_demo)

    a = sub.add_parser("analyze", help="print the f-divergence table (Table 1/6, Fig. 5a) and write Fig. 4/5a")
    a.add_argument("--custom", action="append", default=[], metavar="H",
                   help="a custom weighting h(r) as an expression in r (Prop. 1), e.g. 'sqrt(r)/(1+r)'; repeatable")
    a.add_argument("--out", default="runs/analyze", help="directory for the PNG figures (default: runs/analyze)")
    a.set_defaults(func=_analyze)

    t = sub.add_parser("train-teacher", help="train an EDM teacher on images (default preset: configs/digits.yaml)")
    t.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. teacher.iterations=500")
    t.add_argument("--config", help="YAML preset (default: configs/digits.yaml)")
    t.add_argument("--out", default="runs/digits", help="output directory (default: runs/digits)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_train_teacher)

    s = sub.add_parser("distill", help="distill a teacher into a one-step generator (Algorithm 1)",
                       description="Distill a teacher into a one-step generator (Algorithm 1). Several GPUs: "
                       "torchrun --standalone --nproc_per_node=N -m fdistill distill ...")
    s.add_argument("overrides", nargs="*", help="config overrides, e.g. distill.divergence=js distill.iterations=2000 "
                   "(after the options or before them, not between)")
    s.add_argument("--teacher", required=True,
                   help="teacher: .safetensors from train-teacher, an NVlabs/edm .pkl snapshot, or a diffusers "
                   "folder with a DDPM UNet2DModel")
    s.add_argument("--config", help="YAML preset (default: configs/digits.yaml)")
    s.add_argument("--out", default="runs/distill", help="run directory: log.jsonl and checkpoint/")
    s.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint")
    s.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars to <out>/tensorboard")
    s.add_argument("--device", default="auto",
                   help="cpu, cuda or auto (default: cuda if available). Under torchrun each process takes "
                   "cuda:LOCAL_RANK; ranks talk over NCCL on GPUs, gloo on CPU")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_distill)

    m = sub.add_parser("sample", help="sample a one-step generator or a teacher into .npz (uint8 NCHW, labels) + PNG")
    m.add_argument("--checkpoint", help="distillation checkpoint directory (one-step sampling)")
    m.add_argument("--teacher", help="teacher .safetensors or NVlabs/edm .pkl (multi-step EDM Heun sampling)")
    m.add_argument("--num", type=int, default=1000)
    m.add_argument("--steps", type=int, default=18, help="Heun steps for --teacher (18 = 35 NFE)")
    m.add_argument("--guidance", type=float, default=1.0, help="CFG scale for --teacher")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--grid-size", type=int, default=100, help="samples in the PNG grid")
    m.add_argument("--batch", type=int, default=256, help="samples per network call (default: 256)")
    m.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda if available)")
    m.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    m.add_argument("--out", default="runs/samples.npz")
    m.set_defaults(func=_sample)

    e = sub.add_parser("evaluate", help="FID / precision / recall (and class accuracy) of a samples .npz")
    e.add_argument("samples", help=".npz written by `fdistill sample`")
    e.add_argument("--data", default=None,
                   help="real images to compare with: 'digits' or any dataset `load_dataset` reads (folder, EDM .zip, "
                   ".npz, CIFAR-10 batches). Default: digits, scored in digits-FID space unless --inception/--ref is "
                   "given; any other dataset is scored in Inception space, its features cached")
    e.add_argument("--inception", metavar="PATH",
                   help="Inception-v3 weights for the standard FID: inception-2015-12-05.pt (NVIDIA TorchScript) or "
                   "pt_inception-2015-12-05-6726825d.pth (pytorch-fid), or a folder holding one. Default: "
                   "$FDISTILL_INCEPTION, else the cache folder ($FDISTILL_CACHE or ~/.cache/fdistill)")
    e.add_argument("--ref", metavar="PATH.npz",
                   help="Inception reference statistics (EDM-style .npz with mu, sigma): FID against them; "
                   "precision/recall also need --data")
    e.add_argument("--k", type=int, default=3, help="k of k-NN precision/recall (default: 3)")
    e.add_argument("--batch", type=int, default=64, help="images per Inception batch (default: 64)")
    e.add_argument("--device", default="auto", help="device for the Inception network: cpu, cuda or auto "
                   "(default: cuda if available)")
    e.add_argument("--no-progress", action="store_true", help="hide progress bars")
    e.set_defaults(func=_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"fdistill {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
