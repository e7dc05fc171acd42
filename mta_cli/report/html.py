"""The report page: one self-contained HTML file (inline CSS, figures embedded as base64 PNG data URIs, no
script, no external link), readable offline and mailable as it is."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from datetime import datetime, timezone
from html import escape

from mta_cli import __version__
from mta_cli.report.cache_view import STYLE as SAMPLE_STYLE
from mta_cli.report.figures import Chart

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0; background: #f6f7f9;
  color: #1d2330; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 28px 60px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 36px 0 10px; padding-top: 10px; border-top: 1px solid #dde1e7; }
h3 { font-size: 15px; margin: 22px 0 6px; }
.meta { color: #5b6475; font-size: 13px; margin: 0 0 10px; }
nav { font-size: 14px; margin: 10px 0 4px; }
nav a { margin-right: 14px; color: #2f6fdb; text-decoration: none; }
figure { margin: 8px 0 20px; background: #fff; border: 1px solid #dde1e7; border-radius: 6px; padding: 10px; }
figure img { max-width: 100%; height: auto; display: block; margin: 0 auto; }
figcaption { font-size: 13px; color: #4a5263; margin-top: 6px; }
table { border-collapse: collapse; background: #fff; font-size: 13px; margin: 6px 0 14px; }
th, td { border: 1px solid #dde1e7; padding: 4px 9px; text-align: right; white-space: nowrap; }
th { background: #eef1f5; }
td:first-child, th:first-child { text-align: left; }
code { font-size: 12px; }
""" + SAMPLE_STYLE


@dataclass
class Section:
    """A part of the page: a heading, then tables, charts and HTML fragments in the given order."""

    heading: str
    parts: list[str] = field(default_factory=list)

    def add_chart(self, chart: Chart | None) -> None:
        if chart is not None:
            self.parts.append(chart_html(chart))

    def add_table(self, headers: list[str], rows: list[list]) -> None:
        self.parts.append(table_html(headers, rows))

    def add_html(self, fragment: str) -> None:
        self.parts.append(fragment)


def chart_html(chart: Chart) -> str:
    data = base64.b64encode(chart.png).decode("ascii")
    return (f'<h3>{escape(chart.title)}</h3><figure><img alt="{escape(chart.title)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{escape(chart.caption)}</figcaption></figure>')


def table_html(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, sources: list[str], sections: list[Section]) -> str:
    """The whole document: title, what it was made from, a table of contents, the sections."""
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f'<a href="#s{i}">{escape(s.heading)}</a>' for i, s in enumerate(sections))
    body = "".join(f'<h2 id="s{i}">{escape(s.heading)}</h2>' + "".join(s.parts) for i, s in enumerate(sections))
    inputs = ", ".join(f"<code>{escape(source)}</code>" for source in sources)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><main><h1>{escape(title)}</h1>"
            f'<p class="meta">mta-cli {escape(__version__)}, {made}; from {inputs}</p><nav>{nav}</nav>{body}'
            "</main></body></html>\n")
