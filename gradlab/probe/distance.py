"""Where the weights went: distance from init, distance from the origin, and cosine to init.

Per parameter tensor and over the groups ``all``/``weight``/``bias`` (a tensor whose name ends in ``bias`` is a
bias, every other tensor a weight; SCIENCE.md "Where the weights went", Hoffer et al. 2017):

    dist_init = ‖θ − θ₀‖,    dist_origin = ‖θ‖,    cos_init = θ·θ₀ / (‖θ‖ ‖θ₀‖)

with norms and dot products over the flattened entries of the tensor or group, accumulated in float64.  Without an
init checkpoint (θ₀ unknown) ``dist_init`` and ``cos_init`` are NaN; ``cos_init`` is NaN when ‖θ‖‖θ₀‖ = 0; a group
with no tensor is NaN throughout.

Which init: ``gradlab probe --init PATH`` names θ₀ for every checkpoint.  Without it, each checkpoint's own folder
is searched for a checkpoint whose metadata tag is ``"init"`` (what ``gradlab train`` writes at epoch 0); see
:func:`find_init`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gradlab.schema import GROUPS

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")


def param_kind(name: str) -> str:
    """``bias`` for a tensor whose last name component is ``bias``, starts with ``bias_`` (the recurrent layers'
    ``bias_ih_l0``, ``bias_hh_l1_reverse``; attention's ``bias_k``) or ends with ``_bias`` (``in_proj_bias``),
    else ``weight``."""
    last = name.rsplit(".", 1)[-1]
    return "bias" if last == "bias" or last.startswith("bias_") or last.endswith("_bias") else "weight"


@dataclass(frozen=True)
class Distances:
    """Per-layer (L,) and per-group (3,) arrays, layers in the order given, groups in :data:`GROUPS` order."""

    dist_init_layer: np.ndarray
    dist_origin_layer: np.ndarray
    cos_init_layer: np.ndarray
    dist_init: np.ndarray
    dist_origin: np.ndarray
    cos_init: np.ndarray


def distances(theta: Mapping[str, torch.Tensor], theta0: Mapping[str, torch.Tensor] | None,
              names: Sequence[str]) -> Distances:
    """‖θ − θ₀‖, ‖θ‖ and cos(θ, θ₀) per tensor in ``names`` and per group (formulas in the module docstring)."""
    n = len(names)
    sq = np.zeros(n)     # ‖θ‖²
    sq0 = np.zeros(n)    # ‖θ₀‖²
    dot = np.zeros(n)    # θ·θ₀
    dsq = np.zeros(n)    # ‖θ − θ₀‖²
    for i, name in enumerate(names):
        t = theta[name].detach().double().cpu().flatten()
        sq[i] = float(t @ t)
        if theta0 is not None:
            t0 = theta0[name].detach().double().cpu().flatten()
            sq0[i], dot[i], dsq[i] = float(t0 @ t0), float(t @ t0), float((t - t0) @ (t - t0))

    def cos(d: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        den = np.sqrt(a * b)
        return np.where(den > 0, d / np.where(den > 0, den, 1.0), np.nan)

    kinds = np.array([param_kind(nm) for nm in names])
    masks = [np.ones(n, bool) if g == "all" else kinds == g for g in GROUPS]
    g_sq = np.array([sq[m].sum() if m.any() else np.nan for m in masks])
    g_sq0 = np.array([sq0[m].sum() if m.any() else np.nan for m in masks])
    g_dot = np.array([dot[m].sum() if m.any() else np.nan for m in masks])
    g_dsq = np.array([dsq[m].sum() if m.any() else np.nan for m in masks])
    unknown = np.full(n, np.nan), np.full(len(GROUPS), np.nan)
    return Distances(
        dist_init_layer=np.sqrt(dsq) if theta0 is not None else unknown[0],
        dist_origin_layer=np.sqrt(sq),
        cos_init_layer=cos(dot, sq, sq0) if theta0 is not None else unknown[0],
        dist_init=np.sqrt(g_dsq) if theta0 is not None else unknown[1],
        dist_origin=np.sqrt(g_sq),
        cos_init=cos(g_dot, g_sq, g_sq0) if theta0 is not None else unknown[1],
    )


def find_init(checkpoint_path: str | Path, init_option: str = "--init") -> Path | None:
    """The init checkpoint beside ``checkpoint_path``: the one file in its folder (suffix .pt/.pth/.ckpt/
    .safetensors) whose gradlab metadata has ``tag == "init"`` (possibly the checkpoint itself).  None when there is
    none or more than one (logged, naming ``init_option``: the CLI's ``--init``, the Python API's ``init=``)."""
    from gradlab.checkpoint import load_checkpoint
    from gradlab.errors import UsageError

    path = Path(checkpoint_path).resolve()
    found = []
    for cand in sorted(path.parent.iterdir()):
        if cand.suffix not in CHECKPOINT_SUFFIXES or not cand.is_file():
            continue
        try:
            meta = load_checkpoint(cand).meta
        except UsageError:
            continue
        if meta.get("tag") == "init":
            found.append(cand)
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        log.warning("several init checkpoints beside %s (%s); pass %s to choose one", path,
                    ", ".join(str(f) for f in found), init_option)
    return None
