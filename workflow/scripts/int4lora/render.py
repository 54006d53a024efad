"""Report building blocks rendered twice: to Markdown (code hosts) and to one self-contained
HTML page (colour-coded verdicts, full names on hover, anchors, folded and sortable tables).
Number formats live here too: units in headers, no scientific notation."""
from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field

from .summary import missing

DASH = "–"


# --------------------------------------------------------------------------- numbers

def plain(v, digits: int = 3, strip: bool = True) -> str:
    """A number without scientific notation: thousands separators from 1,000 up, about
    `digits` significant digits below (0.0001, 0.132, 3.79, 37.9, 379)."""
    if missing(v):
        return DASH
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if v == 0:
        return "0"
    if abs(v) >= 1000 or float(v).is_integer():
        return f"{v:,.0f}"
    decimals = max(digits - 1 - math.floor(math.log10(abs(v))), 0)
    text = f"{v:,.{min(decimals, 12)}f}"
    return text.rstrip("0").rstrip(".") if strip and "." in text else text


def ms(seconds) -> str:
    return DASH if missing(seconds) else plain(seconds * 1e3, 3, strip=False)


def tok_s(v) -> str:
    if missing(v):
        return DASH
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.1f}"


def gib(n_bytes) -> str:
    return DASH if missing(n_bytes) else f"{n_bytes / 2**30:,.2f}"


def mib(n_bytes) -> str:
    return DASH if missing(n_bytes) else f"{n_bytes / 2**20:,.1f}"


def pct(fraction, digits: int = 1) -> str:
    return DASH if missing(fraction) else f"{fraction * 100:.{digits}f}%"


def overhead(ratio) -> str:
    """A TPOT ratio as the overhead it means: 1.46 -> +46%."""
    return DASH if missing(ratio) else f"{(ratio - 1) * 100:+.0f}%"


def overhead_ci(ratio, low=None, high=None) -> str:
    """An overhead with its CI: 1.08, 1.05, 1.12 -> "+8% [+5%, +12%]" (no bracket without both
    bounds)."""
    text = overhead(ratio)
    if missing(ratio) or missing(low) or missing(high):
        return text
    return f"{text} [{overhead(low)}, {overhead(high)}]"


# --------------------------------------------------------------------------- blocks

@dataclass
class Cell:
    text: str
    title: str | None = None      # full text on hover
    href: str | None = None       # anchor of the row a number comes from
    cls: str | None = None        # pass / fail / unval / notrun / num
    sort: float | str | None = None
    md_note: str | None = None    # said in words where Markdown has no colour


@dataclass
class Table:
    headers: list[str]
    rows: list[tuple[str | None, list[Cell]]]   # (row id, cells)
    fold: str | None = None        # summary line of a <details>; None shows it open
    id: str | None = None
    cls: str = "data"
    header_titles: dict = field(default_factory=dict)


@dataclass
class Block:
    kind: str                      # h1 h2 h3 p ul figure raw
    text: str = ""
    items: list = field(default_factory=list)
    id: str | None = None
    src: str | None = None


STATUS_CLASS = {"PASS": "pass", "FAIL": "fail", "FAIL: do not trust": "fail",
                "unvalidated": "unval", "N/A": "notrun", "missing": "notrun",
                "not run": "notrun", "oom": "fail", "error": "fail", "unsupported": "notrun"}


def status_cell(value, title: str | None = None, href: str | None = None) -> Cell:
    text = DASH if missing(value) else str(value)
    return Cell(text, title=title, href=href, cls=STATUS_CLASS.get(text))


def short(text, width: int = 40, code: bool = False) -> Cell:
    """A long name cut to `width` characters; the full name on hover."""
    if missing(text):
        return Cell(DASH)
    text = str(text)
    cut = text if len(text) <= width else text[:width - 1] + "…"
    return Cell(cut, title=text if cut != text else None, cls="code" if code else None)


def num(text: str, value=None, href: str | None = None, title: str | None = None,
        cls: str = "num") -> Cell:
    return Cell(text, title=title, href=href, cls=cls,
                sort=None if missing(value) else float(value))


# --------------------------------------------------------------------------- Markdown

def _md_cell(c: Cell) -> str:
    text = c.text.replace("|", "/")
    if c.cls == "code":  # kernel names hold <...> that a Markdown renderer would eat
        text = "`" + text.replace("`", "'") + "`"
    text = f"[{text}](#{c.href})" if c.href else text
    return f"{text} ({c.md_note})" if c.md_note else text


def md_table(t: Table) -> str:
    if not t.rows:
        return "_none_\n"
    lines = ["| " + " | ".join(t.headers) + " |", "|" + "---|" * len(t.headers)]
    for row_id, cells in t.rows:
        texts = [_md_cell(c) for c in cells]
        if row_id:
            texts[0] = f'<a id="{row_id}"></a>{texts[0]}'
        lines.append("| " + " | ".join(texts) + " |")
    body = "\n".join(lines) + "\n"
    if t.fold:
        return f"<details><summary>{html.escape(t.fold)}</summary>\n\n{body}\n</details>\n"
    return body


def _render(blocks: list[Block | Table], table, kinds: dict) -> list[str]:
    """Each block through its kind's renderer (headings share one: "h"); a kind with no
    renderer (or whose renderer returns None) is left out."""
    out = []
    for b in blocks:
        if isinstance(b, Table):
            out.append(table(b))
            continue
        text = kinds.get("h" if b.kind in ("h1", "h2", "h3") else b.kind, lambda _: None)(b)
        if text is not None:
            out.append(text)
    return out


