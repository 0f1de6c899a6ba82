"""The checkpoints one store reads (probe, cbs): ``LABEL=PATH`` arguments, each loaded, checked finite and built
into its model, all of one parameter layout -- one implementation, one wording of every refusal."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from gradlab.errors import UsageError


def parse_checkpoint_arg(arg: str) -> tuple[str, Path]:
    """``LABEL=PATH`` or ``PATH`` (label = the file stem)."""
    label, sep, path = arg.partition("=")
    if sep and label and not Path(arg).exists():
        return label, Path(path)
    return Path(arg).stem, Path(arg)


def refuse_dropout(net: Any, why: str) -> None:
    """Refuse a model with active dropout (``why``: what needs a deterministic model, and the way out)."""
    import torch

    for mod in net.modules():
        if isinstance(mod, torch.nn.modules.dropout._DropoutNd) and mod.p > 0:
            raise UsageError(f"the model has active dropout ({type(mod).__name__}, p={mod.p}); {why}")


def load_checkpoint_set(checkpoints: Sequence[str], *, model: str | None, model_kwargs: Mapping[str, Any] | None,
                        bundle: Any, what: str) -> Iterator[tuple[int, str, Path, Any, Any]]:
    """Yield ``(index, label, path, checkpoint, model)`` for every argument, refusing a label used twice, non-finite
    weights, weights that do not fit the model, and a parameter layout unlike the first checkpoint's (``what``:
    the command's noun in that message, e.g. "probe")."""
    from gradlab.checkpoint import build_model_from, load_checkpoint, require_finite

    layout = None
    labels: set[str] = set()
    for i, arg in enumerate(checkpoints):
        label, path = parse_checkpoint_arg(arg)
        if label in labels:
            raise UsageError(f"checkpoint label {label!r} is used twice; name them with LABEL=PATH")
        labels.add(label)
        ckpt = load_checkpoint(path)
        require_finite(ckpt.state_dict, str(path))
        net = build_model_from(ckpt, model=model, model_kwargs=model_kwargs, input_shape=bundle.input_shape,
                               n_classes=bundle.n_classes)
        this = [(n, tuple(p.shape)) for n, p in net.named_parameters()]
        if layout is None:
            layout = this
        elif this != layout:
            raise UsageError(f"{path} has parameters {this}, unlike the first checkpoint's {layout}; {what} "
                             "checkpoints of one architecture per store")
        yield i, label, path, ckpt, net
