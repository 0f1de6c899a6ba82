"""Common random numbers across checkpoints (issue 15 item 5): by default trial t draws the same examples at every
checkpoint, so analyze's early-vs-late change is a paired comparison; ``--draws independent`` keeps the old
per-checkpoint derivation.  Tested on real probe stores of a tiny MLP on the embedded digits."""

from __future__ import annotations

import numpy as np
import pytest

from gradlab.analysis.compare import compare_checkpoints
from gradlab.analysis.noise_model import finite_population_factor, noise_model_statistic
from gradlab.analysis.run import analyze_store
from gradlab.cli import main
from gradlab.probe.sampling import draw_trial, seed_derivation
from gradlab.store import open_store
from probe_cases import make_run

M = [1, 4, 16, 64]


def _probe(paths, out, *extra):
    assert main(["probe", "--checkpoint", f"early={paths['early']}", "--checkpoint", f"late={paths['late']}",
                 "--data", "digits", "--batch-sizes", ",".join(map(str, M)), "--budget", "64", "--trials", "40",
                 "--protocol", "frozen", "--keep", "norms", "--out", str(out), "--no-progress", *extra]) == 0
    return open_store(out)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("crn")
    paths = make_run(d / "run")
    return _probe(paths, d / "common.zarr"), _probe(paths, d / "indep.zarr", "--draws", "independent"), d


def test_common_draws_are_the_default_and_recorded(stores):
    common, indep, _ = stores
    assert common.attrs["draws"] == "common" and common.attrs["seed_derivation"] == seed_derivation("common")
    # issue 15 item 7: the stored ‖G‖² is an estimate of the pool's, not the drawn sample's own ‖Ḡ‖²
    assert "unbiased estimate of the pool's ‖G‖²" in common["grad_sq_norm"].attrs["long_name"]
    idx = common["example_index"].values
    assert np.array_equal(idx[0], idx[1])
    assert indep.attrs["draws"] == "independent" and "[seed, c, t]" in indep.attrs["seed_derivation"]
    assert not np.array_equal(indep["example_index"].values[0], indep["example_index"].values[1])
    np.testing.assert_array_equal(idx[1, 3], draw_trial(0, 1, 3, 64, int(common.attrs["pool_size"])))


def test_paired_interval_on_a_real_store(stores):
    """The default store's change is paired; on these draws the paired interval of the B_noise ratio is narrower
    than the two-sample interval of the same data, and the independent store's change is not paired."""
    common, indep, d = stores
    res = analyze_store(d / "common.zarr", out_dir=d / "a", n_boot=499, seed=2, figures=False, write_store=False)
    changes = {c["quantity"]: c for c in res["comparison"]}
    assert changes["b_noise"]["paired"] and changes["trace_cov"]["paired"]
    res_i = analyze_store(d / "indep.zarr", out_dir=d / "b", n_boot=99, seed=2, figures=False, write_store=False)
    assert not any(c["paired"] for c in res_i["comparison"])

    q = (common["minibatch_grad_norm"] ** 2).mean("minibatch", skipna=True)
    q = q.transpose("checkpoint", "batch_size", "trial").values
    x = finite_population_factor(np.array(M, float), int(common.attrs["pool_size"]), False) / np.array(M, float)

    def stat(qq):
        a, b = noise_model_statistic(qq, x)[:2]
        return np.stack([b / a])

    widths = {}
    for paired in (True, False):
        (ch,) = compare_checkpoints(q[0], q[1], stat, ["b_noise"], ["ratio"], paired=paired, n_boot=499,
                                    rng=np.random.default_rng(5))
        widths[paired] = ch.change.high - ch.change.low
        assert ch.change.contains(ch.change.value)
    assert ch.change.value == pytest.approx(changes["b_noise"]["change"]["value"], rel=1e-12)
    assert widths[True] < widths[False], widths


def test_unknown_draws_is_a_usage_error(tmp_path):
    from gradlab.errors import UsageError
    from gradlab.probe.run import resolve_config

    paths = make_run(tmp_path / "run")
    with pytest.raises(UsageError, match="draws"):
        resolve_config([str(paths["early"])], data="digits", batch_sizes=[1], budget=4, trials=1, draws="sometimes")
