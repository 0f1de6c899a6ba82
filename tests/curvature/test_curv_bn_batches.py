"""``gradlab sharpness --bn-mode train`` normalises each chunk (and each mini-batch) with its own batch statistics: a
batch-norm batch of a single example is refused in one line before anything is written, and a ``--full`` run's
too-large ``--minibatch-sizes`` get advice that applies to ``--full``."""

from __future__ import annotations

import pytest
import torch

from gradlab.checkpoint import Recipe, save_checkpoint
from gradlab.cli import main
from gradlab.models import build_model
from gradlab.store import lock_path


@pytest.fixture()
def bn_ckpt(tmp_path):
    recipe = Recipe("mlp", {"widths": [8], "batch_norm": True}, (1, 8, 8), 10)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_model("mlp", (1, 8, 8), 10, widths=[8], batch_norm=True)
    return save_checkpoint(tmp_path / "bn.pt", net, recipe, {"epoch": 1})


def _refused(argv, capsys, out):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("gradlab: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not out.exists() and not lock_path(out).exists()
    return lines[0]


BASE = ["--data", "digits", "--top-k", "1", "--hutchinson-probes", "4", "--eps", "1e-3", "--lbfgs-iters", "1",
        "--no-progress"]


@pytest.mark.parametrize(("extra", "said"), [
    (["--samples", "64", "--minibatch-sizes", "1,8"], "batch size 1 in --minibatch-sizes; drop it"),
    (["--samples", "64", "--minibatch-sizes", "33", "--chunk-size", "32"],
     "batch size 33 in --minibatch-sizes leaves a last --chunk-size 32 chunk of one example"),
    (["--samples", "65", "--chunk-size", "32"], "the sample of 65 examples in --chunk-size 32 chunks leaves a last "
                                                "chunk of one example"),
])
def test_a_batch_norm_batch_of_one_example_is_refused(bn_ckpt, tmp_path, capsys, extra, said):
    out = tmp_path / "sh.zarr"
    line = _refused(["sharpness", "--checkpoint", str(bn_ckpt), *BASE, "--bn-mode", "train", *extra, "--out",
                     str(out)], capsys, out)
    assert "--bn-mode train normalises each batch with its own statistics" in line and said in line
    assert "--bn-mode eval" in line


def test_eval_mode_batch_norm_takes_a_batch_of_one(bn_ckpt, tmp_path):
    out = tmp_path / "sh.zarr"
    assert main(["sharpness", "--checkpoint", str(bn_ckpt), *BASE, "--samples", "64", "--minibatch-sizes", "1,8",
                 "--minibatch-trials", "2", "--out", str(out)]) == 0


def test_full_with_too_large_minibatch_sizes_does_not_say_raise_samples(bn_ckpt, tmp_path, capsys):
    out = tmp_path / "sh.zarr"
    line = _refused(["sharpness", "--checkpoint", str(bn_ckpt), *BASE, "--full", "--minibatch-sizes", "4,5000",
                     "--out", str(out)], capsys, out)
    assert "--minibatch-sizes [5000] exceed the 1438 training examples of digits (--full uses them all)" in line
    assert "--samples" not in line
