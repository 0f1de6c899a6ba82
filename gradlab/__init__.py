"""gradlab: how mini-batch size shapes gradient dynamics.

Data flow, visible in the module names: ``checkpoint`` -> ``probe`` -> ``store`` -> ``analysis`` -> ``figures``.
Torch-side code (``models``, ``datasets``, ``checkpoint``, ``train``, ``probe``, ``curvature``) and xarray-side
code (``schema``, ``store``, ``analysis``, ``figures``) meet only in the orchestration modules and the CLI.
"""

__version__ = "0.1.0"


def __getattr__(name: str):  # the Python API (gradlab.api), imported on first use so `import gradlab` stays light
    import importlib

    if name in ("probe", "train"):  # subpackage/module names: callable modules (see gradlab._callable)
        return importlib.import_module(f"gradlab.{name}")
    if name in ("sharpness", "analyze"):
        return getattr(importlib.import_module("gradlab.api"), name)
    raise AttributeError(f"module 'gradlab' has no attribute {name!r}")
