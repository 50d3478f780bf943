"""Text renderers: the tidy CSV, the Markdown leaderboard and the self-contained HTML page."""

from __future__ import annotations

import csv
import html
import io
import re

from epmq.report.aggregate import SuiteData, run_sort_key
from epmq.report.anchors import QUOTED_HEADING, quoted_csv_rows, quoted_table
from epmq.report.names import baseline_method, compact_json, method_name, variant_str
from epmq.report.tables import (
    Table,
    cost_table,
    data_items,
    meta_items,
    methodology,
    pivot_table,
    suite_summary,
    sweep_table,
)

CSV_COLUMNS = [
    "suite",
    "model",
    "expert_task",
    "merge",
    "merge_params",
    "method",
    "bits",
    "group_size",
    "variant",
    "seed",
    "n_calib",
    "split",
    "task",
    "metric",
    "value",
    "stderr",
    "n",
    "correct",
    "quantize_seconds",
    "peak_rss_mb",
    "gpu_mb",
    "quant_params",
    "epmq_version",
    "torch_version",
    "git_sha",
    "origin",  # "ours" (a run record of this workflow) or "quoted" (copied from the literature: never aggregated)
    "quoted_label",
    "quoted_source",
    "packed_mb",  # added after the quoted columns: readers of the older column order keep working
]
_FLOAT_FMT = {"value": ".4f", "stderr": ".4f", "quantize_seconds": ".3f", "peak_rss_mb": ".1f", "gpu_mb": ".1f",
              "packed_mb": ".4f"}
DEFAULT_TITLE = "E-PMQ leaderboard"


def _csv_value(col: str, v) -> str:
    if v is None:
        return ""
    if col in _FLOAT_FMT:
        return format(float(v), _FLOAT_FMT[col])
    return str(v)


def csv_rows(runs: list[dict]) -> list[dict]:
    """One row per (run, task, metric) in the leaderboard's stable order (tasks by name)."""
    rows = []
    for r in sorted(runs, key=run_sort_key):
        prov = r["provenance"]
        for task in sorted(r["tasks"]):
            rec = r["tasks"][task]
            rows.append(
                {
                    "suite": r["suite"],
                    "model": r["model"],
                    "expert_task": r["expert_task"],
                    "merge": r["merge"],
                    "merge_params": compact_json(r["merge_params"]),
                    "method": r["method"],
                    "bits": r["bits"],
                    "group_size": r["group_size"],
                    "variant": variant_str(r["variant"]),
                    "seed": r["seed"],
                    "n_calib": r["n_calib"],
                    "split": rec.get("split") or r["split"],
                    "task": task,
                    "metric": rec.get("metric") or "accuracy",  # t5-glue's STS-B: spearman
                    "value": rec["accuracy"],
                    "stderr": rec["stderr"],
                    "n": rec["n"],
                    "correct": rec["correct"],
                    "quantize_seconds": r["cost"]["quantize_seconds"],
                    "peak_rss_mb": r["cost"]["peak_rss_mb"],
                    "gpu_mb": r["cost"]["gpu_mb"],
                    "packed_mb": r["cost"]["packed_mb"],
                    "quant_params": compact_json(r["quant_params"]),
                    "epmq_version": prov.get("epmq"),
                    "torch_version": prov.get("torch"),
                    "git_sha": prov.get("git_sha"),
                    "origin": "ours",
                    "quoted_label": None,
                    "quoted_source": None,
                }
            )
    return rows


def csv_text(runs: list[dict], anchors: dict | None = None) -> str:
    """Our rows, then per suite the quoted ones (``origin`` = ``quoted``; columns they lack are empty)."""
    rows = csv_rows(runs) + quoted_csv_rows(anchors or {})
    rows.sort(key=lambda row: row["suite"])  # stable: ours first within a suite, each part in its own order
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for row in rows:
        w.writerow([_csv_value(c, row.get(c)) for c in CSV_COLUMNS])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- Markdown


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def _md_cell(c) -> str:
    s = _md_escape(c.text)
    if c.strong and c.text:
        s = f"**{s}**"
    if c.se is not None:
        s += f" ({c.se})"
    if c.best:
        s += " †"
    return s


