"""Hugging Face ``save_pretrained`` folders as checkpoints: single-file and sharded safetensors, pytorch_model.bin,
tied weights stored once, a ``--model`` factory that builds the architecture from ``config.json``; one-line errors.

Without ``transformers`` the folders are written the way ``save_pretrained`` writes them (``safetensors.torch``
files, an index ``{"weight_map": {name: shard}}``, ``config.json``); with it (``pip install .[hf]``), a tiny
GPT2LMHeadModel's own ``save_pretrained`` folder is loaded as well.
"""

from __future__ import annotations

import hashlib
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from gradlab.checkpoint import build_model_from, checkpoint_sha256, load_checkpoint
from gradlab.errors import UsageError
from gradlab.models import build_model
from gradlab.task import lm

T, VOCAB = 8, 13
KW = {"n_layer": 1, "n_head": 2, "n_embd": 8, "tie_weights": True}


def _gpt(seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model("gpt", (T,), VOCAB, **KW)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _saved_once(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict with tied aliases dropped, as save_pretrained stores it (``head.weight`` is ``wte.weight``)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    del state["head.weight"]
    return state


def _write_folder(folder, model, layout: str) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gradlab-gpt", "vocab_size": VOCAB,
                                                    "block_size": T, **KW}))
    state = _saved_once(model)
    if layout == "safetensors":
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    elif layout == "sharded":
        keys = sorted(state)
        halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
                  "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        for shard, names in halves.items():
            save_file({k: state[k] for k in names}, str(folder / shard), metadata={"format": "pt"})
        index = {"metadata": {"total_size": 0}, "weight_map": {k: s for s, names in halves.items() for k in names}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    elif layout == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        raise AssertionError(layout)


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
def test_hf_folder_loads_with_the_model_named(tmp_path, layout):
    original = _gpt(seed=1)
    _write_folder(tmp_path / "hf", original, layout)
    ckpt = load_checkpoint(tmp_path / "hf")
    assert ckpt.layout == "huggingface" and ckpt.recipe is None and ckpt.meta["hf_config"]["vocab_size"] == VOCAB
    assert "head.weight" not in ckpt.state_dict
    net = build_model_from(ckpt, model="gpt", model_kwargs=KW, input_shape=(T,), n_classes=VOCAB)
    assert _same(net, original) and not _same(net, _gpt(seed=2))
    assert net.head.weight is net.wte.weight  # the tie survives loading


def test_hf_folder_with_a_factory_that_reads_config_json(tmp_path, monkeypatch):
    original = _gpt(seed=3)
    _write_folder(tmp_path / "hf", original, "safetensors")
    (tmp_path / "my_hf_models.py").write_text(
        "import json\nfrom pathlib import Path\nfrom gradlab.models.gpt import GPT, GPTConfig\n"
        "def make(path):\n"
        "    cfg = json.loads((Path(path) / 'config.json').read_text())\n"
        "    cfg.pop('model_type')\n"
        "    return GPT(GPTConfig(**cfg))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    net = build_model_from(load_checkpoint(tmp_path / "hf"), model="my_hf_models:make",
                           model_kwargs={"path": str(tmp_path / "hf")}, input_shape=(T,), n_classes=VOCAB)
    assert _same(net, original)


def test_folder_digest_covers_every_shard_and_the_config(tmp_path):
    _write_folder(tmp_path / "hf", _gpt(seed=1), "sharded")
    digest = checkpoint_sha256(tmp_path / "hf")
    assert digest == checkpoint_sha256(tmp_path / "hf") and len(digest) == 64
    (tmp_path / "hf" / "README.md").write_text("not read")  # files the loader does not read do not count
    assert checkpoint_sha256(tmp_path / "hf") == digest
    for name in ("model-00002-of-00002.safetensors", "config.json"):
        original = (tmp_path / "hf" / name).read_bytes()
        (tmp_path / "hf" / name).write_bytes(original + b" ")
        assert checkpoint_sha256(tmp_path / "hf") != digest, name
        (tmp_path / "hf" / name).write_bytes(original)
    torch.save({"w": torch.zeros(1)}, tmp_path / "c.pt")
    assert checkpoint_sha256(tmp_path / "c.pt") == hashlib.sha256((tmp_path / "c.pt").read_bytes()).hexdigest()


def test_a_folder_without_weights_names_what_was_expected(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UsageError, match=r"without model weights; expected a Hugging Face save_pretrained folder "
                                         r"\(config.json with one of model.safetensors, ") as info:
        load_checkpoint(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("weight_map", [{"a": "../outside.safetensors"}, {"a": "missing.safetensors"}])
def test_a_shard_index_naming_files_outside_the_folder_is_refused(tmp_path, weight_map):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(UsageError, match="names shard files"):
        load_checkpoint(tmp_path)


def test_a_broken_index_is_a_usage_error(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(UsageError, match="is not a shard index"):
        load_checkpoint(tmp_path)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (str(self.marker), "w"))


def test_pytorch_model_bin_carrying_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "hf").mkdir()
    with open(tmp_path / "hf" / "pytorch_model.bin", "wb") as f:
        torch.save({"w": torch.zeros(1), "evil": _Payload(marker)}, f, pickle_module=pickle)
    with pytest.raises(UsageError, match="refusing to load"):
        load_checkpoint(tmp_path / "hf")
    assert not marker.exists()


@pytest.mark.parametrize("max_shard_size", [None, "8KB"])
def test_transformers_gpt2_save_pretrained_folder(tmp_path, monkeypatch, max_shard_size):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install .[hf])")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=T,
                                     bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        original = transformers.GPT2LMHeadModel(config).eval()
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    original.save_pretrained(tmp_path / "gpt2", **kwargs)
    sharded = (tmp_path / "gpt2" / "model.safetensors.index.json").exists()
    assert sharded == (max_shard_size is not None)
    (tmp_path / "my_gpt2.py").write_text(
        "from transformers import GPT2Config, GPT2LMHeadModel\n"
        "def make(path):\n"
        "    return GPT2LMHeadModel(GPT2Config.from_pretrained(path)).eval()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = load_checkpoint(tmp_path / "gpt2")
    assert ckpt.layout == "huggingface" and ckpt.meta["hf_config"]["model_type"] == "gpt2"
    net = build_model_from(ckpt, model="my_gpt2:make", model_kwargs={"path": str(tmp_path / "gpt2")},
                           input_shape=(T,), n_classes=VOCAB)
    assert _same(net, original)
    x = torch.randint(0, VOCAB, (3, T), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    torch.testing.assert_close(lm(net, (x, y)), lm(original, (x, y)), rtol=0, atol=0)
