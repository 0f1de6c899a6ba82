"""The task contract: a task is (model, data, per-example loss).

A **batch** is whatever the data collates to: a tensor, or a tuple/list/dict (nested freely) whose tensor leaves
all share the leading dimension B (the examples).  gradlab never reshapes a user's inputs and never casts integer
tensors; floating tensors are moved to the run's dtype (``--dtype``) and every tensor to the run's device.

A **per-example loss** is ``fn(model, batch) -> Tensor`` of shape (B,): the loss ℓᵢ of each example of the batch.
The model is called inside ``fn``, so any forward signature works.  Every gradlab quantity is defined from it:
gᵢ = ∇ℓᵢ, the mean-reduced minibatch loss is (1/m) Σ ℓᵢ and the summed one Σ ℓᵢ (docs/science.md).

Built-in losses (``LOSSES``; ``--loss NAME``), each reading the batch as (inputs, targets) -- a 2-sequence, or a
dict with ``input_ids``/``x``/``input``/``inputs`` and ``labels``/``label``/``y``/``target``/``targets``:

- ``cross-entropy``: classification; ``model(x)`` gives logits (B, C) and targets are class indices (B,)
  (or logits (B, C, d₁, …) with targets (B, d₁, …): ℓᵢ is the mean over the positions).
- ``mse``: regression; ``model(x)`` has the targets' shape (B, …), ℓᵢ = mean over the target's elements of
  (outputᵢ − yᵢ)².  Float targets of any shape.
- ``lm``: causal language modelling; ``model(input_ids)`` gives logits (B, T, V) (or an object with a ``.logits``
  attribute, as Hugging Face models return), labels (B, T) are aligned with the logits (labels[t] is the token
  that position t predicts, as in nanoGPT: shift them in your data if your labels equal your input ids), and ℓᵢ
  is the mean token cross-entropy of sequence i over its labels ≠ −100.

Example::

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(3, 2)
    >>> batch = (torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1]))
    >>> resolve_loss("cross-entropy")(model, batch).shape
    torch.Size([5])
    >>> batch_len(batch), batch_len(index_batch(batch, torch.tensor([0, 2])))
    (5, 2)
"""

from __future__ import annotations

import hashlib
import inspect
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from gradlab.errors import UsageError

Batch = Any
PerExampleLoss = Callable[[nn.Module, Batch], Tensor]

_INPUT_KEYS = ("input_ids", "x", "input", "inputs")
_TARGET_KEYS = ("labels", "label", "y", "target", "targets")


# -- batches ----------------------------------------------------------------------------------------------------
def tensor_leaves(batch: Batch) -> list[Tensor]:
    return [t for t in tree_flatten(batch)[0] if isinstance(t, Tensor)]


def batch_len(batch: Batch) -> int:
    """The number of examples B of a batch: the common leading dimension of its tensor leaves."""
    leaves = tensor_leaves(batch)
    if not leaves:
        raise UsageError("a batch holds no tensors; the data must give tensors (or collate to tensors)")
    sizes = {int(t.shape[0]) if t.dim() else -1 for t in leaves}
    if len(sizes) != 1 or -1 in sizes:
        shapes = [tuple(t.shape) for t in leaves]
        raise UsageError(f"the tensors of a batch must share their first dimension (the examples), got shapes "
                         f"{shapes}; return one row per example in every tensor")
    return sizes.pop()


def index_batch(batch: Batch, idx: Tensor | slice) -> Batch:
    """The examples ``idx`` of a batch (every tensor leaf indexed along its first dimension)."""
    return tree_map(lambda t: t[idx] if isinstance(t, Tensor) else t, batch)


