"""The ``fdistill`` command line."""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args: argparse.Namespace) -> None:
    import torch

    from fdistill import toy

    torch.set_num_threads(args.threads or torch.get_num_threads())
    cfg = toy.load_config(args.config, args.overrides)
    t0 = time.perf_counter()
    print(toy.run_demo(cfg, args.out, progress=not args.no_progress))
    print(f"total wall time {time.perf_counter() - t0:.0f} s")


def _analyze(args: argparse.Namespace) -> None:
    from fdistill.analysis import analyze

    print(analyze(args.out, args.custom))


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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "config", "unset") is None:
        from fdistill.toy import PRESET

        args.config = PRESET
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"fdistill {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
