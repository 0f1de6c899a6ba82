"""Checkpoint format, foreign layouts, safe loading and clear mismatch messages."""

from __future__ import annotations

import pickle

import pytest
import torch

from gradlab.checkpoint import Recipe, build_model_from, load_checkpoint, save_checkpoint
from gradlab.errors import UsageError

RECIPE = Recipe("mlp", {"widths": [16, 12]}, (1, 8, 8), 10)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("suffix", ["pt", "safetensors"])
def test_gradlab_format_round_trip(tmp_path, tiny_mlp, suffix):
    path = save_checkpoint(tmp_path / f"c.{suffix}", tiny_mlp, RECIPE, {"epoch": 2, "batch_size": 32, "lr": 0.01,
                                                                         "seed": 0})
    ckpt = load_checkpoint(path)
    assert ckpt.recipe == RECIPE and ckpt.meta["epoch"] == 2 and "torch" in ckpt.meta["versions"]
    assert _same(build_model_from(ckpt), tiny_mlp)
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left no temp file


def _wrap(state, layout):
    if layout == "bare":
        return state
    if layout in ("state_dict", "model_state_dict", "model"):
        return {layout: state, "epoch": 3, "optimizer": {"lr": 0.1}}
    if layout == "lightning":
        return {"epoch": 1, "global_step": 10, "pytorch-lightning_version": "2.4.0",
                "state_dict": {f"model.{k}": v for k, v in state.items()}, "optimizer_states": [], "lr_schedulers": []}
    if layout == "ddp":
        return {f"module.{k}": v for k, v in state.items()}
    if layout == "compiled":
        return {f"_orig_mod.{k}": v for k, v in state.items()}
    if layout == "ddp+compiled":
        return {f"module._orig_mod.{k}": v for k, v in state.items()}
    raise AssertionError(layout)


@pytest.mark.parametrize("layout", ["bare", "state_dict", "model_state_dict", "model", "lightning", "ddp", "compiled",
                                    "ddp+compiled"])
def test_foreign_layouts_round_trip(tmp_path, tiny_mlp, layout):
    path = tmp_path / ("c.ckpt" if layout == "lightning" else "c.pt")
    torch.save(_wrap(tiny_mlp.state_dict(), layout), path)
    ckpt = load_checkpoint(path)
    assert ckpt.recipe is None
    net = build_model_from(ckpt, model="mlp", model_kwargs={"widths": [16, 12]}, input_shape=(1, 8, 8), n_classes=10)
    assert _same(net, tiny_mlp)


def test_foreign_safetensors(tmp_path, tiny_mlp):
    from safetensors.torch import save_file

    save_file({f"module.{k}": v.contiguous() for k, v in tiny_mlp.state_dict().items()}, tmp_path / "c.safetensors")
    ckpt = load_checkpoint(tmp_path / "c.safetensors")
    net = build_model_from(ckpt, model="mlp", model_kwargs={"widths": [16, 12]}, input_shape=(1, 8, 8), n_classes=10)
    assert ckpt.layout == "safetensors" and _same(net, tiny_mlp)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (self.marker, "w"))


def test_pickled_code_payload_is_refused_without_running(tmp_path, tiny_mlp):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": tiny_mlp.state_dict(), "x": _Payload(str(marker))}, path, pickle_module=pickle)
    with pytest.raises(UsageError, match="weights_only=True"):
        load_checkpoint(path)
    assert not marker.exists()


def test_mismatch_names_missing_unexpected_and_shapes(tmp_path, tiny_mlp):
    state = dict(tiny_mlp.state_dict())
    state.pop("layers.4.bias")
    state["extra.weight"] = torch.zeros(1)
    state["layers.0.weight"] = torch.zeros(3, 64)
    torch.save(state, tmp_path / "c.pt")
    with pytest.raises(UsageError) as err:
        build_model_from(load_checkpoint(tmp_path / "c.pt"), model="mlp", model_kwargs={"widths": [16, 12]},
                         input_shape=(1, 8, 8), n_classes=10)
    msg = str(err.value)
    assert "missing keys ['layers.4.bias']" in msg and "unexpected keys ['extra.weight']" in msg
    assert "layers.0.weight: checkpoint (3, 64) vs model (16, 64)" in msg


def test_factory_recipe_is_not_imported_from_checkpoint(tmp_path, tiny_mlp, monkeypatch):
    mod = tmp_path / "evil_models.py"
    marker = tmp_path / "imported"
    mod.write_text(f"open({str(marker)!r}, 'w').close()\ndef make(**kw):\n    raise SystemExit\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    save_checkpoint(tmp_path / "c.pt", tiny_mlp, Recipe("evil_models:make", {}, (1, 8, 8), 10), {})
    with pytest.raises(UsageError, match="never imports code named in a checkpoint"):
        build_model_from(load_checkpoint(tmp_path / "c.pt"))
    assert not marker.exists()


def test_foreign_checkpoint_without_model_asks_for_it(tmp_path, tiny_mlp):
    torch.save(tiny_mlp.state_dict(), tmp_path / "c.pt")
    with pytest.raises(UsageError, match="pass --model"):
        build_model_from(load_checkpoint(tmp_path / "c.pt"))


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all"])
def test_garbage_file_is_a_usage_error(tmp_path, content):
    (tmp_path / "c.pt").write_bytes(content)
    with pytest.raises(UsageError, match="not a readable torch checkpoint"):
        load_checkpoint(tmp_path / "c.pt")


def test_missing_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_a_factory_recipe_with_another_model_passed_uses_the_one_passed(tmp_path, tiny_mlp, monkeypatch):
    """A checkpoint made by 'old_models:make' and --model 'new_models:make' (a renamed factory) was refused with
    'pass --model old_models:make' although the user had passed --model (an external user's report): the factory
    the user names is built and the weights must fit it; the checkpoint's own factory is never imported."""
    marker = tmp_path / "imported"
    (tmp_path / "old_models.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (tmp_path / "new_models.py").write_text(
        "from gradlab.models import build_model\n"
        "def make(**kw):\n    return build_model('mlp', (1, 8, 8), 10, **kw)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    kwargs = {"widths": [16, 12]}  # the tiny model's
    save_checkpoint(tmp_path / "c.pt", tiny_mlp, Recipe("old_models:make", kwargs, (1, 8, 8), 10), {})
    net = build_model_from(load_checkpoint(tmp_path / "c.pt"), model="new_models:make")
    assert list(net.state_dict()) == list(tiny_mlp.state_dict())
    for a, b in zip(net.state_dict().values(), tiny_mlp.state_dict().values()):
        assert torch.equal(a, b)
    assert not marker.exists()
    with pytest.raises(UsageError, match="never imports code named in a checkpoint"):
        build_model_from(load_checkpoint(tmp_path / "c.pt"))


def test_a_pickled_whole_model_gets_gradlabs_fix_not_torchs_advice(tmp_path, tiny_mlp):
    """torch's refusal text carries ANSI escapes and the advice to unpickle with weights_only=False (which would run
    the file's code): the one line says what the file holds and gradlab's fix instead."""
    path = tmp_path / "whole.pt"
    torch.save(tiny_mlp, path)
    with pytest.raises(UsageError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "a whole pickled model (gradlab.models.mlp.MLP), not its weights" in msg
    assert "torch.save(model.state_dict(), path)" in msg
    assert "\x1b" not in msg and "weights_only=False" not in msg and "\n" not in msg
