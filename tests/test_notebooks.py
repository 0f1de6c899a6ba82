"""Every study notebook in analyses/ is executed on small stores the tests make; a failing cell fails the suite.

The stores are real: `gradlab train`, `gradlab probe` and `gradlab sharpness` runs on the embedded digits with a
narrow MLP and few epochs/trials.  Notebooks find them through GRADLAB_STUDIES (see analyses/README.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gradlab.cli import main

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "analyses").glob("[a-z]_*.py"))
TINY = ["--model", "mlp", "--data", "digits", "--no-progress"]


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
    return s


def test_every_study_has_a_notebook():
    assert [p.name for p in NOTEBOOKS] == ["a_gradient_competition.py", "b_where_the_weights_go.py",
                                           "c_masters_luschi.py", "d_vgg13_remedies.py", "e_keskar_sharpness.py"]


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
