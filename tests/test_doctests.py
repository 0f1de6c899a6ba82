"""Every example in a gradlab docstring runs (issue 11: "every formula example in a docstring is executed").

Each module under ``gradlab/`` is imported (``pkgutil.walk_packages``) and its docstring examples are run with
``doctest`` (``ELLIPSIS | NORMALIZE_WHITESPACE``), one test per module so that a failure names it.  A module that
needs an optional package which is not installed (lightning, transformers, ...) is skipped with the reason.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from types import ModuleType

import pytest

import gradlab

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
# top-level packages that gradlab imports only in its optional extras (pyproject [project.optional-dependencies])
OPTIONAL = {"lightning", "pytorch_lightning", "transformers", "datasets", "accelerate", "dask", "distributed"}


def _module_names() -> list[str]:
    names = [gradlab.__name__]

    def onerror(name: str) -> None:  # a package whose __init__ fails to import: its test reports it
        names.append(name)

    for info in pkgutil.walk_packages(gradlab.__path__, prefix=f"{gradlab.__name__}.", onerror=onerror):
        if info.name.rsplit(".", 1)[-1] != "__main__":  # running __main__ would start the CLI
            names.append(info.name)
    return sorted(set(names))


MODULES = _module_names()


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        missing = (err.name or "").split(".")[0]
        if missing in OPTIONAL:
            pytest.skip(f"{name} needs the optional package {missing!r}, which is not installed")
        raise


# examples known to fail in modules this test's author does not own; each is reported to the module's owner
KNOWN_FAILURES: dict[str, str] = {}  # module -> why its examples fail (none today)


def find_doctests(module: ModuleType) -> list[doctest.DocTest]:
    """The docstring examples of ``module``'s own objects (not of those it imports), with the module's globals."""
    tests = doctest.DocTestFinder(exclude_empty=True).find(module, module.__name__, globs={})
    for test in tests:
        test.globs = {**vars(module), **test.globs}
    return [t for t in tests if t.examples]


def run_doctests(module: ModuleType) -> doctest.TestResults:
    """Run the docstring examples of ``module`` (flags ``ELLIPSIS | NORMALIZE_WHITESPACE``)."""
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in find_doctests(module):
        runner.run(test)
    return runner.summarize(verbose=False)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_FAILURES[n], strict=False))
                                  if n in KNOWN_FAILURES else n for n in MODULES])
def test_docstring_examples_pass(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = _import(name)
    expected = sum(len(t.examples) for t in find_doctests(module))
    results = run_doctests(module)
    report = capsys.readouterr().out
    assert results.failed == 0, f"{results.failed} of {results.attempted} examples failed in {name}:\n{report}"
    assert results.attempted == expected  # every example found was run


def test_doctests_are_collected() -> None:
    """The harness finds examples (a broken finder would make every module test pass vacuously): more than 0 in
    all, and in modules known to carry them."""
    found = {}
    for name in MODULES:
        try:
            module = _import(name)
        except pytest.skip.Exception:
            continue
        found[name] = sum(len(t.examples) for t in find_doctests(module))
    assert sum(found.values()) > 0
    for name in ("gradlab.analysis.noise_model", "gradlab.analysis.power_law", "gradlab.probe.step",
                 "gradlab.curvature.hvp"):
        assert found[name] > 0, name


def test_a_wrong_example_fails() -> None:
    """The harness fails on a wrong example (its own check: a module whose docstring claims 1 + 1 == 3)."""
    bad = ModuleType("gradlab_bad_example", "Example::\n\n    >>> 1 + 1\n    3\n")
    results = run_doctests(bad)
    assert (results.attempted, results.failed) == (1, 1)
