"""Make a module callable: ``gradlab.probe`` (a subpackage) and ``gradlab.train`` (a module) are also the Python
API functions ``gradlab.probe(...)`` and ``gradlab.train(...)`` of :mod:`gradlab.api`."""

from __future__ import annotations

import sys
import types
from typing import Any


def make_callable(module_name: str, api_name: str) -> None:
    """Calling module ``module_name`` calls ``gradlab.api.<api_name>`` (with its signature and docstring)."""

    class _CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            from gradlab import api

            return getattr(api, api_name)(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule
