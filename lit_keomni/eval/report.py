"""Reports of every ``eval`` task: ``REPORT.json`` (settings, per-item results, summary) and ``REPORT.md`` (a table in
the layout of the papers' tables), both written atomically."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lit_keomni.atomic import write_json, write_text


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
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


def read_jsonl(path: str | Path, fields: Sequence[str | tuple[str, ...]],
               files: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Records of a JSONL input file, one object per non-empty line, each holding every field of ``fields`` as a
    string. A tuple names one field and its accepted aliases (``("reference", "ref")``); the record then carries
    it under the first name. Fields named in ``files`` are paths of existing files, relative ones taken from the
    JSONL's folder; they come back absolute. Records without an ``"id"`` get ``"{file name}:{line}"``. Errors name
    the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such JSONL file")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            for field in fields:
                names = (field,) if isinstance(field, str) else field
                name = next((n for n in names if n in record), None)
                if name is None:
                    raise ValueError(f"{path}:{lineno}: missing field {' or '.join(map(repr, names))}")
                if not isinstance(record[name], str):
                    raise ValueError(f"{path}:{lineno}: field {name!r} must be a string, got {type(record[name]).__name__}")
                if name != names[0]:
                    record[names[0]] = record.pop(name)
            for field in files:
                file = path.parent / record[field]  # an absolute path stays as it is
                if not file.is_file():
                    raise FileNotFoundError(f"{path}:{lineno}: field {field!r}: no such file {file}")
                record[field] = str(file.resolve())
            record["id"] = str(record.get("id", f"{path.name}:{lineno}"))
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return records
