"""Probes: torch-side measurements of minibatch gradients at a checkpoint (SCIENCE.md, "The two probe protocols").

Modules (imported on use; this package file only makes ``gradlab.probe(...)`` callable, the Python API):

- ``gradlab.probe.step``: the step protocol ("gradient competition"): ``step_trials`` and its result
  type ``StepResult``, one file per engine (``chain``, ``loop``, ``generic``).
- ``gradlab.probe.naive``: the blog's per-trial ``torch.optim.SGD`` loop for the step protocol
  (``naive_step_trials``), kept as the reference the engine is tested and benchmarked against.
- ``gradlab.probe.gram``: exact per-example gradient Gram matrices for any model and per-example loss
  (``GramEngine``), from layer identities in ``gram_layers`` (Linear, Conv1d/2d, Embedding, norms) where they
  apply and per-example gradients from ``gram_fallback`` (torch.func) elsewhere.
- ``gradlab.probe.frozen``: the frozen protocol: every minibatch gradient norm of every partition, from Gram matrices.
- ``gradlab.probe.sampling``: per-trial draws of training examples from explicit seeds.
- ``gradlab.probe.distance``: where the weights went (distance from init / origin, cosine to init).
- ``gradlab.probe.run``: orchestration of ``gradlab probe`` (config, store, units, resume).
"""

from gradlab._callable import make_callable as _make_callable

_make_callable(__name__, "probe")  # gradlab.probe(...) is the Python API (gradlab.api.probe)
