"""The one ``--device`` check (gradlab.devices.check_device): its grammar, and the visible-device count (torch.cuda
mocked, so the CUDA branch is tested on CPU-only machines too)."""

from __future__ import annotations

import pytest

from gradlab.devices import check_device
from gradlab.errors import UsageError


@pytest.mark.parametrize("device", ["cuda:x", "cuda:", "cuda:-1", "cuda:1.0", "cuda:0:0", "CUDA", " cpu", "cpu ",
                                    "gpu", "mps", ""])
def test_malformed_devices_are_refused_by_name(device):
    with pytest.raises(UsageError, match=r"unknown --device .*; use cpu, cuda or cuda:N"):
        check_device(device)


def test_cuda_indices_are_checked_against_the_visible_devices(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [check_device(d) for d in ("cpu", "cuda", "cuda:0", "cuda:1")] == ["cpu", "cuda", "cuda:0", "cuda:1"]
    with pytest.raises(UsageError, match=r"--device cuda:2, but torch sees 2 CUDA device\(s\); use cuda:0..cuda:1"):
        check_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="torch sees no CUDA device"):
        check_device("cuda:0")
