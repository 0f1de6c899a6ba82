"""The README stays true: CI runs its test command verbatim, and its quickstart has exactly two commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_quickstart_has_two_commands_and_ci_runs_the_test_one_verbatim():
    commands = _quickstart_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    test_cmd = [c for c in commands if "pytest" in c]
    assert len(test_cmd) == 1
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd[0] in ci
    assert ci.index("python -m pip install -q torch==2.13.0") < ci.index(test_cmd[0])


def _section_blocks(heading: str, lang: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    return [b.replace("\\\n", " ").strip() for b in re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)]


@pytest.mark.timeout(1800)
def test_readme_commands_run_as_written(tmp_path):
    """Every `gradlab` command of the README's reference sections, verbatim and in order, in a scratch folder."""
    import subprocess
    import sys

    commands = [c for h in ("`gradlab train`", "`gradlab probe`", "`gradlab analyze`", "`gradlab sharpness`",
                            "`gradlab cbs`") for c in _section_blocks(h, "bash")]
    assert len(commands) == 5 and all(c.startswith("gradlab ") for c in commands)
    env = {**__import__("os").environ, "PYTHONWARNINGS": "error"}
    for cmd in commands:
        proc = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, capture_output=True, text=True,
                              env=env)
        assert proc.returncode == 0, f"{cmd}\n{proc.stderr[-2000:]}"
    (snippet,) = _section_blocks("`gradlab train`", "python")
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "norms-report" / "summary.json").exists() and (tmp_path / "sharp.zarr" / "zarr.json").exists()
    assert (tmp_path / "cbs-report" / "summary.json").exists()
