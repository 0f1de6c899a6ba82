"""The one-page HTML report: the fit table, notes and the figures with captions (relative links to the PNGs).

Every figure is shown at (nearly) its natural size -- one per row, never shrunk into a column -- with a caption
that says what it shows and how to read it; ``tests/analysis/test_report_browser.py`` renders the page in a
headless Chromium and checks that nothing overflows and every image is readable at its displayed size.
"""

from __future__ import annotations

import html
from collections.abc import Sequence


def html_report(title: str, header: Sequence[str], rows: Sequence[Sequence[str]],
                figures: Sequence[str | tuple[str, str]], notes: Sequence[str] = ()) -> str:
    """A self-contained HTML page: ``title``, a table (``header`` + ``rows``), notes and ``figures`` (file names,
    or (file name, caption) pairs; a figure without a caption gets its file name)."""
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    notes_html = "".join(f"<li>{esc(n)}</li>" for n in notes)
    figs = []
    for i, item in enumerate(figures, 1):
        name, caption = (item, "") if isinstance(item, str) else item
        text = f"<b>Figure {i}.</b> {esc(caption)}" if caption else f"<b>Figure {i}.</b> {esc(name)}"
        figs.append(f'<figure><img src="{esc(name)}" alt="{esc(caption or name)}"><figcaption>{text}'
                    f'</figcaption></figure>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:sans-serif;max-width:1400px;margin:auto;padding:0 12px}}
table{{border-collapse:collapse;max-width:100%}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:13px;overflow-wrap:anywhere}}
img{{max-width:100%;height:auto;display:block}}figure{{margin:1.5em 0}}
figcaption{{font-size:14px;max-width:900px;line-height:1.4}}li{{overflow-wrap:anywhere}}</style></head>
<body><h1>{esc(title)}</h1><table><tr>{head}</tr>{body}</table>
{"<h2>Notes</h2><ul>" + notes_html + "</ul>" if notes else ""}
{"".join(figs)}</body></html>
"""
