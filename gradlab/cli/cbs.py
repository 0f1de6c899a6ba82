"""`gradlab cbs`: branch from checkpoints at every batch size of a grid, for the same budget of examples.

A thin shell over :mod:`gradlab.cbs`: parse flags, resolve and validate (nothing is written on bad input: exit 2),
then run the job with the shared runner.  Only the stdlib is imported at module level.
"""

from __future__ import annotations

import argparse

from gradlab.cli.common import add_model_data_arguments, add_dispatch_arguments, add_task_arguments, dispatch_args, model_kwargs_arg
from gradlab.errors import UsageError

DEFAULT_BATCH_SIZES = "8,16,32,64,128,256,512"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", action="append", default=[], metavar="[LABEL=]PATH", required=True,
                        help="checkpoint to branch from (repeatable); label = file stem unless LABEL=PATH")
    add_model_data_arguments(parser)
    add_task_arguments(parser, default_loss=None)
    parser.add_argument("--batch-sizes", default=DEFAULT_BATCH_SIZES, metavar="M,M,...",
                        help=f"batch sizes, each dividing the budget (default {DEFAULT_BATCH_SIZES})")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget", type=int, default=None,  # None: not given (4096, unless --budget-tokens)
                        help="examples per branch N (default 4096)")
    budget.add_argument("--budget-tokens", type=int, metavar="T",
                        help="the budget in tokens instead (language modelling, loss lm only: T / tokens per "
                             "example examples)")
    parser.add_argument("--seeds", type=int, default=8, help="seeds (example streams) per branch (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="root seed (default 0)")
    parser.add_argument("--lr-scaling", choices=("constant", "linear", "sqrt"), default="constant",
                        help="learning rate vs batch size, from the checkpoint's rate at its batch size")
    parser.add_argument("--lr-factors", default="1", metavar="F,F,...",
                        help="a small learning-rate grid per batch size: factors of the rule's rate (default 1); "
                             "the analysis keeps the best per batch size")
    parser.add_argument("--lr", type=float, help="base learning rate (default: lr_applied from the checkpoint)")
    parser.add_argument("--base-batch-size", type=int, help="batch size of --lr (default: the checkpoint's)")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), help="default: the checkpoint's")
    parser.add_argument("--momentum", type=float, help="SGD momentum (default: the checkpoint's)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="weight decay (default 0)")
    parser.add_argument("--evals", type=int, default=32, help="evaluations per branch, evenly spaced in examples")
    parser.add_argument("--eval-examples", type=int, default=None,
                        help="training examples the training loss is evaluated on, at most the training set "
                             "(default 1024, or the whole training set when it is smaller)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--engine", choices=("auto", "chain", "loop"), default="auto",
                        help="auto: lock-step batched matmuls for Linear/ReLU chains, else branch by branch")
    parser.add_argument("--diverge-factor", type=float, default=10.0,
                        help="> 1 (default 10): a branch is recorded as diverged (and left out of the estimators) "
                             "when its training loss turns non-finite or exceeds both this × the checkpoint's loss "
                             "and the loss of the zero output (log C for cross-entropy over C classes), so a "
                             "healthy branch of a low-loss checkpoint is not flagged")
    parser.add_argument("--out", required=True, help="the zarr store to write")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted store (same flags)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_dispatch_arguments(parser)


def _list(text: str, cast: type, flag: str) -> list:
    try:
        return [cast(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r} must be a comma-separated list, e.g. 8,16,32") from None


def run(args: argparse.Namespace) -> int:
    from gradlab.api import cbs_job
    from gradlab.cbs import run_cbs

    workers, scheduler = dispatch_args(args)
    job = cbs_job(
        args.checkpoint, data=args.data, batch_sizes=_list(args.batch_sizes, int, "--batch-sizes"),
        budget=args.budget, budget_tokens=args.budget_tokens, lr_scaling=args.lr_scaling, lr_factors=_list(args.lr_factors, float, "--lr-factors"),
        seeds=args.seeds, seed=args.seed, lr=args.lr, base_batch_size=args.base_batch_size,
        optimizer=args.optimizer, momentum=args.momentum, weight_decay=args.weight_decay, n_evals=args.evals,
        eval_examples=args.eval_examples, dtype=args.dtype, engine=args.engine, diverge_factor=args.diverge_factor,
        model=args.model, model_kwargs=model_kwargs_arg(args.model_kwargs), loss=args.loss, collate=args.collate)
    summary = run_cbs(job, args.out, resume=args.resume, workers=workers, scheduler=scheduler,
                      progress=not args.no_progress)
    print(f"wrote {summary.path}: {summary.units_computed} of {summary.units_total} units "
          f"({len(job.lr_factors) * job.seeds} branches each) computed in {summary.seconds:.1f} s"
          + (f"; {int(summary.results['diverged'])} branches diverged (diverged_step)"
             if summary.results.get("diverged") else ""))
    return 0
