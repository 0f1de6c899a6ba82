"""gradlab: how mini-batch size shapes gradient dynamics.

Data flow, visible in the module names: ``checkpoint`` -> ``probe`` -> ``store`` -> ``analysis`` -> ``figures``.
Torch-side code (``models``, ``datasets``, ``checkpoint``, ``train``, ``probe``, ``curvature``) and xarray-side
code (``schema``, ``store``, ``analysis``, ``figures``) meet only in the orchestration modules and the CLI.
"""

__version__ = "0.1.0"
