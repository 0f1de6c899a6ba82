"""α-stable indices outside (0, 2] from a real probe are reported unclipped, flagged and explained.

The digits MLP's small bias tensors gave per-layer "α-stable indices" of 3.2-7.6 in summary.json with no word that
an α-stable index cannot exceed 2."""

from __future__ import annotations

import json

from gradlab.analysis.run import analyze_store
from gradlab.cli import main
from probe_cases import make_run


def test_out_of_range_alpha_stable_is_flagged_in_summary_and_report(tmp_path):
    paths = make_run(tmp_path / "run")
    store = tmp_path / "s.zarr"
    assert main(["probe", "--checkpoint", str(paths["late"]), "--data", "digits", "--batch-sizes", "1,4,16",
                 "--budget", "16", "--trials", "8", "--protocol", "step", "--keep", "vectors", "--no-progress",
                 "--out", str(store)]) == 0
    res = analyze_store(store, out_dir=tmp_path / "an", n_boot=19, seed=0, write_store=False)
    summary = json.loads((tmp_path / "an" / "summary.json").read_text())
    flagged = set()
    for m, t in summary["checkpoints"]["late"]["tails"].items():
        assert t["alpha_stable_range"] == "(0, 2]"
        for what, e in [("the pooled entries", t["alpha_stable"]),
                        *((f"layer {k}", v) for k, v in t["alpha_stable_per_layer"].items())]:
            assert e["outside_stable_range"] is (not 0 < e["value"] <= 2), (m, what, e)
            if e["outside_stable_range"]:
                flagged.add(what)
                assert "outside (0, 2]" in e["note"] and "not supported" in e["note"]
    assert flagged, "this store has small bias layers whose estimates leave (0, 2]"
    report = (tmp_path / "an" / "report.html").read_text()
    for what in flagged:
        note = next(n for n in res["notes"] if f"α-stable index of {what} is" in n)
        assert "reported unclipped" in note and "α-stable model is not supported" in note
        assert f"α-stable index of {what} is" in report
