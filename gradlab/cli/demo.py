"""``gradlab demo``: train, probe (both protocols), sharpness and analysis on the embedded digits."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo", help="output folder (default: demo/)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out")
    p.add_argument("--quick", action="store_true", help="a tiny version (narrow MLP, few epochs/trials) for smoke tests")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    from gradlab.demo import DemoConfig, run_demo

    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    run_demo(args.out, cfg=cfg, resume=args.resume, progress=not args.no_progress)
    print(f"demo finished: open {args.out}/report/index.html (figures, summary.json per store)")
    return 0
