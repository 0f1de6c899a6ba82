"""`gradlab analyze STORE`: statistics, law fits with intervals, figures and a report from a probe store.

Top-level imports are the stdlib only (``gradlab --help`` stays fast and torch-free); the analysis runs in
:func:`gradlab.analysis.run.analyze_store`.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", metavar="STORE", help="probe, sharpness, monitor or cbs store written by gradlab")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="folder for summary.json, figures and report.html (default: STORE-analysis next to it)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout (nothing else)")
    parser.add_argument("--ref-batch-size", type=int, default=None, metavar="M",
                        help="batch size whose mean norm is the reference of the normalised statistics (default: "
                             "the largest)")
    parser.add_argument("--n-boot", type=int, default=999, metavar="B",
                        help="bootstrap resamples for every interval (default 999; 0: no intervals)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the bootstrap (default 0)")
    parser.add_argument("--no-figures", action="store_true", help="skip figures and the HTML report")
    cbs = parser.add_argument_group("cbs stores (critical batch size)")
    cbs.add_argument("--noise-store", metavar="STORE", help="frozen probe or monitor store at the same checkpoints: "
                     "reports B_crit / B_noise")
    cbs.add_argument("--epsilon", type=float, default=0.05, help="relative loss tolerance of the branching "
                     "estimator (default 0.05)")
    cbs.add_argument("--target-loss", type=float, help="target loss of the steps-examples fit (default: halfway "
                     "from the checkpoint's loss to the smallest batch size's after the budget)")
    cbs.add_argument("--cbs-loss", choices=("test_loss", "train_loss"), default="test_loss",
                     help="the loss both estimators read (default test_loss, held-out)")


def run(args: argparse.Namespace) -> int:
    from gradlab.analysis.run import analyze_store
    from gradlab.analysis.table import fit_rows, format_table

    result = analyze_store(args.store, out_dir=args.out, ref_batch_size=args.ref_batch_size, n_boot=args.n_boot,
                           seed=args.seed, figures=not args.no_figures,
                           cbs_options={"epsilon": args.epsilon, "target_loss": args.target_loss,
                                        "noise_store": args.noise_store, "loss": args.cbs_loss})
    for note in result.get("notes", []):
        print(f"gradlab analyze: note: {note}", file=sys.stderr)
    if args.json:
        from gradlab.analysis.output import jsonable

        print(json.dumps(jsonable(result), allow_nan=False, ensure_ascii=False))
        return 0
    if result.get("gradlab_store") == "probe":
        print(f"{result['store']}: {result['protocol']} protocol, {result['reduction']} reduction, "
              f"{'with' if result['replacement'] else 'without'} replacement, "
              f"trials " + ", ".join(f"{k}={v['n_trials']}" for k, v in result["checkpoints"].items()))
        print(format_table(fit_rows(result)))
    elif result.get("gradlab_store") == "cbs":
        from gradlab.analysis.cbs import summary_lines

        print("\n".join(summary_lines(result)))
    elif result.get("gradlab_store") == "monitor":
        from gradlab.analysis.output import jsonable

        overall = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
        print(json.dumps(jsonable(overall), indent=2, ensure_ascii=False, allow_nan=True))
    else:
        print(json.dumps(result.get("sharpness", {}), indent=2, ensure_ascii=False))
    return 0
