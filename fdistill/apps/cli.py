"""fdistill: distill a diffusion model into a one-step generator by f-divergence distribution matching
(Xu, Nie & Vahdat, CVPR 2025).

Conventions shared by every command: --out is a folder; configuration overrides KEY=VALUE may stand
anywhere on the line; --seed, --device and --threads exist wherever they matter; a run folder (what
train-teacher and distill write) is accepted wherever a run is expected. Details: fdistill COMMAND --help.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings

from fdistill import __version__, require_torch
from fdistill.config import DIGITS_PRESET


def resumable(command: str) -> set[str]:
    """The dotted config keys (``distill.iterations``, ...) that ``command --resume`` may change."""
    from fdistill.apps import runs

    return runs.resumable(command)


def _threads(args: argparse.Namespace) -> None:
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def _seed_override(args: argparse.Namespace, key: str) -> list[str]:
    return [*args.overrides, f"{key}={args.seed}"] if args.seed is not None else list(args.overrides)


def _print_config(cfg) -> None:
    import yaml

    from fdistill.config import to_dict

    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")


def _image_config(args: argparse.Namespace):
    """The image commands' config: the --config presets (default digits), then the overrides."""
    from fdistill.apps import images

    return images.load_config(args.config or DIGITS_PRESET, args.overrides)


MAX_STEPS = 1000  # the most Heun steps --steps / --teacher-steps accept (EDM's samplers use 18 to 256)


def _check_options(args: argparse.Namespace, ranges: dict[str, tuple[str, int, int | None]],
                   finite: dict[str, str] | None = None) -> None:
    """Refuse option values out of range, naming the option: ``ranges`` maps an option to (attribute, minimum,
    maximum or None), ``finite`` an option to an attribute that must be a finite number >= 0 (unset: fine)."""
    import math

    for option, (name, lo, hi) in ranges.items():
        value = getattr(args, name)
        if value is not None and not (lo <= value and (hi is None or value <= hi)):
            want = {(1, None): "a positive integer", (0, None): "a non-negative integer"}.get(
                (lo, hi), f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]")
            raise ValueError(f"{option} must be {want}, got {value}")
    for option, name in (finite or {}).items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{option} must be a finite number >= 0, got {value}")


# -- the commands: each parses its options, calls its app function and prints the line it returns -------------
def _demo(args: argparse.Namespace) -> None:
    from fdistill.apps import lab2d

    cfg = lab2d.load_toy_config(args.config or lab2d.PRESET, _seed_override(args, "seed"))
    if args.print_config:
        return _print_config(cfg)
    t0 = time.perf_counter()
    print(lab2d.run_demo(cfg, args.out, progress=not args.no_progress))
    print(f"total wall time {time.perf_counter() - t0:.0f} s")


def _analyze(args: argparse.Namespace) -> None:
    from fdistill.apps.analyze import analyze

    print(analyze(args.out, args.custom))


def _analyze_run(args: argparse.Namespace) -> None:
    from fdistill.apps.analyze_run import analyze_run

    print(analyze_run(args.run, args.out, args.num, args.sigma, seed=args.seed))


def _presets(args: argparse.Namespace) -> None:
    from fdistill.config import PRESETS

    for path in sorted(PRESETS.glob("*.yaml")):
        first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "# ")
        print(f"{path.stem:12s} {first.lstrip('# ').strip()}")


def _train_teacher(args: argparse.Namespace) -> None:
    from fdistill.apps import runs

    cfg, record = runs.open_run(args.out, "train-teacher", args.config, _seed_override(args, "teacher.seed"),
                                args.resume, args.overwrite, args.print_config)
    if args.print_config:
        return _print_config(cfg)
    print(runs.train_teacher(cfg, record, args.out, args.device, progress=not args.no_progress))


