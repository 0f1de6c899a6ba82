"""`gradlab probe` end to end on real checkpoints: schema, values against references, bad input, dry run, locks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradlab.checkpoint import build_model_from, load_checkpoint
from gradlab.cli import main
from gradlab.probe.distance import distances
from gradlab.probe.frozen import checkpoint_estimates
from gradlab.probe.sampling import draw_trial
from gradlab.schema import entry_histogram
from gradlab.store import StoreWriter, lock_path, open_store
from probe_cases import make_run


@pytest.fixture()
def run_dir(tmp_path):
    return make_run(tmp_path / "run")


def probe_args(paths: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["probe", "--checkpoint", f"e={paths['early']}", "--checkpoint", str(paths["late"]), "--data", "digits",
            "--batch-sizes", "1,2,4,8,16", "--budget", "16", "--trials", "5", "--trials-per-unit", "2",
            "--protocol", "frozen", "--out", str(out), *extra]


def _model(path: Path):
    return build_model_from(load_checkpoint(path))


def test_schema_every_variable_labelled_and_provenance_recorded(run_dir, tmp_path, capsys):
    out = tmp_path / "p.zarr"
    assert main(probe_args(run_dir, out)) == 0
    ds = open_store(out, kind="probe")
    assert list(ds.checkpoint.values) == ["e", "late"]
    for name in [*ds.data_vars, *ds.coords]:
        assert ds[name].attrs.get("long_name") and "units" in ds[name].attrs, name
    assert ds.done.values.all()
    cfg = json.loads(ds.attrs["config"])
    assert cfg["seed"] == 0 and cfg["budget"] == 16 and cfg["batch_sizes"] == [1, 2, 4, 8, 16]
    prov = json.loads(ds.attrs["provenance"])
    assert prov["git_revision"] and "torch" in prov["versions"] and "zarr" in prov["versions"]
    for key in ("protocol", "reduction", "budget", "replacement", "pool_size", "seed", "lr", "model_mode"):
        assert key in ds.attrs, key
    assert ds.attrs["model_mode"] == "eval" and ds.attrs["pool_size"] == 1438
    assert ds.grad_norm.dims == ("checkpoint", "batch_size", "trial")
    assert int(ds.sizes["minibatch"]) == 16 and list(ds.group.values) == ["all", "weight", "bias"]


def test_frozen_store_values_match_references(run_dir, tmp_path):
    out = tmp_path / "p.zarr"
    assert main(probe_args(run_dir, out, "--dtype", "float64", "--params", r"layers\.(2|4)\.", "--seed", "9")) == 0
    ds = open_store(out, kind="probe")
    from gradlab.datasets import load_data

    train = load_data("digits").train
    selected = ["layers.2.weight", "layers.2.bias", "layers.4.weight", "layers.4.bias"]
    assert list(ds.layer.values[ds.selected.values]) == selected
    for c, key in enumerate(("early", "late")):
        net = _model(run_dir[key]).double()
        params = dict(net.named_parameters())
        assert Path(str(ds.init_path.values[c])).name == "init.pt"  # found beside it by its 'init' tag
        d = distances(params, dict(_model(run_dir["init"]).named_parameters()), list(ds.layer.values))
        np.testing.assert_allclose(ds.dist_init.values[c], d.dist_init, rtol=1e-12)
        np.testing.assert_allclose(ds.cos_init_layer.values[c], d.cos_init_layer, rtol=1e-12)
        for t in (0, 3):
            idx = draw_trial(9, c, t, 16, 1438)
            assert np.array_equal(ds.example_index.values[c, t], idx)
            x, y = train.x[idx].double(), train.y[idx]
            for i, m in enumerate((1, 2, 4, 8, 16)):
                s = {n: torch.zeros_like(params[n]) for n in selected}
                for k in range(16 // m):
                    net.zero_grad()
                    F.cross_entropy(net(x[k * m:(k + 1) * m]), y[k * m:(k + 1) * m]).backward()
                    g = torch.cat([params[n].grad.flatten() for n in selected])
                    assert ds.minibatch_grad_norm.values[c, i, t, k] == pytest.approx(float(g.norm()), rel=1e-9)
                    for n in selected:
                        s[n] += params[n].grad
                vec = torch.cat([s[n].flatten() for n in selected])
                assert ds.grad_norm.values[c, i, t] == pytest.approx(float(vec.norm()), rel=1e-9)
                assert np.isnan(ds.grad_norm_layer.values[c, i, t, :2]).all()  # layers.0 not selected
                assert ds.grad_norm_layer.values[c, i, t, 4] == pytest.approx(float(s["layers.4.weight"].norm()),
                                                                                rel=1e-9)
                counts, bad = entry_histogram(vec.numpy())
                assert bad == 0 and np.array_equal(ds.entry_hist.values[c, i, t], counts)
        est = checkpoint_estimates(ds.gram_trace.values[c], ds.gram_sum.values[c], 16, 1438, False)
        assert ds.grad_sq_norm.values[c] == est.grad_sq_norm and ds.trace_cov.values[c] == est.trace_cov
        assert ds.b_noise.values[c] == pytest.approx(est.trace_cov / est.grad_sq_norm)


def test_step_protocol_through_cli_matches_naive_loop(run_dir, tmp_path):
    from gradlab.datasets import load_data
    from gradlab.probe.naive import naive_step_trials

    out = tmp_path / "s.zarr"
    assert main(probe_args(run_dir, out, "--protocol", "step", "--dtype", "float64", "--lr", "0.05",
                           "--keep", "vectors", "--params", r"layers\.4\.", "--trials", "3",
                           "--reduction", "sum")) == 0
    ds = open_store(out, kind="probe")
    train = load_data("digits").train
    sel = ["layers.4.weight", "layers.4.bias"]
    for c, key in enumerate(("early", "late")):
        net = _model(run_dir[key])
        idx = torch.as_tensor(ds.example_index.values[c])
        for i, m in enumerate((1, 2, 4, 8, 16)):
            ref = naive_step_trials(net, train.x, train.y, idx, m, 0.05, "sum", sel, dtype=torch.float64)
            vec = np.concatenate([ref.grad_sum[n].reshape(3, -1) for n in sel], axis=1)
            np.testing.assert_allclose(ds.grad_sum.values[c, i], vec, rtol=1e-5, atol=1e-7)  # stored as float32
            np.testing.assert_allclose(ds.grad_norm.values[c, i], np.linalg.norm(vec, axis=1), rtol=1e-10)
            np.testing.assert_allclose(ds.displacement.values[c, i], ref.displacement, rtol=1e-10)
            np.testing.assert_allclose(ds.step_grad_norm_mean.values[c, i], ref.step_norm_mean, rtol=1e-10)
            np.testing.assert_allclose(ds.step_grad_norm_max.values[c, i], ref.step_norm_max, rtol=1e-10)
            assert (ds.nonfinite_count.values[c, i] == 0).all()


def test_dry_run_writes_nothing(run_dir, tmp_path, capsys):
    out = tmp_path / "p.zarr"
    assert main(probe_args(run_dir, out, "--dry-run")) == 0
    text = capsys.readouterr().out
    assert "units: 6 to compute of 6" in text and "estimated time" in text and "store size" in text
    assert not out.exists() and not lock_path(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


BAD = [
    (["--batch-sizes", "1,3,4"], "do not divide the budget"),
    (["--budget", "2000", "--batch-sizes", "1,2"], "exceeds the 1438 training examples"),
    (["--model", "mlp", "--model-kwargs", '{"widths": [8]}'], "does not fit the model"),
    (["--params", "conv"], "matches no parameter"),
    (["--protocol", "sideways"], "invalid choice"),
    (["--init", "missing.pt"], "does not exist"),
    (["--model-kwargs", "{widths"], "not valid JSON"),
    (["--trials", "0"], "--trials must be >= 1"),
]


@pytest.mark.parametrize(("extra", "message"), BAD, ids=[b[1] for b in BAD])
def test_bad_input_exits_2_with_message_and_no_store(run_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "p.zarr"
    try:
        code = main(probe_args(run_dir, out, *extra))
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not lock_path(out).exists()


def test_existing_store_second_writer_and_changed_config_are_refused(run_dir, tmp_path, capsys):
    out = tmp_path / "p.zarr"
    assert main(probe_args(run_dir, out)) == 0
    capsys.readouterr()
    assert main(probe_args(run_dir, out)) == 2
    assert "already exists; pass --resume" in capsys.readouterr().err
    assert main(probe_args(run_dir, out, "--resume", "--seed", "1")) == 2
    err = capsys.readouterr().err  # what changed, not the whole stored config
    assert "different config (seed: 0 → 1)" in err and len(err) < 300
    with StoreWriter(out):
        assert main(probe_args(run_dir, out, "--resume")) == 2
        assert "being written by another gradlab process" in capsys.readouterr().err
    assert main(probe_args(run_dir, out, "--resume")) == 0
    assert "0 of 6 units computed" in capsys.readouterr().out


def test_nonfinite_gradients_are_counted_warned_and_not_mistaken_for_unselected_layers(tmp_path, caplog):
    from gradlab.probe.run import resolve_config, run_probe

    paths = make_run(tmp_path / "run", nan_weight=True)
    for protocol in ("frozen", "step"):
        config = resolve_config([str(paths["early"]), str(paths["late"])], data="digits", batch_sizes=[1, 4],
                                budget=4, trials=2, protocol=protocol)
        with caplog.at_level("WARNING", logger="gradlab.probe.run"):
            summary = run_probe(config, tmp_path / f"{protocol}.zarr")
        ds = open_store(tmp_path / f"{protocol}.zarr")
        assert (ds.nonfinite_count.values[0] == 0).all() and (ds.nonfinite_count.values[1] > 0).all()
        assert summary.nonfinite == int(ds.nonfinite_count.values.sum())
        assert np.isfinite(ds.grad_norm.values[0]).all() and np.isnan(ds.grad_norm.values[1]).all()
        assert "non-finite gradient entries" in caplog.text
        caplog.clear()


def test_frozen_unit_builds_the_total_gram_once_per_trial(run_dir, tmp_path, monkeypatch):
    """The norms and the registered quantities read one K = Σ_layers K_layer per trial (it is (N, N) in float64)."""
    import gradlab.probe.frozen as fz

    built = []
    real = fz.total_gram
    monkeypatch.setattr(fz, "total_gram", lambda grams: built.append(1) or real(grams))
    assert main(probe_args(run_dir, tmp_path / "p.zarr")) == 0
    assert len(built) == 2 * 5  # 2 checkpoints × 5 trials
