"""A :class:`~para_fx.inspect.report.Report` as one self-contained HTML page (no scripts, no external assets).

The page opens with what was explained (model, mesh, inputs, versions) and the verdict, then the
report's tables, then every compiled graph pass by pass: one line per node,
coloured by its placement (replicated, sharded, partial) with collectives highlighted, and the
diff to the pass before. Open it in any browser; it renders without a network.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

from .dump import NodeRow
from ..core.placement import PLACEMENT_LEGEND

if TYPE_CHECKING:
    from .report import Report  # the report renders itself with this module

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.3em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; vertical-align: top; }
th { background: #eee; }
td.none { color: #888; font-style: italic; }
pre { font-size: 0.8em; line-height: 1.35; background: #fafafa; padding: 0.5em; overflow-x: auto; }
summary { cursor: pointer; margin: 0.3em 0; }
.legend span { padding: 0.1em 0.5em; margin-right: 0.5em; }
.pr { color: #555; }
.ps { background: #dcefff; }
.pp { background: #fff1d6; }
.coll { background: #ffd0d0; font-weight: bold; }
.add { background: #e3f7e3; }
.context { color: #444; margin: 0.2em 0; }
.verdict { border: 2px solid #888; background: #fffbe6; padding: 0.4em 1em; margin: 0.5em 0 1.5em; }
.verdict p { margin: 0.3em 0; }
.verdict ol li { margin-bottom: 0.5em; }
.del { background: #fbe3e3; }
"""


def render_report(report: Report) -> str:
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8"><title>para-fx report</title>',
        f"<style>{_STYLE}</style></head><body>",
        "<h1>para-fx report</h1>",
    ]
    if report.context is not None:
        parts += [f'<p class="context">{_e(line)}</p>' for line in report.context.lines()]
    parts.append(_verdict(report))
    for table in report.tables():
        if table.title == "verdict":
            continue
        parts.append(f"<h2>{_e(table.title)}</h2>")
        parts.append(_table(table.header, table.rows))
        if table.title.startswith("attention sites") and table.rows:
            parts.append(f'<p class="legend">{_e(PLACEMENT_LEGEND)}</p>')
    if report.graph_count > 1:
        parts.append(
            f"<p>Dynamo split the model into {report.graph_count} graphs; code between graphs "
            "(attention included) runs unsharded on full tensors.</p>"
        )
    if report.notes:
        parts.append("<h2>notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in report.notes) + "</ul>")
    parts += [
        "<h2>graphs, pass by pass</h2>",
        '<p class="legend">placement: <span class="pr">R replicated</span><span class="ps">S(dim) sharded</span>'
        '<span class="pp">P(op) partial</span><span class="coll">collective</span></p>',
    ]
    sequence = report.pass_sequence()
    for i, (key, step, before) in enumerate(sequence):
        collectives = sum(r.collective for r in step.rows)
        last = i + 1 == len(sequence) or sequence[i + 1][2] is None  # a graph's final pass starts unfolded
        parts.append(
            f"<details{' open' if last else ''}><summary><b>{_e(key)}</b>: {len(step.rows)} nodes, {collectives} collectives</summary>"
            f'<pre class="graph">{"".join(_node(r) for r in step.rows)}</pre>'
        )
        if before is not None:
            parts.append(
                f"<details><summary>diff from {_e(before)}</summary>"
                f'<pre class="diff">{_diff(report.graph_diff(before, key))}</pre></details>'
            )
        parts.append("</details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _verdict(report: Report) -> str:
    """The verdict in a box: the headline, one list item per cause (source line, advice), then the rest."""
    headline, causes, after = report.verdict_parts()
    items = "".join("<li>" + "<br>".join(_e(line) for line in cause.lines()) + "</li>" for cause in causes)
    causes_html = f"<p>what keeps work whole on every rank, costliest first:</p><ol>{items}</ol>" if causes else ""
    rest = "".join(f"<p>{_e(line)}</p>" for line in after)
    return f'<div class="verdict"><h2>verdict</h2><p><b>{_e(headline)}</b></p>{causes_html}{rest}</div>'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = f"<tr>{''.join(f'<th>{_e(h)}</th>' for h in header)}</tr>" if header else ""
    if not rows:
        return f'<table>{head}<tr><td class="none" colspan="{max(len(header), 1)}">none</td></tr></table>'
    body = "".join("<tr>" + "".join(f"<td>{_e(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _node(row: NodeRow) -> str:
    classes = ["coll"] if row.collective else []
    kind = row.placement.lstrip("[")[:1]
    if kind in ("R", "S", "P"):
        classes.append(f"p{kind.lower()}")
    attr = f' class="{" ".join(classes)}"' if classes else ""
    return f"<span{attr}>{_e(row.line())}</span>\n"


def _diff(text: str) -> str:
    out = []
    for line in text.splitlines():
        added, removed = line.startswith("+") and not line.startswith("+++"), line.startswith("-") and not line.startswith("---")
        cls = "add" if added else "del" if removed else ""
        out.append(f'<span class="{cls}">{_e(line)}</span>' if cls else _e(line))
    return "\n".join(out)


def _e(text: str) -> str:
    return html.escape(text, quote=True)
