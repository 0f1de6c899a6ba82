"""`gradlab analyze STORE`: statistics, law fits with intervals, figures and a report from a probe store.

Top-level imports are the stdlib only (``gradlab --help`` stays fast and torch-free); the analysis runs in
:func:`gradlab.analysis.run.analyze_store`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
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
    cbs.add_argument("--epsilon", type=float, default=None, help="relative loss tolerance of the branching "
                     "estimator (default 0.05)")
    cbs.add_argument("--target-loss", type=float, help="target loss of the steps-examples fit (default: halfway "
                     "from the checkpoint's loss to the smallest batch size's after the budget)")
    cbs.add_argument("--cbs-loss", choices=("test_loss", "train_loss"), default=None,
                     help="the loss both estimators read (default test_loss, held-out)")


def run(args: argparse.Namespace) -> int:
    from gradlab.analysis.run import analyze_store
    from gradlab.analysis.table import fit_rows, format_table

    result = analyze_store(args.store, out_dir=args.out, ref_batch_size=args.ref_batch_size, n_boot=args.n_boot,
                           seed=args.seed, figures=not args.no_figures,
                           cbs_options={"epsilon": args.epsilon, "target_loss": args.target_loss,
                                        "noise_store": args.noise_store, "cbs_loss": args.cbs_loss})
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
        print("\n".join(monitor_lines(result)))
    else:
        print("\n".join(sharpness_lines(result)))
    from gradlab.analysis.persist import default_out_dir

    out = Path(args.out) if args.out else default_out_dir(Path(args.store))
    print(f"wrote {out}/summary.json" + ("" if args.no_figures or not (out / "report.html").exists() else
                                         ", the figures and report.html"))
    return 0


def monitor_lines(result: dict) -> list[str]:
    """What ``gradlab analyze`` prints for a monitor store (``--json`` for everything)."""
    from gradlab.analysis.interval import format_estimate

    lines = [f"{result.get('store', 'monitor store')}: {result['recorded_steps']} recorded steps (last step "
             f"{result['last_step']}, {result['examples_seen']} examples seen), {result.get('estimator')} estimator"]
    for group, est in (result.get("last") or {}).items():
        b = est["b_noise"]
        lines.append(f"  {group}: B_noise {format_estimate(b)}; ‖G‖² {format_estimate(est['grad_sq_norm_ema'])}; "
                     f"tr Σ {format_estimate(est['trace_cov_ema'])}" + (f"  ({b['note']})" if b.get("note") else ""))
    if result.get("missing"):
        lines.append("  steps without an estimate: " + ", ".join(f"{n} × {why}" for why, n in result["missing"].items()))
    for note in result.get("notes", []):
        lines.append(f"  note: {note}")
    return lines


def sharpness_lines(result: dict) -> list[str]:
    """What ``gradlab analyze`` prints for a sharpness store (``--json`` for everything)."""
    sharp = result.get("sharpness", {})
    lines = [f"{result.get('store', 'sharpness store')}: {len(sharp.get('checkpoints', []))} checkpoints"]
    for c in sharp.get("checkpoints", []):
        def g(k: str) -> str:
            v = c.get(k)
            return "nan" if v is None else f"{float(v):.4g}"
        lines.append(f"  {c['checkpoint']}: λ_max {g('lambda_max')}, batch size {g('train_batch_size')}, "
                     f"lr {g('train_lr')}, epoch {g('epoch')}, generalisation gap {g('generalization_gap')}")
    return lines
