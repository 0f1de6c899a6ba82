"""Errors gradlab raises for bad input.

``UsageError`` is the one exception the CLI turns into a one-line message and exit code 2.  Its message must say
what was wrong, what was expected and how to fix it.
"""

from __future__ import annotations


class UsageError(Exception):
    """Bad user input (flags, files, configs).  The CLI prints ``gradlab: error: <message>`` and exits 2."""


class StoreError(UsageError):
    """A store that is missing, foreign, locked by another writer, or was made with a different config."""
