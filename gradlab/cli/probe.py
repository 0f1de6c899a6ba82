"""`gradlab probe`: summed-gradient norms for every batch size, distance and cosine to init, in a resumable store.

A thin shell over :mod:`gradlab.probe.run`: parse flags, resolve and validate the config (nothing is written on bad
input: exit 2), then print the plan (``--dry-run``) or run the probe with a progress bar on stderr.  Only the stdlib
is imported at module level.
"""

from __future__ import annotations

import argparse

from gradlab.cli.common import add_model_data_arguments, add_dispatch_arguments, add_task_arguments, dispatch_args, model_kwargs_arg
from gradlab.errors import UsageError

# Powers of two: the blog's 3, 5, 6, 7 do not divide its budget N = 1024, and every batch size must divide N.
DEFAULT_BATCH_SIZES = "1,2,4,8,16,32,64,128,256,512,1024"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", action="append", default=[], metavar="[LABEL=]PATH", required=True,
                        help="checkpoint to probe (repeatable); label = file stem unless given as LABEL=PATH")
    parser.add_argument("--init", metavar="PATH", help="init checkpoint θ₀ for distances and cosines (default: the "
                        "checkpoint tagged 'init' in each checkpoint's folder; NaN if none)")
    add_model_data_arguments(parser)
    add_task_arguments(parser, default_loss=None)
    parser.add_argument("--batch-sizes", default=DEFAULT_BATCH_SIZES, metavar="M,M,...",
                        help=f"batch sizes, each dividing the budget (default {DEFAULT_BATCH_SIZES})")
    parser.add_argument("--budget", type=int, default=1024, help="examples per trial N (default 1024)")
    parser.add_argument("--trials", type=int, default=100, help="trials per checkpoint (default 100)")
    parser.add_argument("--protocol", choices=("step", "frozen"), default="step",
                        help="step: N/m SGD steps per trial; frozen: minibatch gradients at fixed θ (default step)")
    parser.add_argument("--reduction", choices=("mean", "sum"), default="mean", help="minibatch loss reduction")
    parser.add_argument("--lr", type=float, default=0.01,
                        help="SGD learning rate of the step protocol, >= 0 (default 0.01)")
    parser.add_argument("--params", default=".", metavar="REGEX",
                        help="regex searched in parameter names: the tensors whose gradients are measured "
                        "(default: all)")
    parser.add_argument("--keep", choices=("norms", "histograms", "vectors"), default="histograms",
                        help="norms; + entry histograms of S; + S itself for the selected parameters")
    parser.add_argument("--out", required=True, help="the zarr store to write")
    parser.add_argument("--seed", type=int, default=0, help="root seed (default 0)")
    parser.add_argument("--draws", choices=("common", "independent"), default="common",
                        help="common (default): trial t uses the same examples at every checkpoint, so early vs late "
                             "is a paired comparison; independent: each checkpoint draws its own")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default=None,
                        help="compute dtype (default: the widest floating dtype of the model and the data, so a "
                             "float32 model on float32 data runs in float32; any cast is said on stderr)")
    parser.add_argument("--replacement", action="store_true", help="draw each trial's examples with replacement")
    parser.add_argument("--trials-per-unit", type=int, metavar="T",
                        help="trials per unit of work and per store chunk (default: 8, fewer for huge vectors)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted store (same flags)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and an estimated time; write nothing")
    add_dispatch_arguments(parser)


def _batch_sizes(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--batch-sizes {text!r} must be comma-separated integers, e.g. 1,2,4,8") from None


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def run(args: argparse.Namespace) -> int:
    import logging

    from gradlab.probe.run import plan_probe, resolve_config, run_probe

    if not getattr(args, "verbose", False):
        logging.getLogger("distributed").setLevel(logging.WARNING)  # Dask's INFO chatter only with -v

    dispatch_args(args)
    config = resolve_config(
        args.checkpoint, data=args.data, init=args.init, model=args.model,
        model_kwargs=model_kwargs_arg(args.model_kwargs),
        batch_sizes=_batch_sizes(args.batch_sizes), budget=args.budget, trials=args.trials, protocol=args.protocol,
        reduction=args.reduction, lr=args.lr, params=args.params, keep=args.keep, seed=args.seed, device=args.device,
        dtype=args.dtype, replacement=args.replacement, trials_per_unit=args.trials_per_unit, loss=args.loss,
        collate=args.collate, draws=args.draws)
    if args.dry_run:
        plan = plan_probe(config, args.out, resume=args.resume, workers=args.workers or 1)
        print(f"probe plan for {args.out} ({config.protocol} protocol, {len(config.checkpoints)} checkpoint(s), "
              f"{config.trials} trials, batch sizes {list(config.batch_sizes)}, budget {config.budget})")
        print(f"  parameters: {len(config.selected)} of {len(config.layers)} tensors selected "
              f"({config.n_selected} entries)")
        print(f"  units: {plan.units_todo} to compute of {plan.units_total} ({plan.trials_per_unit} trials each)")
        print(f"  calibration: {plan.seconds_per_trial:.3f} s per trial (all batch sizes)")
        print(f"  estimated time: {plan.estimated_seconds:.0f} s")
        print(f"  store size: at most {_human_bytes(plan.store_bytes)} (uncompressed)")
        print("  dry run: nothing written")
        return 0
    summary = run_probe(config, args.out, resume=args.resume, workers=args.workers, scheduler=args.scheduler,
                        progress=not args.no_progress)
    print(f"wrote {summary.path}: {summary.units_computed} of {summary.units_total} units computed in "
          f"{summary.seconds:.1f} s" + (f"; {summary.nonfinite} non-finite gradient entries (see nonfinite_count)"
                                        if summary.nonfinite else ""))
    return 0
