"""The one-page HTML report: the fit table and the figures (relative links to the PNG files)."""

from __future__ import annotations

import html
from collections.abc import Sequence


def html_report(title: str, header: Sequence[str], rows: Sequence[Sequence[str]], figures: Sequence[str],
                notes: Sequence[str] = ()) -> str:
    """A self-contained HTML page: ``title``, a table (``header`` + ``rows``), notes and ``figures`` (file names)."""
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    notes_html = "".join(f"<li>{esc(n)}</li>" for n in notes)
    figs = "".join(f'<figure><img src="{esc(f)}" alt="{esc(f)}"><figcaption>{esc(f)}</figcaption></figure>'
                   for f in figures)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:13px}}img{{max-width:100%}}
figure{{display:inline-block;width:48%;margin:0.5%}}</style></head>
<body><h1>{esc(title)}</h1><table><tr>{head}</tr>{body}</table>
{"<h2>Notes</h2><ul>" + notes_html + "</ul>" if notes else ""}
{figs}</body></html>
"""
