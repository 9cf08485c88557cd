"""Reports of every ``eval`` task: ``REPORT.json`` (settings, per-item results, summary) and ``REPORT.md`` (a table in
the layout of the papers' tables), both written atomically."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lit_keomni.atomic import write_json, write_text


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of ``rows`` (dicts) with ``columns`` (default: the keys of the first row, in order)."""
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(out: str | Path, task: str, summary: Sequence[Mapping[str, Any]], *, settings: Mapping[str, Any],
                 items: Sequence[Mapping[str, Any]] = (), columns: Sequence[str] | None = None,
                 title: str | None = None, notes: str = "") -> tuple[Path, Path]:
    """Write ``out/{task}.json`` and ``out/{task}.md``; ``summary`` rows make the table (one row per model/setting),
    ``items`` the per-example results kept in the JSON. Returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{task}.json", out / f"{task}.md"
    write_json(json_path, {"task": task, "settings": dict(settings), "summary": [dict(r) for r in summary],
                           "items": [dict(i) for i in items]})
    md = f"# {title or task}\n\n" + markdown_table(summary, columns)
    if notes:
        md += f"\n{notes.strip()}\n"
    write_text(md_path, md)
    return json_path, md_path
