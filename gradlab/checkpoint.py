"""Checkpoints: one documented format, written atomically, read safely; foreign layouts read too.

gradlab's format (``format = "gradlab-checkpoint"``, ``version = 1``) is a plain dict that
``torch.load(weights_only=True)`` reads -- only tensors, numbers, strings, lists and dicts:

=============  ===============================================================================================
key            value
=============  ===============================================================================================
format         ``"gradlab-checkpoint"``
version        ``1``
state_dict     the model's ``state_dict()`` (parameters and buffers)
recipe         ``{"model": name or "pkg.module:factory", "kwargs": {...}, "input_shape": [C, H, W],
               "n_classes": int}``
meta           ``{"dataset", "epoch", "step", "batch_size", "lr", "lr_rule", "optimizer", "seed", "tag",
               "versions", "git_revision", ...}``
=============  ===============================================================================================

The same content can be written as safetensors (``.safetensors``): tensors as usual, recipe and meta as JSON
strings in the header metadata under ``gradlab.recipe`` and ``gradlab.meta``.

Foreign checkpoints are read as well: a bare state_dict; dicts keyed ``state_dict``, ``model_state_dict`` or
``model``; Lightning ``.ckpt``; safetensors; Hugging Face ``save_pretrained`` folders (:func:`load_hf_folder`).
``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) prefixes are stripped.  Pickled checkpoints are only
ever opened with ``weights_only=True``: a pickle carrying code is refused without the code running.  A recipe naming
code outside gradlab is never imported from a checkpoint: the user must pass the same factory with ``--model``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import secrets
import shutil
import stat
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradlab.errors import EnvironmentProblem, UsageError
from gradlab.factory import is_factory_spec
from gradlab.provenance import git_revision, package_versions
from gradlab.store import crash_point

FORMAT = "gradlab-checkpoint"
VERSION = 1
_STRIP_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class Recipe:
    """How to rebuild the model: a registered name or ``pkg.module:factory``, plus its keyword arguments."""

    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] = ()
    n_classes: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recipe:
        return cls(str(d["model"]), dict(d.get("kwargs") or {}), tuple(int(s) for s in d.get("input_shape") or ()),
                   int(d.get("n_classes") or 0))


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: tensors, the recipe when known, metadata, and which layout it was read from."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    recipe: Recipe | None
    meta: dict[str, Any]
    layout: str


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temp file + rename.  The temp file is created with mode 0666 less the umask (as ``open``
    would), not mkstemp's 0600, so other users read checkpoints as they read any file the user writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            mode = stat.S_IMODE(tmp.stat().st_mode)  # 0666 less the umask
            break
        except FileExistsError:
            continue
    try:
        try:
            write(str(tmp))
        except RuntimeError as exc:  # torch.save's zip writer hides the OS error (e.g. a full disk)
            if "inline_container" in str(exc) or "PytorchStreamWriter" in str(exc):
                free = shutil.disk_usage(path.parent).free
                raise EnvironmentProblem(
                    f"could not write checkpoint {path} ({free} bytes free on its disk; torch: "
                    f"{str(exc).splitlines()[0].strip()}); free some space or choose --out on another disk") from None
            raise
        os.chmod(tmp, mode)  # some writers (safetensors) recreate the file 0600
        crash_point("checkpoint.write")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def require_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights with NaN or Inf entries (a diverged run): every gradient norm would be NaN."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise UsageError(f"{source} has NaN or Inf weights in {shown} (a diverged run?); give a checkpoint "
                         "from before the divergence")


def save_checkpoint(path: str | os.PathLike, model: nn.Module, recipe: Recipe, meta: Mapping[str, Any]) -> Path:
    """Write ``model``'s state with its recipe and metadata atomically (temp file + rename).

    The suffix picks the encoding: ``.safetensors`` or anything else for ``torch.save``.
    """
    path = Path(path)
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    full_meta = {"versions": package_versions(), "git_revision": git_revision(), **dict(meta)}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        header = {"gradlab.format": FORMAT, "gradlab.version": str(VERSION),
                  "gradlab.recipe": json.dumps(recipe.to_dict()), "gradlab.meta": json.dumps(full_meta, default=str)}
        _atomic_write(path, lambda tmp: save_file(state, tmp, metadata=header))
    else:
        payload = {"format": FORMAT, "version": VERSION, "state_dict": state, "recipe": recipe.to_dict(),
                   "meta": json.loads(json.dumps(full_meta, default=str))}
        _atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ``module.`` and ``_orig_mod.`` prefixes (repeatedly, in any order) from every key."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for p in _STRIP_PREFIXES:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        out[key] = value
    return out


def _tensors_only(obj: Mapping[str, Any], path: Path, where: str) -> dict[str, torch.Tensor]:
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UsageError(f"{path}: {where} holds no tensors; expected a state_dict")
    return tensors


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _is_loaded_module_class(name: str) -> bool:
    """Whether ``pkg.mod.Class`` names an ``nn.Module`` subclass of a module this process already imported (looked
    up, never imported: importing a name from an untrusted file would run code)."""
    import sys

    module, _, attr = name.rpartition(".")
    cls = getattr(sys.modules.get(module), attr, None)
    return isinstance(cls, type) and issubclass(cls, nn.Module)


def _pickled_objects_message(path: Path, detail: str) -> str:
    """One line for a pickle that ``weights_only=True`` refuses: what it holds (torch's own message names the
    first global it met), and gradlab's fix -- never torch's advice to unpickle with weights_only=False, which runs
    whatever code the file carries."""
    detail = _ANSI.sub("", detail)
    found = re.search(r"GLOBAL ([\w.]+)", detail)
    name = found.group(1) if found else None
    if name and (name.startswith("torch.nn.modules.") or _is_loaded_module_class(name)):
        what = f"a whole pickled model ({name}), not its weights"
    elif name:
        what = f"objects other than tensors and plain containers ({name}: possibly code)"
    else:
        what = "objects other than tensors and plain containers (possibly code)"
    return (f"refusing to load {path}: it holds {what}, and gradlab loads weights only (torch.load with "
            "weights_only=True: it never unpickles code); save the weights instead: torch.save(model.state_dict(), "
            "path), or safetensors")


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a gradlab or foreign checkpoint safely (``weights_only=True`` or safetensors)."""
    path = Path(path)
    if path.is_dir():
        return load_hf_folder(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist; give the path of a .pt/.ckpt/.safetensors file")
    with open(path, "rb"):  # PermissionError here names the real cause (is_zipfile would hide it)
        pass
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for corrupt files
            raise UsageError(f"{path} is not a readable safetensors file: {exc}") from exc
        if header.get("gradlab.format") == FORMAT:
            return Checkpoint(path, strip_prefixes(state), Recipe.from_dict(json.loads(header["gradlab.recipe"])),
                              json.loads(header.get("gradlab.meta", "{}")), "gradlab-safetensors")
        return Checkpoint(path, strip_prefixes(state), None, {}, "safetensors")
    if not zipfile.is_zipfile(path):
        raise UsageError(f"{path} is not a readable torch checkpoint (not a torch.save zip archive, nor a "
                         ".safetensors file); give a file written by torch.save or safetensors")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UsageError(_pickled_objects_message(path, str(exc))) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UsageError(f"{path} is not a readable torch checkpoint: {exc}") from None
    if not isinstance(obj, Mapping):
        raise UsageError(f"{path} holds a {type(obj).__name__}, expected a dict (a state_dict or a checkpoint dict)")
    if obj.get("format") == FORMAT:
        return Checkpoint(path, strip_prefixes(obj["state_dict"]), Recipe.from_dict(obj["recipe"]),
                          dict(obj.get("meta") or {}), "gradlab")
    if "pytorch-lightning_version" in obj and isinstance(obj.get("state_dict"), Mapping):
        meta = {k: obj[k] for k in ("epoch", "global_step") if k in obj}
        return Checkpoint(path, strip_prefixes(_tensors_only(obj["state_dict"], path, "state_dict")), None, meta,
                          "lightning")
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj.get(key), Mapping):
            return Checkpoint(path, strip_prefixes(_tensors_only(obj[key], path, f"key {key!r}")), None, {},
                              f"dict[{key}]")
    return Checkpoint(path, strip_prefixes(_tensors_only(obj, path, "the file")), None, {}, "state_dict")


HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def load_hf_folder(path: Path) -> Checkpoint:
    """A Hugging Face ``save_pretrained`` folder: ``config.json`` beside ``model.safetensors``, a sharded
    ``model.safetensors.index.json``, or ``pytorch_model.bin`` (and its index; opened with ``weights_only=True``).

    Only tensors are read; the architecture comes from the ``--model`` factory, which may build it from the
    folder's ``config.json`` (kept in ``meta["hf_config"]``).  Tied weights that the folder stores once are filled in
    by :func:`load_state_strict`.
    """
    found = [name for name in HF_WEIGHTS if (path / name).is_file()]
    if not found:
        raise UsageError(f"{path} is a folder without model weights; expected a Hugging Face save_pretrained folder "
                         f"(config.json with one of {', '.join(HF_WEIGHTS)}), or give a checkpoint file")
    name = found[0]
    if name.endswith(".index.json"):
        try:
            weight_map = json.loads((path / name).read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UsageError(f"{path / name} is not a shard index (JSON with a 'weight_map' of tensor name -> "
                             f"file): {exc!r}") from None
        bad = [s for s in shards if not isinstance(s, str) or Path(s).name != s or not (path / s).is_file()]
        if bad:
            raise UsageError(f"{path / name} names shard files {bad} that are not files in {path}")
    else:
        shards = [name]
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_checkpoint(path / shard).state_dict)
    meta: dict[str, Any] = {}
    if (path / "config.json").is_file():
        try:
            meta["hf_config"] = json.loads((path / "config.json").read_text())
        except ValueError as exc:
            raise UsageError(f"{path / 'config.json'} is not valid JSON: {exc}") from None
    return Checkpoint(path, strip_prefixes(state), None, meta, "huggingface")


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint file's bytes; for a Hugging Face folder, SHA-256 over ``name NUL sha256(file) LF``
    of ``config.json`` and every weight or shard file :func:`load_hf_folder` reads, in name order."""
    path = Path(path)

    def file_sha(p: Path) -> str:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    if not path.is_dir():
        return file_sha(path)
    names = {n for n in ("config.json", *HF_WEIGHTS) if (path / n).is_file()}
    for index in (n for n in list(names) if n.endswith(".index.json")):
        try:
            names |= {s for s in json.loads((path / index).read_text())["weight_map"].values()
                      if isinstance(s, str) and Path(s).name == s and (path / s).is_file()}
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # load_hf_folder reports a broken index
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(f"{name}\0{file_sha(path / name)}\n".encode())
    return h.hexdigest()


def _fill_tied(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights tied in ``model`` (one tensor under several names, e.g. an LM head sharing the token embedding) are
    often saved once: give each missing alias the tensor saved under another of its names."""
    names: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(tensor), []).append(name)
    out = dict(state)
    for group in names.values():
        saved = [n for n in group if n in state]
        for n in group:
            if n not in out and saved:
                out[n] = state[saved[0]]
    return out


