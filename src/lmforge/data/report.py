"""report.md / report.html from funnel.json: what survived each step, why the rest did not.

Sections: the funnel (documents and estimated tokens in/out per step, with the top drop
reasons), flagged-but-kept counts, histograms (language score, quality score, output length),
the domain mix before/after mixing, dedup and classifier summaries, and examples of dropped
text per step and reason. HTML is self-contained (inline CSS and SVG, no scripts).
"""

from __future__ import annotations

import html

from lmforge.data.steps.base import HIST_BINS


def example_kind(reason: str) -> str:
    """Examples are keyed by drop reason, "flag:<reason>" or "replaced:<what>"."""
    if reason.startswith("flag:"):
        return "flagged"
    if reason.startswith("replaced:"):
        return "modified"
    return "dropped"


def _pct(a: int, b: int) -> str:
    return f"{100.0 * a / b:.1f}%" if b else "-"


def _reasons(table: dict, k: int = 4) -> str:
    items = sorted(table.items(), key=lambda kv: -kv[1]["docs"])
    s = ", ".join(f"{r} {v['docs']:,}" for r, v in items[:k])
    return s + (f", +{len(items) - k} more" if len(items) > k else "")


def _funnel_rows(funnel: dict) -> list[list[str]]:
    rows = []
    for st in funnel["steps"]:
        dropped = sum(v["docs"] for v in st["dropped"].values())
        rows.append(
            [
                st["name"],
                f"{st['docs_in']:,}",
                f"{st['docs_out']:,}",
                f"{dropped:,}",
                _pct(st["docs_out"], st["docs_in"]),
                f"{st['tokens_out']:,}",
                _reasons(st["dropped"]) or "-",
            ]
        )
    return rows


HEAD = ["step", "docs in", "docs out", "dropped", "kept", "tokens out (est.)", "drop reasons"]


def _hist_text(name: str, counts: list[int], width: int = 40) -> list[str]:
    lo, hi, bins = HIST_BINS[name]
    top = max(counts) or 1
    out = []
    for i, c in enumerate(counts):
        a = lo + (hi - lo) * i / bins
        out.append(f"{a:6.2f} | {'#' * round(width * c / top):<{width}} {c:,}")
    return out


