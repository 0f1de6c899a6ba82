"""Datasets by name (``digits``, ``mnist``, ``fashion-mnist``, ``cifar10``) or user ``pkg.module:factory``.

Every loader returns a :class:`DataBundle`: train/test :class:`Split` s (batches of all their examples, see
:mod:`gradlab.task`; the built-in image sets hold float32 images (N, C, H, W) and int64 labels), the number of
classes and provenance.  User factories may return (x, y) tensors of any shape and dtype, a torch Dataset whose
items are tuples or dicts (collated with ``default_collate`` or a given collate function), or a dict with
train/test; nothing is reshaped or cast.  The registry is an explicit dict of ``name -> "module:callable"`` imported on use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import default_collate

from gradlab.errors import UsageError
from gradlab.factory import is_factory_spec, resolve_factory
from gradlab.task import batch_len, batch_nonfinite, index_batch, inputs_targets, source_sha256

DATASETS: dict[str, str] = {
    "digits": "gradlab.datasets.digits:load_digits",
    "mnist": "gradlab.datasets.idx:load_mnist",
    "fashion-mnist": "gradlab.datasets.idx:load_fashion_mnist",
    "cifar10": "gradlab.datasets.cifar:load_cifar10",
    "shakespeare-char": "gradlab.datasets.text:load_shakespeare_char",
}


class Split:
    """One split: a batch pytree of all its examples (see :mod:`gradlab.task`), e.g. ``(x, y)`` tensors.

    ``Split(x, y)`` stores the pair ``(x, y)``; ``Split(batch)`` any batch (a tuple/list/dict of tensors sharing
    their first dimension).  Nothing is reshaped or cast.  ``x``/``y`` give the inputs and targets of
    (inputs, targets) batches.
    """

    __slots__ = ("batch",)

    def __init__(self, x: Any, y: Any = None) -> None:
        batch = x if y is None else (x, y)
        object.__setattr__(self, "batch", batch)
        batch_len(batch)  # checks that every tensor shares the first dimension

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Split is immutable")

    @property
    def x(self) -> Any:
        return inputs_targets(self.batch)[0]

    @property
    def y(self) -> Any:
        return inputs_targets(self.batch)[1]

    def __len__(self) -> int:
        return batch_len(self.batch)

    def __getitem__(self, idx: Any) -> Any:
        """The batch of examples ``idx`` (an index tensor or a slice)."""
        return index_batch(self.batch, idx)


@dataclass(frozen=True)
class DataBundle:
    """A dataset: train (and optional test) splits, the number of classes of classification targets (0 when the
    targets are not class indices), provenance, and the loss its task uses by default."""

    name: str
    train: Split
    test: Split | None
    n_classes: int
    provenance: dict[str, Any] = field(default_factory=dict)
    loss: str = "cross-entropy"  # the task's natural per-example loss (gradlab.task), used when --loss is not given

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example's input (the zoo builders' ``input_shape``); () when inputs are not one tensor."""
        try:
            x = self.train.x
        except UsageError:
            return ()
        return tuple(int(s) for s in x.shape[1:]) if isinstance(x, torch.Tensor) else ()


def _collate_all(items: list[Any], collate: Callable[[list[Any]], Any], spec: str) -> Any:
    try:
        return collate(items)
    except (TypeError, RuntimeError, ValueError, KeyError, IndexError) as exc:
        raise UsageError(f"the items of data {spec!r} cannot be collated into one batch ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); give items of equal shapes, or pass "
                         "--collate pkg.module:fn that pads them") from None