def _distill(args: argparse.Namespace) -> None:
    from fdistill.apps import runs

    cfg, record = runs.open_run(args.out, "distill", args.config, _seed_override(args, "distill.seed"),
                                args.resume, args.overwrite, args.print_config)
    if args.print_config:
        return _print_config(cfg)
    line = runs.distill(cfg, record, args.out, args.teacher, args.init_from, args.tensorboard, args.device,
                        progress=not args.no_progress)
    if line:
        print(line)


def _sample(args: argparse.Namespace) -> None:
    from fdistill.apps.sample import read_prompts, sample

    _check_options(args, {"--num-samples": ("num", 1, None), "--batch": ("batch", 1, None),
                          "--shard": ("shard", 1, None), "--grid-size": ("grid_size", 0, None),
                          "--steps": ("steps", 2, MAX_STEPS), "--student-steps": ("student_steps", 1, None)},
                   {"--guidance": "guidance"})
    cfg = _image_config(args) if args.config or args.overrides or args.print_config else None
    if args.print_config and args.checkpoint is None:
        return _print_config(cfg)
    line = sample(args.checkpoint, args.teacher, args.out, args.num, read_prompts(args.prompt, args.prompts),
                  args.seed, args.shard, args.batch, args.steps, args.guidance, args.grid_size, args.device,
                  not args.no_progress, cfg, args.student_steps, args.checkpoint_low)
    if line:
        print(line)


def _evaluate_t2i(args: argparse.Namespace) -> None:
    from fdistill.apps import evaluate_t2i

    _check_options(args, {"--num-prompts": ("num", 0, None), "--group": ("group", 1, None),
                          "--shard": ("shard", 1, None), "--batch": ("batch", 1, None),
                          "--teacher-steps": ("teacher_steps", 2, MAX_STEPS)}, {"--guidance": "guidance"})
    for line in evaluate_t2i.evaluate_run(args.checkpoint, args.prompts, args.out, args.ref, args.num, args.group,
                                          args.teacher_steps, args.guidance, args.inception, args.clip,
                                          args.clip_model, args.dino, args.hps, args.seed, args.shard, args.batch,
                                          args.json, args.device, progress=not args.no_progress):
        print(line)


def _export(args: argparse.Namespace) -> None:
    if (args.diffusers is None) == (args.lora is None):
        raise ValueError("export writes one of --diffusers OUT (a pipeline folder) or --lora OUT (a LoRA file for the "
                         f"teacher's pipeline): give {'only one' if args.diffusers else 'one'} of them")
    if args.lora_rank is not None and args.lora is None:
        raise ValueError("--lora-rank extracts a LoRA from a fully fine-tuned student: it goes with --lora OUT")
    _check_options(args, {"--lora-rank": ("lora_rank", 1, None)})
    if args.lora is not None:
        from fdistill.teachers.lora_files import export_lora
        from fdistill.training import checkpoint

        if args.checkpoint_low is not None or checkpoint.read_meta(args.checkpoint)["info"].get(
                "network", {}).get("expert"):
            raise ValueError("--lora writes one network's adapter; a Wan2.2-A14B expert pair exports as a pipeline: "
                             "--checkpoint HIGH_RUN --checkpoint-low LOW_RUN --diffusers OUT")

        for line in export_lora(args.checkpoint, args.lora, args.lora_rank):
            print(line)
        return
    from fdistill.apps.distill import load_expert_pair, load_generator

    if args.checkpoint_low is not None:
        generator, student, teacher = load_expert_pair(args.checkpoint, args.checkpoint_low)
    else:
        generator, student, teacher = load_generator(args.checkpoint, alone=False)  # the family refuses a lone expert
    print(teacher.export(generator, args.diffusers, student))


