"""Same command, same store: the stores of every kind that the CLI writes today equal the ones the code wrote before
the runner redesign (issue 11, outcome 6): data bitwise, attrs equal apart from provenance.

The fixtures in ``tests/golden/stores/`` were written by ``python -m tests.golden.write_fixtures`` at the commit
that added them (before any orchestration moved); see ``tests/golden/snapshot.py`` for what is compared.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.golden.make_golden import STORES, write_all
from tests.golden.snapshot import load_snapshot, snapshot
from tests.golden.write_fixtures import EXTRA, FIXTURES, fixture_name


# Attrs a store may now carry that it did not before, each a fixed inconsistency of issue 11 (the runner records
# them for every store kind; they were probe-only).  ``input_sha256`` needs no entry: snapshots drop SHA-256s.
NEW_ATTRS = {
    "torch_threads": "the torch thread count every unit runs with (bitwise-reproducible resume and Dask runs)",
    "examples_at_step": "monitor stores: the examples seen at each flush (a resume with every > 1 restores it)",
}


# Variables whose last bits changed, each a fixed inconsistency of issue 11: train stores' distances and cosines now
# come from the one implementation that probe stores use (gradlab.probe.distance: float64 dot products where
# train.py summed squares), so they equal the old values up to float64 rounding, not bitwise; and sharpness stores'
# losses come from the one evaluator that train uses too (cross-entropy summed by F.cross_entropy's own reduction,
# where sharpness summed per-example values), equal up to float64 rounding; and the monitor's (below).
ROUNDING_CHANGES = {
    "train/train.zarr": {"dist_init_layer", "cos_init_layer", "dist_init", "dist_origin"},
    "sharpness.zarr": {"train_loss", "test_loss"},
    # the monitor's ‖G‖² estimate multiplies by the one finite-population factor (n − m)/(n − 1) where it divided
    # inline; every variable derived from that estimate equals the old one up to float64 rounding
    "train/runs/bs256_lr0.05_seed0_sgd/monitor.zarr": {
        f"{name}{part}" for name in ("grad_sq_norm", "b_simple", "grad_sq_norm_ema", "grad_sq_norm_ema_low",
                                     "grad_sq_norm_ema_high", "b_noise", "b_noise_low", "b_noise_high")
        for part in ("", "_layer")},
}
ROUNDING_RTOL = 1e-14

# Variables made more accurate since (issue 13): the monitor's float32 update norms and distances from init are now
# cascaded sums of squares, where torch's CPU vector_norm accumulated each SIMD lane sequentially (off by 1e-5 over
# a million float32 entries; tests/monitor/test_exact.py::test_float32_norms_are_accurate_on_a_million_entries).
# The golden train run is float32: the values move in their eighth digit.
ACCURACY_CHANGES = {
    "train/runs/bs256_lr0.05_seed0_sgd/monitor.zarr": {
        f"{name}{part}" for name in ("dist_init", "update_norm") for part in ("", "_layer")},
}
ACCURACY_RTOL = 1e-6

# Intervals redefined since (session 8): where ‖G‖² is not distinguishable from 0, Fieller's set for B_noise is two
# rays, and the interval is now its part in [0, inf) (the true tr Σ/‖G‖² is ≥ 0): [max(r₂, 0), inf) when r₁ < 0,
# else [0, inf), where it was the ray holding the point estimate.  Only those elements (upper end inf) may differ,
# and only to 0 or from a negative lower end; every other element is as before (up to the rounding above).
NONNEGATIVE_FIELLER = {"train/runs/bs256_lr0.05_seed0_sgd/monitor.zarr": {"b_noise_low", "b_noise_low_layer"}}

# Flags added since: the monitor's `missing` gained code 6 (session 7: the backpropagated loss has terms besides the
# per-example losses, e.g. a penalty) and code 7 (session 9: a layer input the background worker read was edited in
# place).  The old codes and meanings are kept, in order; the new ones are appended.
FLAG_ADDITIONS = {"train/runs/bs256_lr0.05_seed0_sgd/monitor.zarr": {"missing": ([6, 7], 2)}}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("golden")
    write_all(folder)
    return folder


@pytest.mark.parametrize("store", [*STORES, *EXTRA])
def test_store_equals_the_one_written_before_the_redesign(written, store):
    arrays, attrs = snapshot(written / store, written)
    want_arrays, want_attrs = load_snapshot(FIXTURES / fixture_name(store))
    assert sorted(arrays) == sorted(want_arrays)
    for name, want in want_arrays.items():
        got = arrays[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if name in NONNEGATIVE_FIELLER.get(store, ()):
            unbounded = arrays[name.replace("_low", "_high")] == np.inf
            np.testing.assert_allclose(got[~unbounded], want[~unbounded], rtol=ROUNDING_RTOL, atol=0, err_msg=name)
            g, w = got[unbounded], want[unbounded]
            assert ((g == 0) | np.isclose(g, w, rtol=ROUNDING_RTOL, atol=0) | ((w < 0) & (g >= 0))).all(), name
            assert np.isnan(g).sum() == np.isnan(w).sum() == 0 and (g >= 0).all(), name
            continue
        if name in ACCURACY_CHANGES.get(store, ()):
            np.testing.assert_allclose(got, want, rtol=ACCURACY_RTOL, atol=0, err_msg=f"{store}: {name}")
            continue
        if name in ROUNDING_CHANGES.get(store, ()):
            np.testing.assert_allclose(got, want, rtol=ROUNDING_RTOL, atol=0, err_msg=f"{store}: {name}")
            continue
        assert np.array_equal(got, want, equal_nan=got.dtype.kind in "fc"), f"{store}: {name} differs"
    got_attrs = json.loads(json.dumps(attrs, sort_keys=True, default=str))
    for new in NEW_ATTRS:
        if new not in want_attrs["/"]:
            got_attrs["/"].pop(new, None)
    assert sorted(got_attrs) == sorted(want_attrs)
    for key, want in want_attrs.items():
        if key in FLAG_ADDITIONS.get(store, {}):
            values, n_new = FLAG_ADDITIONS[store][key]
            got = dict(got_attrs[key])
            assert got.pop("flag_values") == [*want["flag_values"], *values], f"{store}: {key} flag_values"
            meanings = got.pop("flag_meanings").split(" | ")
            assert meanings[:-n_new] == want["flag_meanings"].split(" | "), f"{store}: {key} flag_meanings"
            assert got == {k: v for k, v in want.items() if k not in ("flag_values", "flag_meanings")}, key
            continue
        assert got_attrs[key] == want, f"{store}: attrs of {key!r} differ"
