"""Reading contribution files: ``.txt`` and ``.md`` hold one contribution each, ``.jsonl`` one per line.

Each item is labelled with where it came from (``path`` or ``path:line``) so every rejection names
its source. Problems with a file (encoding, JSON, missing ``text`` field, unknown type) become
rejections, never exceptions, so one bad file does not stop the others.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = {".txt", ".md"}
JSONL_SUFFIX = ".jsonl"
FILE_BYTES_MAX = 256 * 1024 * 1024


@dataclass(frozen=True)
class SourceText:
    source: str
    text: str


@dataclass(frozen=True)
class Rejection:
    source: str
    reason: str


def read_contribution_files(paths: list[Path]) -> tuple[list[SourceText], list[Rejection]]:
    items: list[SourceText] = []
    rejected: list[Rejection] = []
    for path in paths:
        label = str(path)
        suffix = path.suffix.lower()
        if suffix not in TEXT_SUFFIXES and suffix != JSONL_SUFFIX:
            rejected.append(Rejection(label, f"unsupported file type '{suffix or path.name}' (use .txt, .md or .jsonl)"))
            continue
        try:
            if path.stat().st_size > FILE_BYTES_MAX:
                rejected.append(Rejection(label, f"file is larger than {FILE_BYTES_MAX} bytes"))
                continue
            raw = path.read_bytes()
        except OSError as exc:
            rejected.append(Rejection(label, f"cannot read file ({exc.strerror or exc})"))
            continue
        try:
            content = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            rejected.append(Rejection(label, f"not valid UTF-8 (byte {exc.start})"))
            continue
        if suffix in TEXT_SUFFIXES:
            items.append(SourceText(label, content.removeprefix("\ufeff")))
            continue
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{label}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                rejected.append(Rejection(where, f"not valid JSON ({exc.msg})"))
                continue
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                rejected.append(Rejection(where, "a JSON line needs a string field 'text'"))
                continue
            items.append(SourceText(where, text))
    return items, rejected
