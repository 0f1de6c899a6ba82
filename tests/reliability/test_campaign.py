"""The CI sample of the crash campaign (tests/reliability/campaign.py): at least 20 kills spread over train, probe
(both protocols), sharpness and analyze, at crash points (store creation, checkpoint writes, units marked done,
the probe's finalize, the analysis write, the store's last step) and after random delays; every interrupted
command resumed to a store bitwise identical to an uninterrupted run; the hostile-input battery ends every bad
input in one error line, never a traceback.  The long run: ``python -m tests.reliability.campaign --kills 200``."""

from __future__ import annotations

import pytest

from campaign import campaign, format_table


@pytest.mark.slow
def test_crash_campaign_ci_sample(tmp_path):
    report = campaign(25, seed=0, workdir=tmp_path, hostile=5, verbose=False)
    print(format_table(report))
    totals = report["totals"]
    assert report["failures"] == []
    assert report["bad_inputs"] == []
    assert totals["tracebacks"] == 0
    assert totals["kills"] >= 20
    assert totals["identical_stores"] == totals["sequences"]
    assert {name for name, row in report["table"].items() if row.kills} == {
        "train", "probe-frozen", "probe-step", "sharpness", "analyze"}