def render_markdown(funnel: dict) -> str:
    L = ["# Data stage report", ""]
    tr, va = funnel["train"], funnel["val"]
    L += [
        f"Output: **{tr['docs']:,} train** docs ({tr['bytes'] / 1e6:.2f} MB, {len(tr['shards'])} shards) and "
        f"**{va['docs']:,} val** docs ({va['bytes'] / 1e6:.2f} MB) from {funnel['tasks']} task(s) in "
        f"{funnel['seconds']:.1f}s ({funnel['input_mb_per_s']:.2f} MB/s of input). "
        f"Tokens are estimated as {funnel['token_estimate']}.",
        "",
    ]
    L += ["## Funnel", "", "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    L += ["| " + " | ".join(r) + " |" for r in _funnel_rows(funnel)]
    flagged = [(st["name"], st["flagged"]) for st in funnel["steps"] if st["flagged"]]
    if flagged:
        L += ["", "## Flagged (kept, tagged in meta.flags)", ""]
        for name, table in flagged:
            L.append(
                f"- **{name}**: {sum(v['docs'] for v in table.values()):,} docs would be dropped "
                f"in `mode: drop` ({_reasons(table, 8)})"
            )
    counters = [(st["name"], st["counters"]) for st in funnel["steps"] if st["counters"]]
    if counters:
        L += ["", "## Counters", ""]
        for name, c in counters:
            L.append(f"- **{name}**: " + ", ".join(f"{k} {v:,}" for k, v in sorted(c.items())))
    if funnel.get("skipped_files_count"):
        L += [
            "",
            f"Skipped {funnel['skipped_files_count']} file(s) of unsupported type, e.g. "
            f"`{funnel['skipped_files'][0]}`.",
        ]
    mix = funnel["domain_mix"]
    L += [
        "",
        "## Domain mix",
        "",
        f"Mixing by {mix['by']}; target weights: {mix['weights'] or 'none (natural mix)'}",
        "",
        "| domain | docs before | token share before | docs after | token share after |",
        "|---|---|---|---|---|",
    ]
    for d in sorted(set(mix["before"]) | set(mix["after"])):
        b, a = mix["before"].get(d, {}), mix["after"].get(d, {})
        L.append(
            f"| {d} | {b.get('docs', 0):,} | {b.get('token_share', 0):.3f} | {a.get('docs', 0):,} | "
            f"{a.get('token_share', 0):.3f} |"
        )
    dd = funnel["dedup"]
    L += [
        "",
        "## Deduplication",
        "",
        f"{dd['exact_clusters']:,} exact-duplicate clusters, {dd['near_clusters']:,} near-duplicate clusters "
        f"(MinHash {dd['ngram']}-gram shingles, {dd['bands']} bands x {dd['rows']} rows); "
        f"members are listed in `dedup_clusters.jsonl`.",
    ]
    c = funnel["classifier"]
    L += ["", "## Quality classifier", ""]
    if not c.get("enabled"):
        L.append("Disabled.")
    elif not c.get("trained"):
        L.append(c.get("note", "Not trained."))
    else:
        L.append(
            f"Trained on {c['n_positives']:,} positives ({c['positives']}) vs {c['n_negatives']:,} negatives "
            f"({c['negatives']}); held-out accuracy {c.get('heldout_accuracy', 'n/a')}; mode `{c['mode']}`"
            + (f", threshold {c['threshold']}" if c["mode"] == "filter" else "")
            + "."
        )
    L += ["", "## Histograms", ""]
    for name, counts in funnel["histograms"].items():
        L += [f"### {name} ({sum(counts):,} docs)", "", "```"] + _hist_text(name, counts) + ["```", ""]
    for title, kind in (
        ("Examples of dropped text", "dropped"),
        ("Examples of flagged (kept) text", "flagged"),
        ("Examples of modified text (after the change)", "modified"),
    ):
        group = [
            (st["name"], r, exs)
            for st in funnel["steps"]
            for r, exs in st["examples"].items()
            if exs and example_kind(r) == kind
        ]
        if not group:
            continue
        L += [f"## {title}", ""]
        for name, reason, exs in group:
            L += [f"**{name} / {reason.split(':', 1)[-1]}**", ""]
            for ex in exs:
                where = ex.get("url") or ex.get("id") or ex.get("source") or ""
                matched = f" (matched eval item `{ex['matched']}`)" if ex.get("matched") else ""
                L.append(f"- `{where}`{matched}: {ex['text']}")
            L.append("")
    return "\n".join(L) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child,td:last-child{text-align:left}.bar{fill:#4a7fb5}.ex{font-size:90%;color:#444}
code{background:#f4f4f4}"""


def _svg_hist(name: str, counts: list[int], w: int = 520, h: int = 140) -> str:
    lo, hi, bins = HIST_BINS[name]
    top = max(counts) or 1
    bw = w / bins
    bars = "".join(
        f'<rect class="bar" x="{i * bw:.1f}" y="{h - 20 - (h - 30) * c / top:.1f}" width="{bw - 1:.1f}" '
        f'height="{(h - 30) * c / top:.1f}"><title>{lo + (hi - lo) * i / bins:.2f}: {c}</title></rect>'
        for i, c in enumerate(counts)
    )
    labels = f'<text x="0" y="{h - 5}" font-size="11">{lo:g}</text><text x="{w - 20}" y="{h - 5}" font-size="11">{hi:g}</text>'
    return f'<svg width="{w}" height="{h}" role="img" aria-label="{name}">{bars}{labels}</svg>'


def render_html(funnel: dict) -> str:
    e = html.escape
    P = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Data stage report</title><style>{_CSS}</style>"
        "</head><body><h1>Data stage report</h1>"
    ]
    tr, va = funnel["train"], funnel["val"]
    P.append(
        f"<p>Output: <b>{tr['docs']:,}</b> train docs, <b>{va['docs']:,}</b> val docs; "
        f"{funnel['seconds']:.1f}s, {funnel['input_mb_per_s']:.2f} MB/s of input. "
        f"Tokens estimated as {e(funnel['token_estimate'])}.</p>"
    )
    P.append("<h2>Funnel</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in HEAD) + "</tr>")
    for r in _funnel_rows(funnel):
        P.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>")
    P.append("</table>")
    flagged = [(st["name"], st["flagged"]) for st in funnel["steps"] if st["flagged"]]
    if flagged:
        P.append(
            "<h2>Flagged (kept)</h2><ul>"
            + "".join(f"<li><b>{e(n)}</b>: {e(_reasons(t, 8))}</li>" for n, t in flagged)
            + "</ul>"
        )
    mix = funnel["domain_mix"]
    P.append(
        f"<h2>Domain mix</h2><p>by {e(mix['by'])}; weights: {e(str(mix['weights'] or 'natural mix'))}</p>"
        "<table><tr><th>domain</th><th>docs before</th><th>token share before</th><th>docs after</th>"
        "<th>token share after</th></tr>"
    )
    for d in sorted(set(mix["before"]) | set(mix["after"])):
        b, a = mix["before"].get(d, {}), mix["after"].get(d, {})
        P.append(
            f"<tr><td>{e(d)}</td><td>{b.get('docs', 0):,}</td><td>{b.get('token_share', 0):.3f}</td>"
            f"<td>{a.get('docs', 0):,}</td><td>{a.get('token_share', 0):.3f}</td></tr>"
        )
    P.append("</table>")
    dd, c = funnel["dedup"], funnel["classifier"]
    P.append(
        f"<h2>Deduplication</h2><p>{dd['exact_clusters']:,} exact and {dd['near_clusters']:,} near-duplicate "
        f"clusters (see dedup_clusters.jsonl).</p><h2>Quality classifier</h2><p>"
    )
    if c.get("trained"):
        P.append(
            e(
                f"{c['n_positives']} positives ({c['positives']}) vs {c['n_negatives']} negatives "
                f"({c['negatives']}); held-out accuracy {c.get('heldout_accuracy', 'n/a')}; mode {c['mode']}"
            )
        )
    else:
        P.append(e(c.get("note", "Disabled.") if c.get("enabled") else "Disabled."))
    P.append("</p><h2>Histograms</h2>")
    for name, counts in funnel["histograms"].items():
        P.append(f"<h3>{e(name)} ({sum(counts):,} docs)</h3>{_svg_hist(name, counts)}")
    for title, kind in (
        ("Examples of dropped text", "dropped"),
        ("Examples of flagged (kept) text", "flagged"),
        ("Examples of modified text (after the change)", "modified"),
    ):
        group = [
            (st["name"], r, exs)
            for st in funnel["steps"]
            for r, exs in st["examples"].items()
            if exs and example_kind(r) == kind
        ]
        if group:
            P.append(f"<h2>{e(title)}</h2>")
        for name, reason, exs in group:
            P.append(
                f"<h3>{e(name)} / {e(reason.split(':', 1)[-1])}</h3><ul class='ex'>"
                + "".join(
                    f"<li><code>{e(str(x.get('url') or x.get('id') or ''))}</code>"
                    + (f" matched eval item <code>{e(x['matched'])}</code>" if x.get("matched") else "")
                    + f" {e(x['text'])}</li>"
                    for x in exs
                )
                + "</ul>"
            )
    P.append("</body></html>")
    return "\n".join(P)
