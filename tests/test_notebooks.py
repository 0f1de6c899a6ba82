"""Every study notebook in analyses/ is executed on small stores the tests make; a failing cell fails the suite.

The stores are real: `gradlab train`, `gradlab probe` and `gradlab sharpness` runs on the embedded digits with a
narrow MLP and few epochs/trials, and (for f_char_gpt) on the first 512 windows of the embedded shakespeare-char
corpus with a one-layer, width-16 `gpt`.  Notebooks find them through GRADLAB_STUDIES (see analyses/README.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gradlab.cli import main

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "analyses").glob("[a-z]_*.py"))
TINY = ["--model", "mlp", "--data", "digits", "--no-progress"]
# a data factory for the tiny gpt stores: the first 512 training (64 test) windows of shakespeare-char, so one epoch
# of the tiny model takes about a second; written beside the stores and imported as `tinytext:data`
TINY_TEXT = """
from gradlab.datasets import DataBundle, Split
from gradlab.datasets.text import load_shakespeare_char


def data():
    full = load_shakespeare_char()
    return DataBundle(name="shakespeare-char[:512]", train=Split(full.train.x[:512], full.train.y[:512]),
                      test=Split(full.test.x[:64], full.test.y[:64]), n_classes=full.n_classes,
                      provenance=full.provenance, loss=full.loss)
