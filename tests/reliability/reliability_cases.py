"""Shared helpers of the reliability tests: tiny real runs, argv builders, and the one-line error check."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "probe"))
from probe_cases import make_run  # noqa: E402

# a tiny but real training grid: two runs of a small MLP on the embedded digits, 2 epochs
TRAIN_ARGS = ["train", "--model-kwargs", '{"widths": [16]}', "--batch-sizes", "256,512", "--epochs", "2",
              "--checkpoint-epochs", "1,2", "--no-progress"]


def tiny_run(folder: Path, *, widths: list[int] | None = None, seed: int = 0) -> dict[str, Path]:
    """``init.pt`` (tag init), ``early.pt`` and ``late.pt`` of a small MLP: the probe tests' :func:`make_run`."""
    return make_run(folder, widths=widths, seed=seed)


def probe_argv(paths: dict[str, Path], out: Path, *extra: str, protocol: str = "frozen") -> list[str]:
    return ["probe", "--checkpoint", str(paths["early"]), "--checkpoint", str(paths["late"]), "--data", "digits",
            "--batch-sizes", "1,2,4", "--budget", "4", "--trials", "4", "--trials-per-unit", "2",
            "--protocol", protocol, "--out", str(out), "--no-progress", *extra]


_USAGE = re.compile(r"^usage: |^\s")  # argparse's own usage block precedes its one error line


def one_error_line(err: str) -> str:
    """The single ``gradlab: error:`` line of stderr; fails if there is a traceback or more than one line."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not _USAGE.match(ln)]
    errors = [ln for ln in lines if ln.startswith("gradlab: error:") or ln.startswith("gradlab ") and "error" in ln]
    assert len(errors) == 1, err
    assert [ln for ln in lines if not ln.startswith(("WARNING", "INFO"))] == errors, err
    return errors[0]
