"""Distances from init and origin and cosines to init, per tensor and per group; init discovery by tag."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradlab.probe.distance import distances, find_init
from probe_cases import make_run


def test_distances_per_layer_and_group():
    theta = {"a.weight": torch.tensor([[3.0, 0.0]]), "a.bias": torch.tensor([0.0, 4.0]),
             "b.weight": torch.tensor([1.0])}
    theta0 = {"a.weight": torch.tensor([[0.0, 1.0]]), "a.bias": torch.tensor([0.0, 4.0]),
              "b.weight": torch.tensor([2.0])}
    names = ["a.weight", "a.bias", "b.weight"]
    d = distances(theta, theta0, names)
    assert d.dist_init_layer == pytest.approx([np.sqrt(10), 0.0, 1.0])
    assert d.dist_origin_layer == pytest.approx([3.0, 4.0, 1.0])
    assert d.cos_init_layer == pytest.approx([0.0, 1.0, 1.0])
    assert d.dist_init == pytest.approx([np.sqrt(11), np.sqrt(11), 0.0])  # all, weight, bias
    assert d.dist_origin == pytest.approx([np.sqrt(26), np.sqrt(10), 4.0])
    assert d.cos_init == pytest.approx([18 / (np.sqrt(26) * np.sqrt(21)), 2 / (np.sqrt(10) * np.sqrt(5)), 1.0])


def test_no_init_gives_nan_and_empty_group_is_nan():
    d = distances({"w": torch.ones(2)}, None, ["w"])
    assert np.isnan(d.dist_init_layer).all() and np.isnan(d.cos_init).all()
    assert d.dist_origin == pytest.approx([np.sqrt(2), np.sqrt(2), np.nan], nan_ok=True)


def test_find_init_by_tag(tmp_path):
    paths = make_run(tmp_path / "run")
    assert find_init(paths["late"]) == paths["init"].resolve()
    (tmp_path / "solo").mkdir()
    solo = make_run(tmp_path / "solo")
    solo["init"].unlink()
    assert find_init(solo["late"]) is None


def test_init_warnings_name_the_api_argument_in_python_and_the_flag_on_the_cli(tmp_path, caplog, capsys):
    """The API's warnings said "pass --init", a flag API users do not have: they name ``init=`` there and keep
    ``--init`` on the command line."""
    import logging
    import shutil

    import gradlab
    from gradlab.cli import main

    paths = make_run(tmp_path / "run")
    shutil.copy(paths["init"], tmp_path / "run" / "init2.pt")  # two checkpoints tagged init: ambiguous
    with caplog.at_level(logging.WARNING, logger="gradlab"):
        gradlab.probe([str(paths["late"])], data="digits", out=tmp_path / "api.zarr", budget=4, batch_sizes=[1, 4],
                      trials=2)
    api = [r.getMessage() for r in caplog.records if "init" in r.getMessage()]
    assert any("several init checkpoints" in m and "pass init= to choose one" in m for m in api), api
    assert any("no init= and no checkpoint tagged 'init'" in m for m in api), api
    assert not any("--init" in m for m in api), api
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gradlab"):
        assert main(["probe", "--checkpoint", str(paths["late"]), "--data", "digits", "--budget", "4",
                     "--batch-sizes", "1,4", "--trials", "2", "--protocol", "frozen", "--no-progress", "--out",
                     str(tmp_path / "cli.zarr")]) == 0
    cli = [r.getMessage() for r in caplog.records if "init" in r.getMessage()]
    assert any("pass --init to choose one" in m for m in cli) and any("no --init and" in m for m in cli), cli