def _prepare_latents(args: argparse.Namespace) -> None:
    from fdistill.apps import t2i

    _check_options(args, {"--batch": ("batch", 1, None), "--shard-size": ("shard_size", 1, None)})
    if args.fps is not None and not (math.isfinite(args.fps) and args.fps > 0):
        raise ValueError(f"--fps must be a positive number of frames per second (Wan's: 16), got {args.fps:g}")
    cfg = _image_config(args)
    if args.print_config:
        return _print_config(cfg)
    print(t2i.prepare_latents_as_configured(cfg, args.teacher, args.data, args.out, args.resolution, args.batch,
                                            args.shard_size, args.device, args.on_bad_data, not args.no_progress,
                                            args.fps))


def _evaluate(args: argparse.Namespace) -> None:
    from fdistill.evaluation import evaluate

    _check_options(args, {"--k": ("k", 1, None), "--batch": ("batch", 1, None)})
    for line in evaluate.report_file(args.samples, args.data, args.k, args.inception, args.ref, args.batch,
                                     not args.no_progress, args.device, args.json):
        print(line)


# -- the parser ---------------------------------------------------------------------------------------------
class _Help(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, where it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        meaningless = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not meaningless and action.option_strings:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fdistill", description=__doc__, formatter_class=_Help)
    p.add_argument("--version", action="version", version=f"fdistill {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, func, description: str | None = None) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=description or help, formatter_class=_Help)
        c.set_defaults(func=func)
        return c

    def configured(c: argparse.ArgumentParser, preset: str, example: str = "distill.iterations=500") -> None:
        c.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help=f"config overrides, anywhere on the line, e.g. {example}")
        c.add_argument("--config", action="append", help=f"YAML preset name (`fdistill presets`), file or run "
                       f"folder (default: {preset}); several are read in turn, each over the ones before "
                       "(e.g. --config cifar10 --config fastgen)")
        c.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    def runtime(c: argparse.ArgumentParser, seed: str | None, device: bool = True) -> None:
        if seed:
            c.add_argument("--seed", type=int, default=None, help=f"random seed (sets {seed})")
        if device:
            c.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
        c.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
        c.add_argument("--no-progress", action="store_true", help="hide progress bars")

    def run_folder(c: argparse.ArgumentParser, default: str) -> None:
        c.add_argument("--out", default=default, help="run folder: config.yaml, log.jsonl, checkpoints/")
        c.add_argument("--resume", action="store_true", help="continue the run in --out (overrides may change "
                       "iterations, logging, checkpointing, precision and learning rates)")
        c.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run")

    d = command("demo", "distill one-step generators on the 2-D lab and compare divergences", _demo)
    configured(d, "toy2d")
    d.add_argument("--out", default="runs/demo", help="output folder")
    runtime(d, "seed", device=False)

    a = command("analyze", "print the f-divergence table (Table 1/6, Fig. 5a) and write Fig. 4/5a", _analyze)
    a.add_argument("--custom", action="append", default=[], metavar="H",
                   help="a custom weighting h(r) as an expression in r (Prop. 1), e.g. 'sqrt(r)/(1+r)'; repeatable")
    a.add_argument("--out", default="runs/analyze", help="folder for the PNG figures")

    command("presets", "list the configuration presets shipped with fdistill", _presets)

    ar = command("analyze-run", "Fig. 6 for a run: h_bar against the teacher-fake score difference of its samples",
                 _analyze_run)
    ar.add_argument("run", help="a run folder (distill, or one run of `fdistill demo`: runs/demo/js)")
    ar.add_argument("--num-samples", dest="num", type=int, default=2048, help="generated samples")
    ar.add_argument("--sigma", type=float, default=None, help="noise level of the figure (default: the median "
                    "of the run's training noise levels); the report also covers five quantiles")
    ar.add_argument("--out", default=None, help="output folder (default: <run>/analysis)")
    ar.add_argument("--seed", type=int, default=0, help="seed of the samples and noise")
    runtime(ar, None)

    t = command("train-teacher", "train an EDM teacher on images", _train_teacher)
    configured(t, DIGITS_PRESET)
    run_folder(t, "runs/teacher")
    runtime(t, "teacher.seed")

    s = command("distill", "distill a teacher into a one-step generator (Algorithm 1)", _distill,
                "Distill a teacher into a one-step generator (Algorithm 1). Several GPUs: "
                "torchrun --standalone --nproc_per_node=N -m fdistill distill ...")
    configured(s, DIGITS_PRESET)
    s.add_argument("--teacher", help="a train-teacher run folder or its teacher.safetensors, an NVlabs/edm .pkl "
                   "snapshot, a diffusers pixel UNet folder, or a text-to-image pipeline folder (SD1.5 / SDXL, SD3, "
                   "FLUX.1, SANA, Qwen-Image) or text-to-video one (Wan2.1 / 2.2, from latent shards: --config wan); "
                   "with --resume: the run's own teacher")
    run_folder(s, "runs/distill")
    s.add_argument("--init-from", metavar="PATH", help="warm start: the generator, fake score and discriminator of "
                   "another run (e.g. a reverse-KL run before switching divergence); or the generator (and its EMA) "
                   "alone from a LoRA file for the teacher's pipeline (.safetensors, or a folder holding "
                   "pytorch_lora_weights.safetensors: into a LoRA run's adapter of the same rank, fused into a full "
                   "run's weights) or from a diffusers UNet / transformer folder of the teacher's architecture (a full "
                   "run); not with --resume")
    s.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars to <out>/tensorboard")
    runtime(s, "distill.seed")

    m = command("sample", "sample a distilled student or a teacher into <out>/samples.npz and <out>/grid.png "
                "(by PNG shards in <out>/images/, resumable; under torchrun each process makes its share); "
                "text-to-image: one PNG per prompt; text-to-video: one MP4 per prompt and a PNG strip of its frames",
                _sample)
    m.add_argument("--checkpoint", help="a distill run folder (its newest checkpoint) or a checkpoint folder: "
                   "the student's own steps (1 for a one-step generator)")
    m.add_argument("--checkpoint-low", metavar="RUN", help="Wan2.2-A14B: the low-noise expert's distill run "
                   "(teacher_options.expert=low), sampled after the high-noise expert's --checkpoint (its "
                   "k_high + k_low steps, each by its expert's student)")
    m.add_argument("--student-steps", type=int, default=None, metavar="J",
                   help="run a k-step --checkpoint in J steps (J divides k: every k/J-th of its levels)")
    m.add_argument("--teacher", help="a teacher (as for distill): multi-step EDM Heun sampling")
    m.add_argument("--num-samples", dest="num", type=int, default=1000,
                   help="number of samples (not --num: torchrun's own options would take it)")
    m.add_argument("--steps", type=int, default=None, help="Heun steps for --teacher, 18 = 35 NFE (default: 18)")
    m.add_argument("--guidance", type=float, default=None, help="CFG scale for --teacher (default: 1)")
    m.add_argument("--grid-size", type=int, default=100, help="samples in the PNG grid")
    m.add_argument("--batch", type=int, default=256, help="samples per network call")
    m.add_argument("--shard", type=int, default=1000, help="samples per PNG shard in <out>/images/ (the unit of "
                   "resuming a stopped run and of splitting the work over torchrun processes)")
    m.add_argument("--out", default=None,
                   help="output folder (default: <run folder>/samples, or runs/samples for --teacher)")
    m.add_argument("--seed", type=int, default=0, help="seed of the latents (text-to-image / -video: prompt i uses "
                   "seed + i)")
    m.add_argument("--prompt", action="append", metavar="TEXT", help="text-to-image / -video: a prompt; repeatable")
    m.add_argument("--prompts", metavar="FILE", help="text-to-image / -video: a file of prompts, one per line")
    configured(m, DIGITS_PRESET, "teacher_options.max_sequence_length=64 (--teacher only)")
    runtime(m, None)

    x = command("export", "write a text-to-image or text-to-video student as a diffusers pipeline folder or a LoRA "
                "file (its k-step sampling)", _export)
    x.add_argument("--checkpoint", required=True, help="a text-to-image or text-to-video distill run folder or one of "
                   "its checkpoints")
    x.add_argument("--checkpoint-low", metavar="RUN", help="Wan2.2-A14B: the low-noise expert's distill run "
                   "(teacher_options.expert=low); --checkpoint is then the high-noise expert's, and the pipeline "
                   "holds both students (transformer, transformer_2) with the boundary_ratio that routes each step")
    x.add_argument("--diffusers", metavar="OUT", help="the new pipeline folder (the teacher's, with the student's "
                   "network and scheduler)")
    x.add_argument("--lora", metavar="OUT", help="instead: a new folder with the EMA generator's adapter as "
                   "pytorch_lora_weights.safetensors for the teacher's pipeline (pipe.load_lora_weights), its "
                   "scheduler/ and a README.md model card")
    x.add_argument("--lora-rank", type=int, default=None, metavar="R", help="with --lora, for a fully fine-tuned "
                   "student: extract a rank-R LoRA from its weight difference to the teacher by truncated SVD")

    ev = command("evaluate-t2i", "text-to-image metrics of a run: FID, CLIP score, in-batch similarity, HPSv2",
                 _evaluate_t2i, "Text-to-image metrics (Table 4, App. D) of a run's student, or of its "
                 "teacher with --teacher-steps/--guidance. Several GPUs: torchrun --nproc_per_node=N -m fdistill "
                 "evaluate-t2i ...")
    ev.add_argument("--checkpoint", required=True, help="a text-to-image distill run folder or one of its checkpoints")
    ev.add_argument("--prompts", required=True, help="prompts, one per line (e.g. COCO-2014's 30K captions)")
    ev.add_argument("--ref", help="FID reference: a folder of images (COCO val2014/, statistics cached), an .npz "
                    "with mu/sigma, or 'digits' (digits-FID)")
    ev.add_argument("--num-prompts", dest="num", type=int, default=0, help="only the first N prompts (0: all)")
    ev.add_argument("--group", type=int, default=1, help="images per prompt (in-batch similarity needs >= 2)")
    ev.add_argument("--teacher-steps", type=int, default=None, help="score the teacher with this many Heun steps")
    ev.add_argument("--guidance", type=float, default=None, help="the teacher's CFG scale (with --teacher-steps)")
    ev.add_argument("--inception", metavar="PATH", help="Inception-v3 weights (as for evaluate)")
    ev.add_argument("--clip", metavar="PATH", help="open_clip weights for the CLIP score (default: $FDISTILL_CLIP, "
                    "else the cache folder); none given: no CLIP score")
    ev.add_argument("--clip-model", default="ViT-g-14", help="open_clip architecture of --clip")
    ev.add_argument("--dino", metavar="PATH", help="DINO ViT-B/8 weights for the in-batch similarity")
    ev.add_argument("--hps", metavar="PATH", help="the HPSv2 checkpoint (HPS_v2_compressed.pt)")
    ev.add_argument("--out", help="folder for images and metrics (default: <run>/eval or <run>/eval-teacher)")
    ev.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    ev.add_argument("--shard", type=int, default=1000, help="images per PNG shard (the unit of resuming)")
    ev.add_argument("--batch", type=int, default=32, help="images per network call")
    ev.add_argument("--json", metavar="PATH", help="also write the metrics here")
    runtime(ev, None)

    pl = command("prepare-latents", "encode captioned images (or clips, for a text-to-video teacher) once into "
                 "latent shards (VAE latents, text embeddings) for text-to-image / text-to-video training",
                 _prepare_latents)
    pl.add_argument("--teacher", required=True, help="the text-to-image pipeline folder (SD1.5 / SDXL, SD3, FLUX.1, "
                    "SANA, Qwen-Image) or text-to-video one (Wan2.1 / 2.2) whose VAE and text encoders encode the "
                    "data")
    pl.add_argument("--data", required=True, help="WebDataset .tar shards (a folder, a file or shard-{000..009}.tar) "
                    "or a folder of images with same-named .txt captions; for a text-to-video teacher the same of "
                    "clips (.mp4, .m4v, .mov, .webm, .mkv), each read at teacher_options.num_frames frames (4n + 1) "
                    "from its start at --fps, resized and center-cropped to teacher_options.height x width")
    pl.add_argument("--out", required=True, help="the latent-shards folder; an interrupted run continues there")
    pl.add_argument("--resolution", type=int, default=None, help="pixels (default: text.resolution, else the "
                    "teacher's)")
    pl.add_argument("--batch", type=int, default=16, help="images (or clips) per encoder call")
    pl.add_argument("--fps", type=float, default=None, help="text-to-video: the frame rate clips are sampled at "
                    "(default: the family's, Wan's 16)")
    pl.add_argument("--shard-size", type=int, default=1024, help="samples per shard")
    pl.add_argument("--on-bad-data", choices=("skip", "error"), default="skip",
                    help="a corrupt image or clip (or one too short for the frames), or a missing caption: skip it "
                    "with a warning, or stop")
    configured(pl, DIGITS_PRESET, "teacher_options.max_sequence_length=64 text.resolution=512 (Wan: "
               "teacher_options.num_frames=81 teacher_options.height=480 teacher_options.width=832)")
    runtime(pl, None)

    e = command("evaluate", "FID / precision / recall (and class accuracy) of samples", _evaluate)
    e.add_argument("samples", help="a `fdistill sample` folder or its samples.npz; also .npy arrays and ADM's "
                   "arr_0 .npz files (uint8 NCHW or NHWC)")
    e.add_argument("--data", default=None,
                   help="real images to compare with: 'digits' or any dataset fdistill reads (folder, EDM .zip, .npz, "
                   "CIFAR-10 batches). Default: digits, scored in digits-FID space unless --inception/--ref is "
                   "given; any other dataset is scored in Inception space, its features cached")
    e.add_argument("--inception", metavar="PATH",
                   help="Inception-v3 weights for the standard FID: inception-2015-12-05.pt (NVIDIA TorchScript) or "
                   "pt_inception-2015-12-05-6726825d.pth (pytorch-fid), or a folder holding one. Default: "
                   "$FDISTILL_INCEPTION, else the cache folder ($FDISTILL_CACHE or ~/.cache/fdistill)")
    e.add_argument("--ref", metavar="PATH.npz", help="Inception reference statistics (EDM-style .npz with mu, sigma): "
                   "FID against them; precision/recall also need --data")
    e.add_argument("--k", type=int, default=3, help="k of k-NN precision/recall")
    e.add_argument("--batch", type=int, default=64, help="images per feature-network batch")
    e.add_argument("--json", metavar="PATH", help="also write the metrics as JSON")
    runtime(e, None)
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` overrides may stand anywhere (argparse alone takes them only in one run)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one command. A mistake in the input ends in one line (exit 2), a diverged run in one line (exit 1),
    a preempted run (SIGTERM/SIGINT) after its checkpoint with EXIT_PREEMPTED; warnings are one line each."""
    args = parse(argv)  # --help and --version answer here, before torch is imported
    from fdistill.training.loop import EXIT_PREEMPTED, Preempted

    def say(message: object, *_) -> None:
        print(f"fdistill {args.command}: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = lambda message, *_: say(f"warning: {message}")
        try:
            require_torch()  # before any file is read: see fdistill.MIN_TORCH
            _threads(args)
            args.func(args)
        except Preempted as e:
            say(e)
            return EXIT_PREEMPTED
        except FloatingPointError as e:
            say(e)
            return 1
        except (ValueError, OSError, KeyError, ImportError, NotImplementedError) as e:
            text = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
            say(f"error: {' '.join(text.split()) if chr(10) in text else text}")  # one line, whatever raised it
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
