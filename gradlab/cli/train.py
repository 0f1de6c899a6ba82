"""`gradlab train` (placeholder while it is being written; replaced by the real module)."""

from __future__ import annotations

import argparse

from gradlab.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise UsageError("gradlab train is not available yet")