def _match_keys(model_keys: set[str], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Lightning-style wrappers prefix every key with an attribute name (``model.``, ``net.``): drop a common
    first component when that makes the keys match the model's."""
    if set(state) == model_keys:
        return state
    firsts = {k.split(".", 1)[0] for k in state}
    if len(firsts) == 1 and all("." in k for k in state):
        stripped = {k.split(".", 1)[1]: v for k, v in state.items()}
        if set(stripped) == model_keys:
            return stripped
    return state


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``, naming missing and unexpected keys and shape differences on mismatch."""
    expected = model.state_dict()
    state = _fill_tied(model, _match_keys(set(expected), dict(state)))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if shapes:
            parts.append("shape differences: " + "; ".join(shapes))
        raise UsageError(f"{source} does not fit the model: " + ", ".join(parts) +
                         ". Check --model and its keyword arguments against the run that wrote the checkpoint.")
    with torch.no_grad():
        model.load_state_dict(state, strict=True)


def build_model_from(
    ckpt: Checkpoint,
    *,
    model: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    input_shape: tuple[int, ...] | None = None,
    n_classes: int | None = None,
) -> nn.Module:
    """Rebuild the checkpoint's model and load its weights.

    The recipe is used when present; ``model``/``model_kwargs`` override it (and are required for foreign
    checkpoints).  A recipe naming a user factory is never imported from the checkpoint: ``model`` must name the
    factory (the same, or another one -- a renamed factory -- whose model the weights must fit exactly).
    """
    from gradlab.models import build_model

    recipe = ckpt.recipe
    if recipe is not None and is_factory_spec(recipe.model) and model is None:
        raise UsageError(
            f"{ckpt.path} was made by the user factory {recipe.model!r}; gradlab never imports code named in a "
            f"checkpoint. Pass --model {recipe.model} if you trust it (or --model of the factory it is now)."
        )
    name = model or (recipe.model if recipe else None)
    if name is None:
        raise UsageError(f"{ckpt.path} is a {ckpt.layout} checkpoint without a gradlab recipe; pass --model NAME "
                         "(and --model-kwargs) to say which model its weights belong to")
    kwargs = dict(model_kwargs) if model_kwargs is not None else dict(recipe.kwargs if recipe else {})
    shape = input_shape or (recipe.input_shape if recipe else None)
    classes = n_classes or (recipe.n_classes if recipe else None)
    if not is_factory_spec(name) and (not shape or not classes):
        raise UsageError(f"{ckpt.path}: cannot tell the input shape and class count of zoo model {name!r} (the data "
                         "gives no image/feature tensors with class-index labels); pass --model pkg.module:factory "
                         "for your own model, or data with (x, y) class labels")
    net = build_model(name, shape or (), classes or 0, **kwargs)
    load_state_strict(net, ckpt.state_dict, str(ckpt.path))
    return net
