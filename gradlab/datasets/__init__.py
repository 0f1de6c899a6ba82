"""Datasets by name (``digits``, ``mnist``, ``fashion-mnist``, ``cifar10``) or user ``pkg.module:factory``.

Every loader returns a :class:`DataBundle`: float32 images (N, C, H, W), int64 labels, a fixed train/test split,
and provenance.  The registry is an explicit dict of ``name -> "module:callable"`` imported on use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradlab.errors import UsageError
from gradlab.factory import is_factory_spec, resolve_factory

DATASETS: dict[str, str] = {
    "digits": "gradlab.datasets.digits:load_digits",
    "mnist": "gradlab.datasets.idx:load_mnist",
    "fashion-mnist": "gradlab.datasets.idx:load_fashion_mnist",
    "cifar10": "gradlab.datasets.cifar:load_cifar10",
    "shakespeare-char": "gradlab.datasets.text:load_shakespeare_char",
}


@dataclass(frozen=True)
class Split:
    """One split: inputs ``x`` (N, C, H, W) float32 and labels ``y`` (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise UsageError(f"inputs have {self.x.shape[0]} rows but labels have {self.y.shape[0]}")

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class DataBundle:
    name: str
    train: Split
    test: Split | None
    n_classes: int
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.train.x.shape[1:])


def _as_split(obj: Any, spec: str) -> Split:
    if isinstance(obj, Split):
        return obj
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj):
        x, y = obj
    elif isinstance(obj, torch.utils.data.Dataset):
        try:
            n = len(obj)  # type: ignore[arg-type]
            items = [obj[i] for i in range(n)]
            x = torch.stack([torch.as_tensor(it[0]) for it in items]) if n else torch.empty(0)
            y = torch.as_tensor([int(it[1]) for it in items])
        except (TypeError, IndexError, ValueError, RuntimeError) as exc:
            raise UsageError(f"data factory {spec!r} returned a Dataset whose items are not (input, label) pairs of "
                             f"equal-shaped tensors and integer labels with a len(): {exc}") from exc
    else:
        raise UsageError(
            f"data factory {spec!r} returned {type(obj).__name__}; expected (x, y) tensors, a torch Dataset, or a "
            "dict with keys 'train' and optionally 'test' holding either"
        )
    if x.dim() >= 1 and x.shape[0] == 0:
        raise UsageError(f"data factory {spec!r} returned no examples; return at least one (input, label) pair")
    if x.dim() not in (2, 3, 4) or y.dim() != 1:
        raise UsageError(f"data factory {spec!r} returned inputs of shape {tuple(x.shape)} and labels of shape "
                         f"{tuple(y.shape)}; expected inputs (N, D), (N, H, W) or (N, C, H, W) and labels (N,)")
    if (y.is_floating_point() and not torch.equal(y, y.round())) or (y.numel() and int(y.min()) < 0):
        raise UsageError(f"data factory {spec!r} returned labels that are not class indices 0..K-1")
    x = x.float()
    if x.dim() == 2:
        x = x[:, None, None, :]
    elif x.dim() == 3:
        x = x[:, None]
    return Split(x.contiguous(), y.long().contiguous())


def _from_factory(spec: str) -> DataBundle:
    out = resolve_factory(spec, "data")()
    if isinstance(out, DataBundle):
        return out
    if isinstance(out, dict):
        if "train" not in out:
            raise UsageError(f"data factory {spec!r} returned a dict without a 'train' entry")
        train = _as_split(out["train"], spec)
        test = _as_split(out["test"], spec) if out.get("test") is not None else None
    else:
        train, test = _as_split(out, spec), None
    n_classes = int(max(train.y.max(), test.y.max() if test is not None else 0)) + 1
    return DataBundle(spec, train, test, n_classes, {"source": f"user factory {spec}"})


def load_data(spec: str, root: str | Path | None = None, download: bool = False) -> DataBundle:
    """Load a dataset by registered name or ``pkg.module:factory``.

    ``root`` is the folder holding the raw files of MNIST/Fashion-MNIST/CIFAR-10 (default ``~/.cache/gradlab``);
    ``download`` fetches missing files with checksum verification.
    """
    if is_factory_spec(spec):
        return _from_factory(spec)
    if spec not in DATASETS:
        raise UsageError(f"unknown dataset {spec!r}; choose one of {sorted(DATASETS)} or pass 'pkg.module:factory'")
    module, _, attr = DATASETS[spec].partition(":")
    loader = getattr(importlib.import_module(module), attr)
    return loader(root=root, download=download)
