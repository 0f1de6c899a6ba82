"""The one check of a ``--device`` flag, shared by every command (probe, sharpness, and the jobs to come)."""

from __future__ import annotations

import re

from gradlab.errors import UsageError

_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def check_device(device: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` with N a visible CUDA device; anything else is a one-line usage error.

    >>> check_device("cpu")
    'cpu'
    >>> check_device("gpu")
    Traceback (most recent call last):
    gradlab.errors.UsageError: unknown --device 'gpu'; use cpu, cuda or cuda:N
    """
    match = _DEVICE.match(str(device))
    if match is None:
        raise UsageError(f"unknown --device {device!r}; use cpu, cuda or cuda:N")
    if match.group(1) == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}, but torch sees no CUDA device; use --device cpu or a CUDA build "
                             "of torch")
        index = int(match.group(2) or 0)
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}, but torch sees {torch.cuda.device_count()} CUDA device(s); "
                             f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return str(device)
