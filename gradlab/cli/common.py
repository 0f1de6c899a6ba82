"""Flags shared by the commands that run a task (model + data + per-example loss, :mod:`gradlab.task`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from gradlab.errors import UsageError

LOSS_HELP = ("per-example loss (default: the data's own, cross-entropy for classification): cross-entropy, mse (regression), lm (causal language "
             "modelling: logits (B, T, V), labels (B, T), -100 ignored), or pkg.module:fn with fn(model, batch) "
             "returning the per-example losses (B,)")


def add_model_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data`` (required), ``--model``, ``--model-kwargs``: what a command that reads checkpoints builds."""
    parser.add_argument("--data", required=True, help="dataset name (digits, mnist, ...) or pkg.module:factory")
    parser.add_argument("--model", help="model name or pkg.module:factory (needed for foreign checkpoints)")
    parser.add_argument("--model-kwargs", metavar="JSON", help="model keyword arguments as a JSON object")


def add_task_arguments(parser: argparse.ArgumentParser, *, default_loss: str | None = "cross-entropy") -> None:
    parser.add_argument("--loss", default=default_loss, metavar="NAME|pkg.module:fn", help=LOSS_HELP)
    parser.add_argument("--collate", metavar="pkg.module:fn",
                        help="turns a list of Dataset items into one batch (default torch's default_collate)")


def model_kwargs_arg(text: str | None) -> dict[str, Any] | None:
    """The JSON object of ``--model-kwargs`` (None when not given)."""
    if text is None:
        return None
    try:
        kw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--model-kwargs is not valid JSON ({exc}); e.g. --model-kwargs '{{\"widths\": [64]}}'") \
            from None
    if not isinstance(kw, dict):
        raise UsageError(f"--model-kwargs must be a JSON object, got {text!r}")
    return kw


def add_dispatch_arguments(parser: argparse.ArgumentParser) -> None:
    """``--workers N`` / ``--scheduler ADDRESS``: where the runner computes the units (:mod:`gradlab.runner`)."""
    parser.add_argument("--workers", type=int, metavar="N",
                        help="compute units on a local Dask cluster of N worker processes (one thread each when N "
                             "equals the cores); pays when units take seconds: see the README")
    parser.add_argument("--scheduler", metavar="ADDRESS", help="compute units on the Dask cluster at ADDRESS")


def dispatch_args(args: argparse.Namespace) -> tuple[int | None, str | None]:
    """The checked ``(workers, scheduler)`` of the flags above (one-line usage errors)."""
    from gradlab.runner.dispatch import check_dispatch

    workers, scheduler = getattr(args, "workers", None), getattr(args, "scheduler", None)
    check_dispatch(workers, scheduler)
    return workers, scheduler