def md_table(t: Table) -> str:
    align = ["---:" if any(row[j].num for row in t.rows) else "---" for j in range(len(t.headers))]
    lines = ["| " + " | ".join(_md_escape(h) for h in t.headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


def _suite_tables(sd: SuiteData, quoted: list | None = None) -> list[tuple]:
    out = [("Leaderboard", pivot_table(sd))]
    if quoted:
        out.append((QUOTED_HEADING, quoted_table(quoted)))
    sweep = sweep_table(sd)
    if sweep is not None:
        out.append(("Hyperparameter sweeps", sweep))
    cost = cost_table(sd)
    if cost is not None:
        out.append(("Cost", cost))
    return out


_SECTION_NOTES = {  # {base}: the baseline quantizer's label (GPTQ)
    "Hyperparameter sweeps": "Avg (mean ± std over seeds, se) at each sweep point, next to the method's default "
    "setting and {base} in the same block; Δ in accuracy points. A point run on fewer seeds (its label says how many) "
    "is compared seed by seed with the runs on those seeds.",
    "Cost": "Medians over all merge methods, bit widths and seeds (default settings) of the quantize job's wall time "
    "and peak resident memory (Snakemake benchmark files where given), and the ratio to {base}'s median.",
    QUOTED_HEADING: "Published numbers, copied as given with their source; not produced by this workflow (their "
    "models, test sets, prompts and evaluation code may differ from ours), so they are context only and enter no Avg, "
    "mark, Δ or figure above. Avg is the source's own mean accuracy (%) over its tasks.",
}


def _section_note(name: str) -> str | None:
    note = _SECTION_NOTES.get(name)
    return None if note is None else note.replace("{base}", method_name(baseline_method()))


def markdown(
    suites: list[SuiteData], runs: list[dict], meta: dict | None, figure_paths: dict, anchors: dict | None = None
) -> str:
    """``figure_paths``: suite -> [(caption, path relative to the Markdown file)]; ``anchors``: suite -> checked
    quoted numbers (:func:`epmq.report.anchors.normalize_anchors`)."""
    anchors = anchors or {}
    title = (meta or {}).get("title") or DEFAULT_TITLE
    out = [f"# {title}", "", "Full data (one row per run, task and metric): [leaderboard.csv](leaderboard.csv).", ""]
    out += ["## Methodology", ""]
    out += [f"- **{label}**: {text}" for label, text in methodology(runs, quoted=any(anchors.values()))]
    for label, text, code in meta_items(meta) + data_items(runs):
        out.append(f"- **{label}**: `{text}`" if code else f"- **{label}**: {text}")
    for sd in suites:
        out += ["", f"## {sd.suite}", "", suite_summary(sd)]
        for name, table in _suite_tables(sd, anchors.get(sd.suite)):
            out += ["", f"### {name}", ""]
            note = _section_note(name)
            if note is not None:
                out += [note, ""]
            out.append(md_table(table))
        figs = figure_paths.get(sd.suite, [])
        if figs:
            out += ["", "### Figures", ""]
            out += [f"![{caption}]({path})" for caption, path in figs]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:90rem;padding:0 1rem;
color:#1b1b1b;line-height:1.45}
h1{font-size:1.6rem}h2{margin-top:2.2rem;border-bottom:1px solid #ccc;padding-bottom:.2rem}h3{margin-top:1.4rem}
table{border-collapse:collapse;margin:.6rem 0 1rem;font-size:.88rem}
th,td{border:1px solid #d0d0d0;padding:.25rem .55rem;vertical-align:top}
th{background:#f2f2f2;text-align:left}td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
tr.ref td{background:#fafafa;color:#333}tr.block td{border-top:2px solid #888}
td.best{background:#e8f5e9}.se{color:#666}.mark{color:#1b5e20;font-weight:bold}
ul.meta li{margin:.15rem 0}code{background:#f4f4f4;padding:0 .2rem;border-radius:3px}
figure{margin:1rem 0}figure svg{max-width:100%;height:auto}figcaption{color:#555;font-size:.9rem}
""".strip()
# added to the page only when it has quoted numbers (a page without them stays as it was)
_QUOTED_CSS = "table.quoted td{background:#fff8e1;font-style:italic}table.quoted th{background:#ffecb3}"


def _inline(text: str) -> str:
    """HTML-escape, then the three inline Markdown marks the header uses: **bold**, *italic*, `code`."""
    s = html.escape(text, quote=False)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"\*([^*]+)\*", r"<em>\1</em>", s)


def _html_cell(c) -> str:
    s = html.escape(c.text, quote=False)
    if c.strong and c.text:
        s = f"<strong>{s}</strong>"
    if c.se is not None:
        s += f' <span class="se">({html.escape(c.se)})</span>'
    if c.best:
        s += ' <span class="mark" title="best Avg among the quantized rows of this block">†</span>'
    classes = " ".join(x for x in ("num" if c.num else "", "best" if c.best else "") if x)
    return f'<td class="{classes}">{s}</td>' if classes else f"<td>{s}</td>"


def html_table(t: Table) -> str:
    lines = [
        f'<table class="{html.escape(t.css_class)}">' if t.css_class else "<table>",
        "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in t.headers) + "</tr></thead>",
        "<tbody>",
    ]
    for row, cls in zip(t.rows, t.row_classes):
        tr = f'<tr class="{cls}">' if cls else "<tr>"
        lines.append(tr + "".join(_html_cell(c) for c in row) + "</tr>")
    lines += ["</tbody>", "</table>"]
    return "\n".join(lines)


_ID_RE = re.compile(r'\bid="([^"]+)"')
_URL_RE = re.compile(r"url\(#([^)]+)\)")
_HREF_RE = re.compile(r'href="#([^"]+)"')


def inline_svg(svg: str, prefix: str) -> str:
    """An SVG file's markup for inlining into HTML: no XML prolog/doctype, every id prefixed (several figures in
    one page must not share ids)."""
    s = re.sub(r"<\?xml[^>]*\?>", "", svg)
    s = re.sub(r"<!DOCTYPE[^>]*>", "", s, flags=re.S)
    s = _ID_RE.sub(lambda m: f'id="{prefix}{m.group(1)}"', s)
    s = _URL_RE.sub(lambda m: f"url(#{prefix}{m.group(1)})", s)
    s = _HREF_RE.sub(lambda m: f'href="#{prefix}{m.group(1)}"', s)
    return s.strip()


def html_page(
    suites: list[SuiteData], runs: list[dict], meta: dict | None, figures: dict, anchors: dict | None = None
) -> str:
    """``figures``: suite -> [(caption, relative path, svg text)]; ``anchors`` as for :func:`markdown`."""
    anchors = anchors or {}
    quoted = any(anchors.values())
    title = (meta or {}).get("title") or DEFAULT_TITLE
    css = f"{_CSS}\n{_QUOTED_CSS}" if quoted else _CSS
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>\n{css}\n</style>",
        "</head>",
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
        '<p>Full data (one row per run, task and metric): <a href="leaderboard.csv" download>leaderboard.csv</a>.</p>',
        "<h2>Methodology</h2>",
        '<ul class="meta">',
    ]
    out += [
        f"<li><strong>{_inline(label)}</strong>: {_inline(text)}</li>"
        for label, text in methodology(runs, quoted=quoted)
    ]
    for label, text, code in meta_items(meta) + data_items(runs):
        val = f"<code>{html.escape(text, quote=False)}</code>" if code else html.escape(text, quote=False)
        out.append(f"<li><strong>{html.escape(label)}</strong>: {val}</li>")
    out.append("</ul>")
    n_fig = 0
    for sd in suites:
        out += [f"<h2>{html.escape(sd.suite)}</h2>", f"<p>{html.escape(suite_summary(sd))}</p>"]
        for name, table in _suite_tables(sd, anchors.get(sd.suite)):
            out.append(f"<h3>{html.escape(name)}</h3>")
            note = _section_note(name)
            if note is not None:
                out.append(f"<p>{html.escape(note)}</p>")
            out.append(html_table(table))
        figs = figures.get(sd.suite, [])
        if figs:
            out.append("<h3>Figures</h3>")
        for caption, path, svg in figs:
            n_fig += 1
            link = f'<a href="{html.escape(path)}">{html.escape(path)}</a>'
            out += [
                "<figure>",
                inline_svg(svg, f"fig{n_fig}-"),
                f"<figcaption>{html.escape(caption)} ({link})</figcaption>",
            ]
            out.append("</figure>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"