def to_run(batch: Batch, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Batch:
    """Move a batch to the run: every tensor to ``device``, floating tensors (only) to ``dtype``."""

    def move(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device=device)

    return tree_map(move, batch)


def batch_nonfinite(batch: Batch) -> int:
    """Number of non-finite entries in the floating tensors of a batch."""
    return int(sum(int((~torch.isfinite(t)).sum()) for t in tensor_leaves(batch) if t.is_floating_point()))


def inputs_targets(batch: Batch, loss: str = "loss") -> tuple[Any, Tensor]:
    """(inputs, targets) of a batch given as a 2-sequence or a dict with recognised keys."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        xk = next((k for k in _INPUT_KEYS if k in batch), None)
        yk = next((k for k in _TARGET_KEYS if k in batch), None)
        if xk is not None and yk is not None:
            return batch[xk], batch[yk]
        raise UsageError(f"the {loss!r} loss reads a dict batch by its keys {_INPUT_KEYS} (inputs) and "
                         f"{_TARGET_KEYS} (targets), got keys {sorted(batch)}; rename them or pass your own "
                         "--loss pkg.module:fn")
    raise UsageError(f"the {loss!r} loss needs batches of (inputs, targets), got {type(batch).__name__}; return "
                     "(x, y) pairs from your data or pass your own --loss pkg.module:fn")


def _output_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise UsageError(f"the model returned {type(out).__name__}, not a tensor or an object with .logits; "
                     "pass your own --loss pkg.module:fn that calls the model and returns per-example losses")


def _concrete() -> bool:
    """Whether tensors hold concrete values (not under vmap/grad transforms, where .item() is not allowed)."""
    return not torch._C._are_functorch_transforms_active()


# -- built-in per-example losses --------------------------------------------------------------------------------
def cross_entropy(model: nn.Module, batch: Batch) -> Tensor:
    """ℓᵢ = cross-entropy of example i (classification; mean over positions for (B, C, d…) logits)."""
    x, y = inputs_targets(batch, "cross-entropy")
    out = _output_tensor(model(x))
    if y.is_floating_point() or y.dtype == torch.bool:
        raise UsageError(f"the cross-entropy loss needs integer class-index targets, got {y.dtype}; use --loss mse "
                         "for float targets")
    if y.dtype not in (torch.int64, torch.uint8):
        raise UsageError(f"the cross-entropy loss needs int64 class indices, got {y.dtype}; give the labels as "
                         "torch.long (y.long(), or np.int64 in your data)")
    if out.dim() < 2 or out.shape[0] != y.shape[0] or tuple(out.shape[2:]) != tuple(y.shape[1:]):
        hint = ""
        if out.dim() == 3 and y.dim() == 2 and tuple(out.shape[:2]) == tuple(y.shape):
            from gradlab.store import option

            hint = f"; for a language model's (B, T, V) logits use {option('loss', 'lm')}"
        raise UsageError(f"the cross-entropy loss needs logits (B, C, …) matching targets (B, …), got logits "
                         f"{tuple(out.shape)} and targets {tuple(y.shape)}" + hint)
    n_out = out.shape[1]
    if _concrete() and y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_out):
        raise UsageError(f"labels range over {int(y.min())}..{int(y.max())} but the model gives {n_out} logits; "
                         f"labels must be class indices 0..{n_out - 1} (or build the model with more outputs)")
    per = F.cross_entropy(out, y, reduction="none")
    return per.reshape(per.shape[0], -1).mean(1) if per.dim() > 1 else per


def mse(model: nn.Module, batch: Batch) -> Tensor:
    """ℓᵢ = mean over the elements of example i's target of (outputᵢ − yᵢ)² (regression)."""
    x, y = inputs_targets(batch, "mse")
    out = _output_tensor(model(x))
    if not y.is_floating_point():
        raise UsageError(f"the mse loss needs floating targets, got {y.dtype}; use --loss cross-entropy for class "
                         "indices")
    if out.shape != y.shape:
        raise UsageError(f"the mse loss needs model outputs of the targets' shape, got outputs {tuple(out.shape)} "
                         f"and targets {tuple(y.shape)}; make the model output match the targets")
    return (out - y).pow(2).reshape(out.shape[0], -1).mean(1)


def lm(model: nn.Module, batch: Batch) -> Tensor:
    """ℓᵢ = mean token cross-entropy of sequence i over its labels ≠ −100 (labels aligned with the logits)."""
    ids, labels = inputs_targets(batch, "lm")
    out = _output_tensor(model(ids))
    if out.dim() != 3 or tuple(out.shape[:2]) != tuple(labels.shape):
        raise UsageError(f"the lm loss needs logits (B, T, V) and labels (B, T), got logits {tuple(out.shape)} and "
                         f"labels {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise UsageError(f"the lm loss needs integer token labels, got {labels.dtype}")
    if labels.dtype != torch.int64:
        raise UsageError(f"the lm loss needs int64 token labels, got {labels.dtype}; give them as torch.long "
                         "(labels.long(), or np.int64 in your data)")
    keep = labels != -100
    vocab = out.shape[-1]
    valid = labels[keep] if _concrete() else labels
    if _concrete() and valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= vocab):
        raise UsageError(f"token labels range over {int(valid.min())}..{int(valid.max())} but the model gives "
                         f"{vocab} logits; labels must be token ids 0..{vocab - 1} or -100 (ignored)")
    tok = F.cross_entropy(out.transpose(1, 2), labels.masked_fill(~keep, 0), reduction="none")  # (B, T)
    count = keep.sum(1)
    if _concrete() and bool((count == 0).any()):
        raise UsageError("a sequence has no label other than -100; every example needs at least one scored token")
    return (tok * keep).sum(1) / count.to(tok.dtype)


LOSSES: dict[str, PerExampleLoss] = {"cross-entropy": cross_entropy, "mse": mse, "lm": lm}
ALIASES = {"cross_entropy": "cross-entropy", "ce": "cross-entropy"}


def resolve_loss(spec: str | PerExampleLoss) -> PerExampleLoss:
    """A built-in loss by name, ``pkg.module:fn``, or a callable ``fn(model, batch) -> (B,)``."""
    if callable(spec):
        return spec
    name = ALIASES.get(spec, spec)
    if name in LOSSES:
        return LOSSES[name]
    if ":" in name:
        from gradlab.factory import resolve_factory

        return resolve_factory(name, "loss")
    raise UsageError(f"unknown loss {spec!r}; choose one of {sorted(LOSSES)} or pass 'pkg.module:fn' with "
                     "fn(model, batch) returning the per-example losses (B,)")


def loss_name(spec: str | PerExampleLoss) -> str:
    """The name recorded in stores: the built-in name, the ``pkg.module:fn`` spec, or module:qualname."""
    if isinstance(spec, str):
        return ALIASES.get(spec, spec)
    for name, fn in LOSSES.items():
        if fn is spec:
            return name
    return f"{getattr(spec, '__module__', '?')}:{getattr(spec, '__qualname__', type(spec).__name__)}"


def source_sha256(obj: Any) -> str | None:
    """sha256 of the source of a user function or class (recorded in stores), or None when it has none."""
    try:
        return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()
    except (OSError, TypeError):
        return None


def _code_names(code: types.CodeType) -> set[str]:
    """The global names a code object (and the functions, lambdas and comprehensions nested in it) refers to."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _own_codes(obj: Any) -> list[types.CodeType]:
    if inspect.isfunction(obj):
        return [obj.__code__]
    codes = []
    for value in vars(obj).values():  # a class: its methods, static and class methods, properties
        for fn in (getattr(value, "__func__", value), *(getattr(value, a, None) for a in ("fget", "fset"))):
            if inspect.isfunction(fn):
                codes.append(fn.__code__)
    return codes


_CONSTANT_TYPES = (int, float, complex, str, bytes, bool, type(None))


def code_sha256(obj: Any) -> str | None:
    """SHA-256 of the code behind a user function or class: its source, and (transitively) the source of every
    function and class of its own module that it names, and the values of the plain constants (numbers, strings,
    tuples of them) and the qualified names of the functions, classes and modules of other modules it names -- so
    ``def cls(): return _xy()`` changes its digest when ``_xy``'s body or defaults change, and ``ACT()`` when
    ``ACT = nn.Tanh`` becomes ``nn.ReLU``.  None when there is no source (built-ins, code typed into a REPL)."""
    obj = inspect.unwrap(obj) if callable(obj) else obj
    module = getattr(obj, "__module__", None)
    h = hashlib.sha256()
    seen: set[int] = set()
    found = False

    def visit(o: Any) -> None:
        nonlocal found
        if id(o) in seen:
            return
        seen.add(id(o))
        try:
            src = inspect.getsource(o)
        except (OSError, TypeError):
            return
        found = True
        h.update(src.encode())
        h.update(b"\0")
        if inspect.isfunction(o):  # default values, evaluated when the module ran (seed=SEED)
            defaults = (*(o.__defaults__ or ()), *sorted((o.__kwdefaults__ or {}).items()))
            h.update(repr([d if isinstance(d, _CONSTANT_TYPES + (tuple,)) else type(d).__name__
                           for d in defaults]).encode())
        glob = getattr(o, "__globals__", None)
        if glob is None:
            mod = inspect.getmodule(o)
            glob = vars(mod) if mod is not None else {}
        names: set[str] = set()
        for code in _own_codes(o):
            names |= _code_names(code)
        if inspect.isclass(o):
            names |= {b.__name__ for b in o.__bases__}
        for name in sorted(names):
            value = glob.get(name)
            if (inspect.isfunction(value) or inspect.isclass(value)) and getattr(value, "__module__", None) == module:
                visit(value)
            elif inspect.isfunction(value) or inspect.isclass(value) or inspect.ismodule(value):
                h.update(f"{name}={getattr(value, '__module__', '')}.{getattr(value, '__qualname__', value.__name__)}"
                         "\0".encode())  # what the name refers to elsewhere (ACT = nn.Tanh)
            elif isinstance(value, _CONSTANT_TYPES) or (isinstance(value, tuple) and all(
                    isinstance(v, _CONSTANT_TYPES) for v in value)):
                h.update(f"{name}={value!r}\0".encode())

    visit(obj)
    return h.hexdigest() if found else None


def data_sha256(*batches: Any) -> str:
    """SHA-256 of the contents of batches (pytrees of tensors): every tensor leaf's dtype, shape and bytes, and the
    tree structure; cheap next to loading in-memory data (about 1 GB/s).  Equal digests mean equal data."""
    h = hashlib.sha256()
    for batch in batches:
        leaves, spec = tree_flatten(batch)
        h.update(str(spec).encode())
        for leaf in leaves:
            if isinstance(leaf, Tensor):
                t = leaf.detach()
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                if t.numel():
                    h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            else:
                h.update(repr(leaf).encode())
        h.update(b"\1")
    return h.hexdigest()


def model_sha256(model: nn.Module) -> str:
    """SHA-256 of a model's architecture (not its weights, which come from checkpoint files): its ``repr``, which
    parameters are trainable (``requires_grad``), and the code of every module class not from torch
    (:func:`code_sha256`), whose ``forward`` the ``repr`` does not show."""
    h = hashlib.sha256(repr(model).encode())
    h.update(repr([(n, p.requires_grad) for n, p in model.named_parameters()]).encode())
    classes = {type(m) for m in model.modules()}
    for cls in sorted(classes, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        if not cls.__module__.startswith("torch."):
            h.update(f"{cls.__module__}.{cls.__qualname__}:{code_sha256(cls)}".encode())
    return h.hexdigest()


def batch_norm_modules(model: nn.Module) -> list[nn.Module]:
    """The batch-norm modules of a model (torch's, and gradlab's ghost batch norm)."""
    from gradlab.models.norm import GhostBatchNorm

    return [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, GhostBatchNorm))]


def single_example_batch_norm(model: nn.Module, loss: PerExampleLoss, data: Any, sizes: Sequence[int], *,
                              dtype: torch.dtype | None = None) -> list[int]:
    """The batch sizes among ``sizes`` at which ``model``'s train-mode batch norm fails because one of its batches
    holds a single value per channel (``BatchNorm1d`` on (B, C) features normalising one example; a ghost batch
    norm's last virtual batch of one example): each such size is tried on the first examples of ``data`` on a
    copy of the model in train mode.  [] when the model has no batch norm."""
    import copy

    norms = batch_norm_modules(model)
    if not norms:
        return []
    ghosts = [int(m.ghost_batch_size) for m in norms if hasattr(m, "ghost_batch_size")]
    batch = getattr(data, "batch", data)
    total = batch_len(batch)
    suspects = sorted({int(s) for s in sizes if 1 <= s <= total
                       and (s == 1 or any(s > g and s % g == 1 for g in ghosts))})
    if not suspects:
        return []
    net = copy.deepcopy(model).train()
    if dtype is not None:
        net = net.to(dtype=dtype)
    failing = []
    for s in suspects:
        first = to_run(index_batch(batch, slice(0, s)), dtype=dtype)
        try:
            with torch.no_grad():
                loss(net, first)
        except ValueError as exc:
            if "more than 1 value per channel" in str(exc):
                failing.append(s)
        except Exception:  # noqa: BLE001 -- any other failure is the task check's to report
            pass
    return failing


def numpy_data_error(what: str = "data", fix: str | None = None) -> UsageError:
    """The one message for NumPy arrays where torch tensors are expected (gradlab converts nothing behind the
    user's back)."""
    fix = fix or ("pass torch tensors, e.g. data=(torch.from_numpy(x), torch.from_numpy(y)) (keeping their dtypes: "
                  "float32 inputs and int64 labels for a classifier)")
    return UsageError(f"{what} holds NumPy arrays; {fix}")


def check_loss_output(out: Any, n: int, *, name: str = "loss", need_grad: bool = True, finite: bool = True,
                      model: nn.Module | None = None) -> Tensor:
    """Check what a per-example loss returned for a batch of ``n``: a floating tensor of shape (n,), attached to
    the parameters (``need_grad``) and finite (``finite``); raise :class:`UsageError` naming the fix."""
    if not isinstance(out, Tensor):
        raise UsageError(f"loss {name!r} returned {type(out).__name__}; it must return a tensor of per-example "
                         f"losses of shape ({n},)")
    if out.dim() == 0:
        raise UsageError(f"loss {name!r} returned a scalar (an already reduced loss); return the per-example losses "
                         f"of shape ({n},), e.g. F.cross_entropy(..., reduction='none')")
    if tuple(out.shape) != (n,):
        raise UsageError(f"loss {name!r} returned shape {tuple(out.shape)} for a batch of {n} examples; it must "
                         f"return one loss per example, shape ({n},)")
    if not out.is_floating_point():
        raise UsageError(f"loss {name!r} returned {out.dtype} values; per-example losses must be floating point")
    if finite and not bool(torch.isfinite(out).all()):
        bad_params = 0 if model is None else sum(int((~torch.isfinite(p)).sum()) for p in model.parameters()
                                                 if p.is_floating_point())
        cause = (f"the model's parameters hold {bad_params} NaN/Inf entries: use a checkpoint from before the "
                 "divergence" if bad_params else "check the data and the checkpoint")
        raise UsageError(f"loss {name!r} is not finite on the first examples ({int((~torch.isfinite(out)).sum())} "
                         f"of {n} values); {cause}")
    if need_grad and not out.requires_grad:
        raise UsageError(f"loss {name!r} returned a tensor without grad (computed under no_grad or detached); "
                         "compute it from the model's output so that it depends on the parameters")
    return out


def checked_losses(loss: PerExampleLoss, model: nn.Module, batch: Batch, *, name: str = "loss",
                   need_grad: bool = True) -> Tensor:
    """Call ``loss(model, batch)`` and check the contract: a tensor (B,), finite, attached to the parameters."""
    with torch.enable_grad():
        out = loss(model, batch)
    return check_loss_output(out, batch_len(batch), name=name, need_grad=need_grad, model=model)


def check_task(model: nn.Module, loss: PerExampleLoss, data: Any, *, name: str = "loss",
               dtype: torch.dtype | None = None, device: torch.device | str | None = None, n: int = 2) -> None:
    """Check a task before anything is written: the loss contract on the first ``n`` examples of ``data`` (a
    :class:`gradlab.datasets.Split` or a batch), and for the built-in classification losses every label against
    the model's number of outputs.  Raises :class:`UsageError` naming the problem and the fix; the model is not
    changed (a copy is used)."""
    import copy

    batch = getattr(data, "batch", data)
    total = batch_len(batch)
    net = copy.deepcopy(model)
    if dtype is not None:
        net = net.to(dtype=dtype)
    if device is not None:
        net = net.to(device=device)
    first = to_run(index_batch(batch, slice(0, min(n, total))), device=device, dtype=dtype)
    try:
        out = checked_losses(loss, net, first, name=name)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 -- the user's model, data or loss: one line naming it
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        fix = "check that the model, the data and --loss fit together"
        floats = sorted({str(t.dtype) for t in tensor_leaves(first) if t.is_floating_point()})
        params = sorted({str(p.dtype) for p in net.parameters()})
        if "dtype" in msg.lower() and floats and floats != params:
            fix = (f"the data's floating tensors are {', '.join(floats)} but the model's parameters are "
                   f"{', '.join(params)}: pass --dtype to run both in one dtype")
        raise UsageError(f"computing the loss {name!r} on the first examples failed ({type(exc).__name__}: {msg}); "
                         + fix) from exc
    del out
    if loss in (cross_entropy, lm):
        x, y = inputs_targets(batch, name)
        with torch.no_grad():
            logits = _output_tensor(net(inputs_targets(first, name)[0]))
        n_out = int(logits.shape[1] if loss is cross_entropy else logits.shape[-1])
        valid = y[y != -100] if loss is lm else y
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= n_out):
            what = "token labels" if loss is lm else "labels"
            raise UsageError(f"{what} range over {int(valid.min())}..{int(valid.max())} but the model gives {n_out} "
                             f"outputs; {what} must lie in 0..{n_out - 1}" + (" (or -100, ignored)" if loss is lm
                                                                                else "")
                             + ": renumber them or build the model with more outputs")


def task_record(*, data: str, loss: str, model: str | None = None, collate: str | None = None) -> str:
    """The task as recorded in every store's attrs (JSON): each part's name or ``pkg.module:fn`` spec, and for
    user code the SHA-256 of its source (so a changed factory or loss is visible in the store)."""
    import json

    from gradlab.factory import resolve_factory

    def source(spec: str | None, what: str) -> str | None:
        if not spec or ":" not in spec:
            return None
        try:
            return source_sha256(resolve_factory(spec, what))
        except UsageError:
            return None

    rec = {"data": data, "loss": loss, "model": model, "collate": collate}
    rec.update({f"{k}_source_sha256": source(v, k) for k, v in rec.items() if v and ":" in v})
    return json.dumps(rec, sort_keys=True)
