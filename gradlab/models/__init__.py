"""Models by name with keyword arguments, and user models via ``pkg.module:factory``.

Every builder takes ``input_shape`` (C, H, W) and ``n_classes`` plus its own keyword arguments, and returns an
``nn.Module``.  The registry is an explicit dict of ``name -> "module:callable"`` imported on use.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from typing import Any

from torch import nn

from gradlab.errors import UsageError
from gradlab.factory import is_factory_spec, resolve_factory

MODELS: dict[str, str] = {
    "mlp": "gradlab.models.mlp:MLP",
    "cnn": "gradlab.models.cnn:SmallCNN",
    "vgg": "gradlab.models.vgg:VGG",
    "resnet": "gradlab.models.resnet:CifarResNet",
    "gpt": "gradlab.models.gpt:build_gpt",
}


def _builder(name: str) -> Any:
    module, _, attr = MODELS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def build_model(name: str, input_shape: Sequence[int], n_classes: int, **kwargs: Any) -> nn.Module:
    """Build a registered model (``mlp``, ``cnn``, ``vgg``, ``resnet``, ``gpt``) or a user ``pkg.module:factory``.

    A user factory is called as ``factory(**kwargs)``; if it accepts ``input_shape``/``n_classes`` they are passed.
    """
    if is_factory_spec(name):
        factory = resolve_factory(name, "model")
        params = inspect.signature(factory).parameters
        extra = {k: v for k, v in (("input_shape", tuple(input_shape)), ("n_classes", n_classes))
                 if k in params and k not in kwargs}
        try:
            model = factory(**extra, **kwargs)
        except UsageError:
            raise  # already one line naming the user's code (a wrapped factory)
        except Exception as exc:  # noqa: BLE001 -- the user's own code: one line naming it
            hint = "; check --model-kwargs" if kwargs or isinstance(exc, TypeError) else ""
            raise UsageError(f"model factory {name!r} raised {type(exc).__name__}: {exc} (called with "
                             f"{ {**extra, **kwargs} }){hint}") from exc
        if not isinstance(model, nn.Module):
            raise UsageError(f"model factory {name!r} returned {type(model).__name__}, expected a torch nn.Module")
        return model
    if name not in MODELS:
        raise UsageError(f"unknown model {name!r}; choose one of {sorted(MODELS)} or pass 'pkg.module:factory'")
    builder = _builder(name)
    shape = tuple(int(s) for s in input_shape)
    try:
        if name == "mlp":
            n_in = 1
            for s in shape:
                n_in *= s
            return builder(in_features=n_in, n_classes=n_classes, **kwargs)
        return builder(input_shape=shape, n_classes=n_classes, **kwargs)
    except (TypeError, ValueError, OverflowError) as exc:
        raise UsageError(f"bad keyword arguments {kwargs} for model {name!r}: {exc}; fix --model-kwargs") from None
    except RuntimeError as exc:  # e.g. torch refusing a negative or huge layer width
        raise UsageError(f"model {name!r} cannot be built with keyword arguments {kwargs}: "
                         f"{str(exc).splitlines()[0] if str(exc) else exc!r}; fix --model-kwargs") from None
