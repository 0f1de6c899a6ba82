"""`gradlab sharpness`: Hessian eigenvalues, trace and ε-sharpness of checkpoints into a resumable zarr store.

A thin shell over :mod:`gradlab.curvature.run`; torch is imported only inside :func:`run`.
"""

from __future__ import annotations

import argparse
import sys

from gradlab.cli.common import add_dispatch_arguments, add_task_arguments, dispatch_args, model_kwargs_arg
from gradlab.errors import UsageError


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated numbers such as 1e-3,5e-4; got {text!r}") from None


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated integers such as 16,64,256; got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", action="append", required=True, metavar="PATH",
                        help="checkpoint to measure (repeat for several)")
    parser.add_argument("--data", default="digits", help="dataset name or pkg.module:factory (default digits)")
    parser.add_argument("--data-root", default=None, help="folder with raw dataset files")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--samples", type=int, default=1024, metavar="N",
                      help="fixed random sample of N training examples (default 1024; indices recorded)")
    size.add_argument("--full", action="store_true", help="use the whole training set")
    parser.add_argument("--top-k", type=int, default=5, metavar="K", help="top eigenvalues by Lanczos (default 5)")
    parser.add_argument("--hutchinson-probes", type=int, default=None, metavar="P",
                        help="HVP budget for the trace (default: Hutchinson probes until the standard error is at "
                             "most 2%% of |trace|, 50 to 2000 HVPs)")
    parser.add_argument("--trace-estimator", choices=("hutchinson", "hutch++"), default="hutchinson",
                        help="trace estimator: Hutchinson, or Hutch++ (lower variance when a few eigenvalues "
                             "dominate; default hutchinson)")
    parser.add_argument("--eps", default="1e-3,5e-4", help="epsilon values for Keskar's sharpness (default 1e-3,5e-4)")
    parser.add_argument("--subspace-dim", type=int, default=None, metavar="p",
                        help="also maximise in a random p-dimensional subspace")
    parser.add_argument("--minibatch-sizes", default="", metavar="M1,M2,...",
                        help="batch sizes for mini-batch Hessian lambda_max (e.g. 16,64,256)")
    parser.add_argument("--minibatch-trials", type=int, default=10, metavar="T", help="trials per batch size")
    parser.add_argument("--interpolate", nargs=2, default=None, metavar=("SMALL", "LARGE"),
                        help="Keskar's parametric plot between a small- and a large-batch checkpoint")
    parser.add_argument("--alpha-points", type=int, default=31, help="alpha grid size on [-1, 2] (default 31)")
    parser.add_argument("--bn-mode", choices=("eval", "train"), default="eval",
                        help="batch norm statistics for the Hessian (default eval: running statistics)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64", help="arithmetic precision")
    parser.add_argument("--chunk-size", type=int, default=512, help="examples per double-backward chunk")
    parser.add_argument("--cache-graph", choices=("auto", "yes", "no"), default="auto",
                        help="keep the gradient's double-backward graph between Hessian-vector products (about "
                             "1.5-3x faster HVPs; memory of every chunk at once). auto: only when one chunk "
                             "covers the sample (default)")
    parser.add_argument("--lanczos-tol", type=float, default=None, help="eigsh tolerance (default by dtype)")
    parser.add_argument("--lbfgs-iters", type=int, default=10, help="L-BFGS-B iterations for epsilon-sharpness")
    parser.add_argument("--model", default=None, help="model name or pkg.module:factory (foreign checkpoints)")
    parser.add_argument("--model-kwargs", metavar="JSON", help="model keyword arguments as a JSON object")
    add_task_arguments(parser, default_loss=None)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="output zarr store")
    where.add_argument("--into", metavar="PROBE_STORE",
                       help="write into an existing probe store, as its 'sharpness' group")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted store")
    parser.add_argument("--no-progress", action="store_true", help="hide progress messages")
    add_dispatch_arguments(parser)


def _check_into(probe: object, checkpoints: list[str], into: str) -> None:
    """``--into`` puts sharpness beside the probe's numbers of the same checkpoints: each must be one of the probe
    store's (by content, SHA-256)."""
    import json

    from gradlab.checkpoint import checkpoint_sha256
    from gradlab.checkpoint_set import parse_checkpoint_arg
    from gradlab.errors import UsageError

    cfg = json.loads(probe.attrs.get("config", "{}"))
    known = {c.get("sha256"): c.get("label") for c in cfg.get("checkpoints", [])}
    for arg in checkpoints:
        _, path = parse_checkpoint_arg(arg)
        if path.is_file() and checkpoint_sha256(path) not in known:
            raise UsageError(f"checkpoint {str(path)!r} is not one of the probe store's {into!r} (its checkpoints: "
                             f"{sorted(str(v) for v in known.values())}); --into measures the probe's own "
                             "checkpoints: pass one of them, or write another store with --out")


def run(args: argparse.Namespace) -> int:
    from gradlab.curvature.run import SharpnessConfig, run_sharpness

    from pathlib import Path

    out = args.out
    if args.into is not None:
        from gradlab.store import open_store

        probe = open_store(args.into, kind="probe")  # a clear error unless it is a gradlab probe store
        _check_into(probe, args.checkpoint, args.into)
        out = str(Path(args.into) / "sharpness")
    config = SharpnessConfig(
        checkpoints=tuple(args.checkpoint),
        data=args.data,
        data_root=args.data_root,
        samples=None if args.full else args.samples,
        top_k=args.top_k,
        hutchinson_probes=args.hutchinson_probes,
        trace_estimator=args.trace_estimator,
        eps=_floats(args.eps, "--eps"),
        subspace_dim=args.subspace_dim,
        minibatch_sizes=_ints(args.minibatch_sizes, "--minibatch-sizes"),
        minibatch_trials=args.minibatch_trials,
        interpolate=tuple(args.interpolate) if args.interpolate else None,
        alpha_points=args.alpha_points,
        bn_mode=args.bn_mode,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        chunk_size=args.chunk_size,
        cache_graph=args.cache_graph,
        lanczos_tol=args.lanczos_tol,
        lbfgs_maxiter=args.lbfgs_iters,
        model=args.model,
        model_kwargs=model_kwargs_arg(args.model_kwargs),
        loss=args.loss,
        collate=args.collate,
    )
    workers, scheduler = dispatch_args(args)
    out = run_sharpness(config, out, resume=args.resume, workers=workers, scheduler=scheduler,
                        progress=None if args.no_progress else
                        (lambda msg: print(f"gradlab sharpness: {msg}", file=sys.stderr, flush=True)))
    print(f"gradlab sharpness: wrote {out}", file=sys.stderr)
    return 0
