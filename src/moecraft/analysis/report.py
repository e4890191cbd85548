"""One self-contained HTML report: PNGs embedded as base64 data URIs next to tables of the numbers."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path


def image_html(path: Path, alt: str = "") -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt or Path(path).stem)}" src="data:image/png;base64,{data}">'


def table_html(headers: Sequence[str], rows: Sequence[Sequence], caption: str | None = None) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def section(title: str, *parts: str, note: str | None = None) -> str:
    p = f"<p>{html.escape(note)}</p>" if note else ""
    return f"<section><h2>{html.escape(title)}</h2>{p}{''.join(parts)}</section>"


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}caption{font-weight:bold;text-align:left}"
    "img{max-width:100%;border:1px solid #eee;margin:.5em 0}section{margin-bottom:2em}.meta{color:#666}"
)


def write_report(path: Path, title: str, sections: Sequence[str], meta: str | None = None) -> Path:
    """Write the page; every image is inlined, so the one file can be mailed or archived alone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = f'<p class="meta">{html.escape(meta)}</p>' if meta else ""
    path.write_text(
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{m}{''.join(sections)}</body></html>\n",
        encoding="utf-8",
    )
    return path