"""


def _train(out: Path, *args: str) -> None:
    assert main(["train", *TINY, "--out", str(out), *args]) == 0


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    s = tmp_path_factory.mktemp("studies")
    w16 = ["--model-kwargs", '{"widths": [16]}']
    _train(s / "weights_grid", *w16, "--batch-sizes", "16,64", "--lr", "0.05,0.2", "--epochs", "4")
    _train(s / "sgd_vs_adam", *w16, "--batch-sizes", "32", "--lr", "0.001,0.01", "--optimizer", "sgd,adam",
           "--epochs", "3")
    _train(s / "base_lr_grid", *w16, "--lr-scaling", "sum", "--batch-sizes", "8,64", "--lr", "0.001,0.01,10",
           "--epochs", "2")
    bn = ["--model-kwargs", '{"widths": [16], "batch_norm": true}', "--batch-sizes", "16,64", "--lr", "0.05",
          "--epochs", "2"]
    _train(s / "bn_batch_4", *bn, "--ghost-batch-size", "4")
    _train(s / "bn_batch_full", *bn)
    remedy = ["--batch-sizes", "16,64", "--lr", "0.02", "--base-batch-size", "16", "--epochs", "2"]
    ghost = ["--model-kwargs", '{"widths": [16], "batch_norm": true}', "--ghost-batch-size", "8",
             "--lr-scaling", "linear"]
    _train(s / "remedy_baseline", *w16, *remedy)
    _train(s / "remedy_ghostbn_linear", *ghost, *remedy)
    _train(s / "remedy_ghostbn_linear_warmup", *ghost, *remedy, "--warmup-epochs", "1")
    _train(s / "remedy_ghostbn_cyclic", *ghost, *remedy, "--cyclic", "--cyclic-half-epochs", "1")
    _train(s / "remedy_ghostbn_cyclic_sqrt", *ghost, *remedy, "--cyclic", "--cyclic-sqrt-factor",
           "--cyclic-half-epochs", "1")
    runs = s / "weights_grid" / "runs"
    big = runs / "bs64_lr0.2_seed0_sgd"
    probe = ["--checkpoint", f"early={big / 'epoch002.pt'}", "--checkpoint", f"late={big / 'epoch004.pt'}",
             "--data", "digits", "--batch-sizes", "1,4,16,64,256", "--budget", "256", "--no-progress"]
    assert main(["probe", *probe, "--protocol", "step", "--trials", "8", "--params", r"layers\.2\.",
                 "--keep", "vectors", "--out", str(s / "competition" / "step.zarr")]) == 0
    assert main(["probe", *probe, "--protocol", "frozen", "--trials", "16",
                 "--out", str(s / "competition" / "frozen.zarr")]) == 0
    ckpts = [str(runs / f"bs{m}_lr{lr}_seed0_sgd" / "epoch004.pt") for m in (16, 64) for lr in ("0.05", "0.2")]
    assert main(["sharpness", *sum((["--checkpoint", c] for c in ckpts), []), "--data", "digits", "--samples", "128",
                 "--top-k", "2", "--hutchinson-probes", "8", "--eps", "1e-3", "--minibatch-sizes", "16,64",
                 "--minibatch-trials", "2", "--interpolate", ckpts[0], ckpts[-1], "--alpha-points", "7",
                 "--out", str(s / "keskar" / "sharpness.zarr")]) == 0
    small = runs / "bs16_lr0.05_seed0_sgd"
    cbs_ck = ["--checkpoint", f"early={small / 'epoch002.pt'}", "--checkpoint", f"late={small / 'epoch004.pt'}",
              "--data", "digits", "--no-progress"]
    assert main(["cbs", *cbs_ck, "--batch-sizes", "4,16,64", "--budget", "256", "--seeds", "5", "--lr-scaling",
                 "linear", "--lr-factors", "0.5,1", "--evals", "8", "--eval-examples", "256",
                 "--out", str(s / "cbs" / "cbs.zarr")]) == 0
    assert main(["probe", *cbs_ck, "--batch-sizes", "1,4,16,64", "--budget", "64", "--trials", "8", "--protocol",
                 "frozen", "--out", str(s / "cbs" / "frozen.zarr")]) == 0
    _char_gpt(s)
    return s


def _char_gpt(s: Path) -> None:
    """f_char_gpt's stores: a tiny gpt trained 3 epochs on 512 windows, frozen probe and sharpness at epochs 1 and 3."""
    (s / "tinytext.py").write_text(TINY_TEXT)
    data = ["--data", "tinytext:data", "--no-progress"]
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(s))
        assert main(["train", "--model", "gpt", "--model-kwargs", '{"n_layer": 1, "n_head": 2, "n_embd": 16}', *data,
                     "--batch-sizes", "16", "--lr", "0.5", "--epochs", "3", "--checkpoint-epochs", "1,3",
                     "--out", str(s / "char_gpt")]) == 0
        run = s / "char_gpt" / "runs" / "bs16_lr0.5_seed0_sgd"
        assert main(["probe", *data, "--checkpoint", f"early={run / 'epoch001.pt'}", "--checkpoint",
                     f"late={run / 'epoch003.pt'}", "--batch-sizes", "1,4,16,64", "--budget", "64", "--trials", "8",
                     "--protocol", "frozen", "--keep", "histograms", "--out", str(s / "char_gpt" / "frozen.zarr")]) == 0
        assert main(["cbs", *data, "--checkpoint", f"early={run / 'epoch001.pt'}", "--checkpoint",
                     f"late={run / 'epoch003.pt'}", "--batch-sizes", "4,16,64", "--budget", "128", "--seeds", "5",
                     "--evals", "4", "--eval-examples", "64", "--out", str(s / "char_gpt" / "cbs.zarr")]) == 0
        assert main(["sharpness", *data, "--checkpoint", str(run / "epoch001.pt"), "--checkpoint",
                     str(run / "epoch003.pt"), "--samples", "32", "--top-k", "1", "--hutchinson-probes", "4",
                     "--eps", "1e-3", "--lbfgs-iters", "2", "--out", str(s / "char_gpt" / "sharpness.zarr")]) == 0


def test_every_study_has_a_notebook():
    assert [p.name for p in NOTEBOOKS] == ["a_gradient_competition.py", "b_where_the_weights_go.py",
                                           "c_masters_luschi.py", "d_vgg13_remedies.py", "e_keskar_sharpness.py",
                                           "f_char_gpt.py", "g_critical_batch_size.py"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, studies, monkeypatch):
    import jupytext
    import nbclient

    nb = jupytext.read(path)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # sources carry no outputs
    monkeypatch.setenv("GRADLAB_STUDIES", str(studies))
    monkeypatch.setenv("GRADLAB_N_BOOT", "49")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute(env=dict(os.environ))
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stdout")
    assert text.strip(), f"{path.name} printed no findings"
