"""The Python API for notebooks: ``gradlab.probe``, ``gradlab.sharpness``, ``gradlab.train``, ``gradlab.analyze``.

Each takes live objects -- a model (``nn.Module``) or a model factory, a dataset (``(x, y)`` tensors, a torch
``Dataset``, a ``{"train": ..., "test": ...}`` dict), a per-example loss ``fn(model, batch) -> (B,)`` -- as well
as the names and paths the command line takes, writes the same store as the CLI, and returns it opened with
xarray (``analyze`` returns the summary dict).  Example (executed by ``tests/test_api.py``)::

    import torch, torch.nn.functional as F
    from torch import nn
    import gradlab

    x, y = torch.randn(256, 12), torch.randint(0, 4, (256,))
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))
    loss = lambda model, batch: F.cross_entropy(model(batch[0]), batch[1], reduction="none")
    ds = gradlab.probe(model, data=(x, y), loss=loss, out="norms.zarr", batch_sizes=[1, 4, 16, 64], budget=64)
    print(ds.b_noise.values)

Live objects are registered in this process under a name ``live:KIND:NAME-DIGEST`` recorded in the store (with a
SHA-256 of the object's source where it has one, or of its tensors); a live model is saved as a checkpoint in
``<out>.inputs/`` so that the store names real files.  They cannot travel to Dask workers in other processes:
use ``pkg.module:factory`` names there.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gradlab.errors import UsageError

PathLike = str | os.PathLike


def _digest_tensors(obj: Any) -> str:
    import torch
    from torch.utils._pytree import tree_flatten

    h = hashlib.sha256()
    if isinstance(obj, torch.utils.data.Dataset) and not isinstance(obj, torch.utils.data.TensorDataset):
        h.update(type(obj).__qualname__.encode())
        h.update(str(len(obj)).encode() if hasattr(obj, "__len__") else b"")  # type: ignore[arg-type]
        return h.hexdigest()
    leaves = tree_flatten(obj.tensors if isinstance(obj, torch.utils.data.TensorDataset) else obj)[0]
    for t in leaves:
        if isinstance(t, torch.Tensor):
            h.update(str((tuple(t.shape), t.dtype)).encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _name(obj: Any, default: str) -> str:
    return getattr(obj, "__qualname__", None) or getattr(type(obj), "__name__", default)


def _data_spec(data: Any) -> str:
    """A name for ``data``: itself if a string, else a live registration returning the object."""
    if isinstance(data, (str, os.PathLike)):
        return str(data)
    from gradlab.factory import register_live

    if callable(data) and not hasattr(data, "__getitem__"):
        from gradlab.task import source_sha256

        return register_live("data", data, _name(data, "data"), source_sha256(data) or _digest_tensors(()))
    _refuse_numpy(data)
    return register_live("data", lambda: data, type(data).__name__, _digest_tensors(data))


def _refuse_numpy(data: Any) -> None:
    """NumPy arrays in the data: say how to pass them (gradlab does not convert a user's data behind their back)."""
    import numpy as np
    from torch.utils._pytree import tree_flatten

    from gradlab.task import numpy_data_error

    if isinstance(data, (tuple, list, dict, np.ndarray)) and any(
            isinstance(leaf, np.ndarray) for leaf in tree_flatten(data)[0]):
        raise numpy_data_error()


def _loss_spec(loss: Any) -> str | None:
    if loss is None or isinstance(loss, str):
        return loss
    if not callable(loss):
        raise UsageError(f"loss must be a name, 'pkg.module:fn' or a callable fn(model, batch), got {loss!r}")
    from gradlab.factory import register_live
    from gradlab.task import LOSSES, source_sha256

    for name, fn in LOSSES.items():
        if fn is loss:
            return name
    return register_live("loss", loss, _name(loss, "loss"), source_sha256(loss) or hashlib.sha256(
        repr(loss).encode()).hexdigest())


def _model_spec(model: Any) -> str | None:
    """A model name/factory spec for ``model``: a zoo name or ``pkg.module:factory`` as is, a factory callable or
    an ``nn.Module`` (its architecture: a deep copy is made per build) registered live."""
    if model is None or isinstance(model, str):
        return model
    import copy

    from torch import nn

    from gradlab.factory import register_live
    from gradlab.task import source_sha256

    if isinstance(model, nn.Module):
        return register_live("model", lambda: copy.deepcopy(model), type(model).__name__,
                             source_sha256(type(model)) or hashlib.sha256(repr(model).encode()).hexdigest())
    if callable(model):
        return register_live("model", model, _name(model, "model"),
                             source_sha256(model) or hashlib.sha256(repr(model).encode()).hexdigest())
    raise UsageError(f"model must be a name, 'pkg.module:factory', a factory or an nn.Module, got {model!r}")


def _checkpoint_args(checkpoints: Any, out: PathLike) -> tuple[list[str], Any]:
    """CLI-style ``LABEL=PATH`` arguments for ``checkpoints`` (a path, an nn.Module, a sequence of those, or a
    mapping label -> either); live modules are saved (state_dict, weights only) under ``<out>.inputs/``.  Returns
    the arguments and the first live module (its architecture serves as the model when none is given)."""
    import torch
    from torch import nn

    if isinstance(checkpoints, Mapping):
        items = list(checkpoints.items())
    elif isinstance(checkpoints, (str, os.PathLike, nn.Module)):
        items = [(None, checkpoints)]
    else:
        items = [(None, c) for c in checkpoints]
    args, first_module = [], None
    for i, (label, ck) in enumerate(items):
        if isinstance(ck, nn.Module):
            first_module = first_module or ck
            label = label or ("model" if len(items) == 1 else f"model{i}")
            folder = Path(f"{out}.inputs")
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{label}.pt"
            torch.save({k: v.detach().cpu() for k, v in ck.state_dict().items()}, path)
            args.append(f"{label}={path}")
        else:
            args.append(f"{label}={ck}" if label else str(ck))
    return args, first_module


def _task_specs(checkpoints: Any, data: Any, loss: Any, model: Any, out: PathLike) -> tuple[Any, ...]:
    """(data spec, loss spec, model spec, checkpoint arguments) for live objects or names."""
    ck_args, module = _checkpoint_args(checkpoints, out)
    return _data_spec(data), _loss_spec(loss), _model_spec(model if model is not None else module), ck_args


def _open(path: PathLike) -> Any:
    import xarray as xr

    return xr.open_zarr(path, consolidated=False)


def _api_style(fn: Callable[..., Any]) -> Callable[..., Any]:
    """During the call, messages name options as this API spells them (``budget=``, not ``--budget``:
    :func:`gradlab.store.option`)."""
    import functools

    from gradlab.store import OPTION_STYLE

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        token = OPTION_STYLE.set("api")
        try:
            return fn(*args, **kwargs)
        finally:
            OPTION_STYLE.reset(token)
    return call


def _cleans_inputs(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A refused or failed call that wrote no store removes the ``<out>.inputs/`` folder it made (the live
    modules saved for it), so that nothing of it is left behind.  Messages name the API's options."""
    import functools
    import shutil

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        out = kwargs.get("out")
        inputs = Path(f"{out}.inputs") if out is not None else None
        made = inputs is not None and not inputs.exists()
        try:
            return fn(*args, **kwargs)
        except BaseException:
            if made and inputs.exists() and not Path(out).exists():
                shutil.rmtree(inputs, ignore_errors=True)
            raise
    return _api_style(call)


@_cleans_inputs
def probe(
    checkpoints: Any,
    *,
    data: Any,
    out: PathLike,
    model: Any = None,
    model_kwargs: Mapping[str, Any] | None = None,
    loss: str | Callable[..., Any] | None = None,
    collate: str | None = None,
    init: PathLike | None = None,
    protocol: str = "frozen",
    batch_sizes: Sequence[int] | None = None,
    budget: int | None = None,
    trials: int = 20,
    reduction: str = "mean",
    lr: float = 0.01,
    params: str = ".",
    keep: str = "histograms",
    seed: int = 0,
    device: str = "cpu",
    dtype: str | None = None,
    replacement: bool = False,
    resume: bool = False,
    workers: int | None = None,
    scheduler: str | None = None,
    progress: bool = False,
) -> Any:
    """``gradlab probe`` from Python; returns the store as an xarray Dataset.

    Defaults differ from the CLI only where a notebook wants them to: the frozen protocol, 20 trials, and when
    ``budget`` is not given the largest power of two up to min(1024, training examples), with batch sizes the
    powers of two up to it.  ``dtype`` None (the default): the widest floating dtype of the model and the data (a
    float64 model or data runs in float64; any cast is said on stderr).  Parameters with ``requires_grad=False``
    are left out and held fixed, as training keeps them.
    """
    from gradlab.probe.run import resolve_config, run_probe

    data_spec, loss_spec, model_spec, ck_args = _task_specs(checkpoints, data, loss, model, out)
    if (workers or scheduler) and any(s and s.startswith("live:") for s in (data_spec, loss_spec, model_spec)):
        from gradlab.runner.dispatch import live_objects_error

        raise live_objects_error()
    if budget is None:
        from gradlab.datasets import load_data

        n = len(load_data(data_spec, collate=collate).train)
        budget = 1 << (min(n, 1024).bit_length() - 1)
    if batch_sizes is None:
        batch_sizes = [1 << k for k in range(budget.bit_length()) if budget % (1 << k) == 0]
    config = resolve_config(ck_args, data=data_spec, init=None if init is None else str(init), model=model_spec,
                            model_kwargs=model_kwargs, batch_sizes=batch_sizes, budget=budget, trials=trials,
                            protocol=protocol, reduction=reduction, lr=lr, params=params, keep=keep, seed=seed,
                            device=device, dtype=dtype, replacement=replacement, loss=loss_spec, collate=collate)
    summary = run_probe(config, out, resume=resume, workers=workers, scheduler=scheduler, progress=progress)
    return _open(summary.path)


@_cleans_inputs
def sharpness(
    checkpoints: Any,
    *,
    data: Any,
    out: PathLike,
    model: Any = None,
    model_kwargs: Mapping[str, Any] | None = None,
    loss: str | Callable[..., Any] | None = None,
    collate: str | None = None,
    samples: int | None = 512,
    resume: bool = False,
    progress: bool = False,
    **options: Any,
) -> Any:
    """``gradlab sharpness`` from Python (``options``: the fields of
    :class:`gradlab.curvature.run.SharpnessConfig`, e.g. ``top_k=3, eps=(1e-3,)``); returns the store."""
    import sys

    from gradlab.curvature.run import SharpnessConfig, run_sharpness
    from gradlab.datasets import load_data
    from gradlab.probe.run import parse_checkpoint_arg

    data_spec, loss_spec, model_spec, ck_args = _task_specs(checkpoints, data, loss, model, out)
    n = len(load_data(data_spec, collate=collate).train)
    cfg = SharpnessConfig(checkpoints=tuple(str(parse_checkpoint_arg(a)[1]) for a in ck_args), data=data_spec,
                          samples=None if samples is None or samples >= n else int(samples), model=model_spec,
                          model_kwargs=dict(model_kwargs) if model_kwargs is not None else None, loss=loss_spec,
                          collate=collate, **options)
    say = (lambda msg: print(f"gradlab sharpness: {msg}", file=sys.stderr, flush=True)) if progress else None
    return _open(run_sharpness(cfg, out, resume=resume, progress=say))


@_api_style
def train(
    *,
    model: Any,
    data: Any,
    out: PathLike,
    loss: str | Callable[..., Any] | None = None,
    batch_sizes: Sequence[int] = (32,),
    lrs: Sequence[float] = (0.01,),
    resume: bool = False,
    progress: bool = False,
    **options: Any,
) -> Any:
    """``gradlab train`` from Python (``options``: the fields of :class:`gradlab.train.TrainConfig`, e.g.
    ``epochs=5, seeds=(0, 1)``); returns ``<out>/train.zarr`` opened with xarray.  ``model`` is a zoo name, a
    ``pkg.module:factory``, a factory callable or an nn.Module (re-initialised per seed only if it is a factory:
    a module is copied as it is, so every run of a module starts from its current weights)."""
    from gradlab.train import TrainConfig, train_grid

    tuples = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in options.items()}
    cfg = TrainConfig(model=_model_spec(model), data=_data_spec(data), loss=_loss_spec(loss),
                      batch_sizes=tuple(batch_sizes), lrs=tuple(lrs), **tuples)
    return _open(train_grid(cfg, out, resume=resume, show_progress=progress))


@_api_style
def analyze(store: PathLike, *, out: PathLike | None = None, figures: bool = True, ref_batch_size: int | None = None,
            n_boot: int = 999, seed: int = 0, noise_store: PathLike | None = None, epsilon: float | None = None,
            target_loss: float | None = None, cbs_loss: str | None = None) -> dict[str, Any]:
    """``gradlab analyze`` from Python; returns the summary (the content of ``summary.json``).  The options are
    the command's flags: ``ref_batch_size`` for probe stores; ``noise_store``, ``epsilon``, ``target_loss`` and
    ``cbs_loss`` (``"test_loss"`` or ``"train_loss"``) for cbs stores (refused for other stores)."""
    from gradlab.analysis.run import analyze_store

    return analyze_store(store, out_dir=out, figures=figures, ref_batch_size=ref_batch_size, n_boot=n_boot, seed=seed,
                         cbs_options={"noise_store": None if noise_store is None else str(noise_store),
                                      "epsilon": epsilon, "target_loss": target_loss, "cbs_loss": cbs_loss})


def cbs_job(checkpoints: Sequence[str] | Mapping[str, str] | str, *, data: Any, **options: Any) -> Any:
    """The validated :class:`gradlab.cbs.job.CbsJob` of ``gradlab cbs`` (``options``: the keyword arguments of
    :func:`gradlab.cbs.resolve.resolve_cbs`); checkpoints are paths, ``LABEL=PATH`` or a mapping label -> path;
    data a name, a factory or the data itself, model and loss a name or a live object (as for :func:`probe`).
    ``budget`` (examples) and ``budget_tokens`` are two ways to give one budget: at most one of them (None counts
    as not given; neither: 4096 examples)."""
    from torch import nn

    from gradlab.cbs.resolve import resolve_cbs

    if options.get("budget") is not None and options.get("budget_tokens") is not None:
        raise UsageError(f"budget={options['budget']!r} and budget_tokens={options['budget_tokens']!r} both given; "
                         "they are the same budget in examples or in tokens: give only one of them")
    if "budget" in options and options["budget"] is None:
        del options["budget"]  # not given: resolve_cbs's default (4096 examples) unless budget_tokens is
    if isinstance(checkpoints, Mapping):
        items = [f"{label}={path}" for label, path in checkpoints.items()]
        values = list(checkpoints.values())
    else:
        values = [checkpoints] if isinstance(checkpoints, (str, os.PathLike, nn.Module)) else list(checkpoints)
        items = [str(c) for c in values]
    bad = next((c for c in values if not isinstance(c, (str, os.PathLike))), None)
    if bad is not None:
        raise UsageError(f"checkpoints must be checkpoint files (paths, 'LABEL=PATH' or a mapping label -> path), got "
                         f"{type(bad).__name__}; save a module first, e.g. torch.save(model.state_dict(), 'ck.pt'), "
                         "and pass model= to rebuild it")
    if "model" in options:
        options["model"] = _model_spec(options["model"])
    if "loss" in options:
        loss, spec = options["loss"], _loss_spec(options["loss"])  # a name, a built-in's name, or a live object
        if isinstance(spec, str) and spec.startswith("live:"):
            from gradlab.factory import resolve_factory

            name = f"{getattr(loss, '__module__', '')}:{getattr(loss, '__qualname__', '')}"
            try:  # a function importable by its name keeps the name (it can travel to Dask workers)
                if not name.startswith("__main__:") and "<" not in name and resolve_factory(name, "loss") is loss:
                    spec = name
            except UsageError:
                pass
        options["loss"] = spec
    return resolve_cbs(items, data=_data_spec(data), **options)


@_api_style
def cbs(checkpoints: Sequence[str] | str, *, data: str, out: PathLike, resume: bool = False,
        workers: int | None = None, scheduler: str | None = None, progress: bool = False, **options: Any) -> Any:
    """``gradlab cbs`` from Python: branches from checkpoints at every batch size; returns the store (xarray)."""
    from gradlab.cbs import run_cbs

    summary = run_cbs(cbs_job(checkpoints, data=data, **options), out, resume=resume, workers=workers,
                      scheduler=scheduler, progress=progress)
    return _open(summary.path)