def _as_split(obj: Any, spec: str, collate: Callable[[list[Any]], Any] | None = None) -> Split:
    """Turn what a data factory returned into a :class:`Split`, without reshaping or casting anything."""
    if isinstance(obj, Split):
        split = obj
    elif isinstance(obj, (tuple, list)) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        split = Split(tuple(obj))
    elif isinstance(obj, torch.utils.data.Dataset):
        try:
            n = len(obj)  # type: ignore[arg-type]
        except TypeError:
            raise UsageError(f"data factory {spec!r} returned a Dataset without len(); return a map-style Dataset "
                             "or (x, y) tensors") from None
        if n == 0:
            raise UsageError(f"data factory {spec!r} returned no examples; return at least one")
        try:
            items = [obj[i] for i in range(n)]
        except Exception as exc:  # noqa: BLE001 -- the user's own __getitem__
            raise UsageError(f"data factory {spec!r}: reading item {i} of its Dataset failed "
                             f"({type(exc).__name__}: {exc}); fix the Dataset's __getitem__") from None
        split = Split(_collate_all(items, collate or default_collate, spec))
    elif isinstance(obj, (tuple, list)) and any(type(t).__module__ == "numpy" for t in obj):
        from gradlab.task import numpy_data_error

        raise numpy_data_error(f"data factory {spec!r} returned {type(obj).__name__} that",
                               "return torch tensors, e.g. (torch.from_numpy(x), torch.from_numpy(y)) (keeping their "
                               "dtypes: float32 inputs and int64 labels for a classifier)")
    else:
        raise UsageError(
            f"data factory {spec!r} returned {type(obj).__name__}; expected (x, y) tensors, a torch Dataset, or a "
            "dict with keys 'train' and optionally 'test' holding either"
        )
    if len(split) == 0:
        raise UsageError(f"data factory {spec!r} returned no examples; return at least one (input, target) pair")
    bad = batch_nonfinite(split.batch)
    if bad:
        raise UsageError(f"data factory {spec!r} returned {bad} non-finite (NaN or Inf) input/target values; clean "
                         "or impute them before probing")
    return split


def n_classes_of(split: Split, test: Split | None, spec: str) -> int:
    """K for integer class-index targets (B,) numbered 0..K-1, else 0 (not a classification task)."""
    try:
        ys = [split.y] + ([test.y] if test is not None else [])
    except UsageError:
        return 0
    if not all(isinstance(y, torch.Tensor) and y.dim() == 1 and not y.is_floating_point()
               and y.dtype != torch.bool for y in ys):
        return 0
    y = torch.cat(ys)
    if int(y.min()) < 0:
        return 0
    k = int(y.max()) + 1
    return k


def sparse_labels(data: DataBundle) -> str | None:
    """Why building a zoo model of ``data.n_classes`` outputs would be wrong (labels taking at most half of
    0..K-1, e.g. 0 and 99 making a 100-class model), or None.  Only zoo models are sized from the labels; a user's
    own model is taken as it is."""
    if not data.n_classes:
        return None
    ys = [data.train.y] + ([data.test.y] if data.test is not None else [])
    present = int(torch.unique(torch.cat(ys)).numel())
    k = data.n_classes
    if present < k and present <= k // 2:
        return (f"data {data.name!r} has labels with {present} distinct values ranging up to {k - 1}, which would "
                f"make a {k}-class model; number the classes 0..{present - 1}")
    return None


def _from_factory(spec: str, collate: Callable[[list[Any]], Any] | None = None) -> DataBundle:
    factory = resolve_factory(spec, "data")
    try:
        out = factory()
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 -- the user's own code: report it in one line
        raise UsageError(f"data factory {spec!r} raised {type(exc).__name__}: {exc}") from exc
    if isinstance(out, DataBundle):
        return out
    if isinstance(out, dict):
        if "train" not in out:
            raise UsageError(f"data factory {spec!r} returned a dict without a 'train' entry")
        train = _as_split(out["train"], spec, collate)
        test = _as_split(out["test"], spec, collate) if out.get("test") is not None else None
    else:
        train, test = _as_split(out, spec, collate), None
    return DataBundle(spec, train, test, n_classes_of(train, test, spec),
                      {"source": f"user factory {spec}", "source_sha256": source_sha256(factory)})


def load_data(spec: str, root: str | Path | None = None, download: bool = False,
              collate: str | Callable[[list[Any]], Any] | None = None) -> DataBundle:
    """Load a dataset by registered name or ``pkg.module:factory``.

    ``root`` is the folder holding the raw files of MNIST/Fashion-MNIST/CIFAR-10 (default ``~/.cache/gradlab``);
    ``download`` fetches missing files with checksum verification.  ``collate`` (a callable or
    ``pkg.module:fn``) turns a list of a Dataset's items into one batch; default
    ``torch.utils.data.default_collate``.  It is applied once to the whole split, so padding collates pad to the
    split's longest example.
    """
    if isinstance(collate, str):
        collate = resolve_factory(collate, "collate")
    if is_factory_spec(spec):
        return _from_factory(spec, collate)
    if spec not in DATASETS:
        raise UsageError(f"unknown dataset {spec!r}; choose one of {sorted(DATASETS)} or pass 'pkg.module:factory'")
    module, _, attr = DATASETS[spec].partition(":")
    loader = getattr(importlib.import_module(module), attr)
    return loader(root=root, download=download)