MARKDOWN = {
    "h": lambda b: "#" * int(b.kind[1]) + " " + b.text + "\n",
    "p": lambda b: b.text + "\n",
    "ul": lambda b: "\n".join(f"- {item}" for item in b.items) + "\n",
    "figure": lambda b: f"![{b.id}](../figures/{b.src})\n\n_{b.text}_\n",
}


def to_markdown(blocks: list[Block | Table]) -> str:
    return "\n".join(_render(blocks, md_table, MARKDOWN))


# --------------------------------------------------------------------------- HTML

def inline_html(text: str) -> str:
    """The inline Markdown the report writes (**bold**, `code`, [text](#anchor)) as HTML."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"\[([^\]]+)\]\(#([^)\s]+)\)", r'<a href="#\2">\1</a>', out)


def _html_cell(c: Cell, tag: str = "td") -> str:
    attrs = ""
    if c.cls:
        attrs += f' class="{c.cls}"'
    if c.title:
        attrs += f' title="{html.escape(c.title)}"'
    if c.sort is not None:
        attrs += f' data-sort="{c.sort}"'
    text = html.escape(c.text, quote=False)
    if c.href:
        text = f'<a href="#{html.escape(c.href)}">{text}</a>'
    return f"<{tag}{attrs}>{text}</{tag}>"


def html_table(t: Table) -> str:
    if not t.rows:
        return "<p><em>none</em></p>"
    head = "".join(_html_cell(Cell(h, title=t.header_titles.get(h)), "th") for h in t.headers)
    body = []
    for row_id, cells in t.rows:
        rid = f' id="{html.escape(row_id)}"' if row_id else ""
        body.append(f"<tr{rid}>" + "".join(_html_cell(c) for c in cells) + "</tr>")
    tid = f' id="{t.id}"' if t.id else ""
    table = (f'<table class="{t.cls}"{tid}><thead><tr>{head}</tr></thead>'
             f"<tbody>{''.join(body)}</tbody></table>")
    if t.fold:
        return f"<details><summary>{html.escape(t.fold)}</summary>{table}</details>"
    return table


def _html_heading(b: Block) -> str:
    bid = f' id="{b.id}"' if b.id else ""
    return f"<{b.kind}{bid}>{inline_html(b.text)}</{b.kind}>"


def _html_list(b: Block) -> str:
    cls = f' class="{b.id}"' if b.id else ""
    return f"<ul{cls}>" + "".join(f"<li>{inline_html(i)}</li>" for i in b.items) + "</ul>"


def to_html(blocks: list[Block | Table], images: dict[str, str]) -> str:
    """The body; `images` maps a figure file name to its data: URI (a figure without one is
    left out)."""
    kinds = {
        "h": _html_heading, "p": lambda b: f"<p>{inline_html(b.text)}</p>", "ul": _html_list,
        "figure": lambda b: (f'<figure id="fig-{b.id}"><img alt="{b.id}" src="{images[b.src]}">'
                             f"<figcaption>{inline_html(b.text)}</figcaption></figure>")
        if b.src in images else None,
        "raw": lambda b: b.text,
    }
    return "\n".join(_render(blocks, html_table, kinds))


STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;font-size:14px;line-height:1.35;
 max-width:1360px;margin:0 auto;padding:4px 16px;color:#222}
h1{font-size:20px;margin:6px 0 2px}h2{font-size:17px;margin:22px 0 6px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:14px 0 4px}p{margin:4px 0}
.run{color:#555;font-size:12.5px}.caveat{color:#a31515;font-size:12.5px}
ul.headlines{margin:6px 0 8px;padding-left:20px}ul.headlines li{margin:2px 0}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0;max-width:100%}
td,th{border:1px solid #d6d6d6;padding:2px 6px;vertical-align:top;overflow-wrap:break-word}
table.summary{width:100%}table.summary td{white-space:nowrap}
th{background:#f3f3f3;text-align:left;font-weight:600}
table.sortable th{cursor:pointer}
td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
td.code{font-family:ui-monospace,monospace;font-size:11.5px}
.pass{background:#dff3df;color:#155d18}.fail{background:#fbe0e0;color:#a31515;font-weight:600}
.unval{background:#fff2cc;color:#6b4e00}.notrun{background:#ececec;color:#555}
td a{color:inherit}tr:target{outline:2px solid #f28c00}
details{margin:6px 0}summary{cursor:pointer;color:#0b4f9c}
figure{margin:8px 0}img{max-width:100%;border:1px solid #eee}figcaption{font-size:12.5px;color:#444}
dl.glossary dt{font-weight:600;margin-top:4px}dl.glossary dd{margin-left:16px}
"""

# open the <details> around an anchored row and show it; click a header to sort its column
SCRIPT = """
function reveal(){var e=document.getElementById(decodeURIComponent(location.hash.slice(1)));
 if(!e)return;for(var p=e.parentElement;p;p=p.parentElement){if(p.tagName==='DETAILS')p.open=true;}
 e.scrollIntoView({block:'center'});}
window.addEventListener('hashchange',reveal);window.addEventListener('load',reveal);
document.querySelectorAll('table.sortable th').forEach(function(th,i){th.addEventListener('click',
 function(){var tb=th.closest('table').tBodies[0],rows=[].slice.call(tb.rows),k=th.cellIndex,
 up=th.dataset.dir!=='up';th.dataset.dir=up?'up':'down';rows.sort(function(a,b){
 var x=a.cells[k],y=b.cells[k],u=x.dataset.sort,v=y.dataset.sort;
 var r=(u!==undefined&&v!==undefined)?u-v:x.textContent.localeCompare(y.textContent);
 return up?r:-r;});rows.forEach(function(r){tb.appendChild(r);});});});
"""


def page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width'><title>{html.escape(title)}"
            f"</title><style>{STYLE}</style></head><body>\n{body}\n<script>{SCRIPT}</script>"
            f"</body></html>\n")
