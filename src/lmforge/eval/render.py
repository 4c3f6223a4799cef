"""The report's content model and its two views: a report is a list of `Section`s, each a list of
blocks (paragraph, table, image, preformatted text), rendered once as Markdown (images as PNG files
under `plots/`) and once as self-contained HTML (the same PNGs inlined as data URIs, inline CSS, no
scripts, no network). Kept apart from `report` so that `compare` can build its own sections and
render them the same way without pulling in how a run directory is read.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from typing import Any

# ----------------------------------------------------------------------------- blocks


@dataclass
class Section:
    title: str
    blocks: list[tuple] = field(default_factory=list)

    def p(self, text: str) -> Section:
        self.blocks.append(("p", text))
        return self

    def table(self, header: list[str], rows: list[list[Any]]) -> Section:
        if rows:
            self.blocks.append(("table", header, [[_cell(c) for c in r] for r in rows]))
        return self

    def image(self, name: str, png: bytes | None, alt: str) -> Section:
        if png:
            self.blocks.append(("img", name, png, alt))
        return self

    def pre(self, text: str) -> Section:
        self.blocks.append(("pre", text))
        return self


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, (dict, list)):
        s = json.dumps(v, default=str)
        return s if len(s) <= 80 else s[:77] + "..."
    return str(v)


def _count(x: float | None) -> str:
    if x is None:
        return "-"
    for div, suf in ((1e15, "P"), (1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suf}"
    return f"{x:.3g}"


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ----------------------------------------------------------------------------- rendering
def _md_escape(t: str) -> str:
    return t.replace("|", "\\|").replace("\n", " ")


def render_markdown(sections: list[Section], plot_dir: str = "plots") -> str:
    out = []
    for i, sec in enumerate(sections):
        out += [("# " if i == 0 else "## ") + sec.title, ""]
        for b in sec.blocks:
            if b[0] == "p":
                out += [b[1], ""]
            elif b[0] == "table":
                out.append("| " + " | ".join(_md_escape(h) for h in b[1]) + " |")
                out.append("|" + "---|" * len(b[1]))
                out += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in b[2]]
                out.append("")
            elif b[0] == "img":
                out += [f"![{b[3]}]({plot_dir}/{b[1]})", ""]
            elif b[0] == "pre":
                out += ["```", b[1], "```", ""]
    return "\n".join(out)


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1050px;margin:2em auto;padding:0 1em;
color:#1d1d1f;line-height:1.45}h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.8em}table{border-collapse:collapse;margin:.6em 0;font-size:.88em}td,th{border:1px solid #ddd;padding:.25em .55em;
text-align:left;vertical-align:top}th{background:#f4f4f6}tr:nth-child(even) td{background:#fafafa}img{max-width:100%;
margin:.5em 0}code,pre{background:#f4f4f6;padding:.1em .3em;border-radius:3px}nav a{margin-right:1em}"""


def _inline(t: str) -> str:
    """Markdown-ish inline markup of our own paragraphs: **bold** and `code`."""
    import re

    t = html.escape(t)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def render_html(sections: list[Section]) -> str:
    title = sections[0].title if sections else "report"
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body>",
    ]
    out.append(
        "<nav>"
        + "".join(f"<a href='#s{i}'>{html.escape(s.title)}</a>" for i, s in enumerate(sections[1:], 1))
        + "</nav>"
    )
    for i, sec in enumerate(sections):
        tag = "h1" if i == 0 else "h2"
        out.append(f"<{tag} id='s{i}'>{html.escape(sec.title)}</{tag}>")
        for b in sec.blocks:
            if b[0] == "p":
                out.append(f"<p>{_inline(b[1])}</p>")
            elif b[0] == "table":
                out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in b[1]) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in b[2]]
                out.append("</table>")
            elif b[0] == "img":
                data = base64.b64encode(b[2]).decode("ascii")
                out.append(f"<img alt='{html.escape(b[3])}' src='data:image/png;base64,{data}'>")
            elif b[0] == "pre":
                out.append(f"<pre>{html.escape(b[1])}</pre>")
    out.append("</body></html>")
    return "\n".join(out)


def images(sections: list[Section]) -> dict[str, bytes]:
    return {b[1]: b[2] for s in sections for b in s.blocks if b[0] == "img"}
