"""Every test the README's "What gradlab guarantees" section names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_guarantee_names_an_existing_test():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## What gradlab guarantees", 1)[1].split("\n## ", 1)[0]
    refs = re.findall(r"`(…|[\w/]+\.py)?(?:::)?(test_\w+)?`", section)
    last_file, named = None, 0
    for file, test in refs:
        if file and not file.startswith("…"):
            last_file = file
        if not test:
            continue
        assert last_file is not None, test
        text = (ROOT / "tests" / last_file).read_text(encoding="utf-8")
        assert f"def {test}(" in text, f"README names {last_file}::{test}, which does not exist"
        named += 1
    assert named >= 15
    for sentence in ("Crash safety", "Concurrency", "Code in checkpoints", "Not covered"):
        assert sentence in section
