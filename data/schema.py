"""Records (DESIGN.md, "Records") and their JSONL reading and writing, with validation.

One JSON object per line:
    {"id": str, "query": str, "note": {"title": str, "content": str, "tags": [str], <other str fields>},
     "label": int in -1..3, "query_extra": {...}?, "note_extra": {...}?, "gold": {...}?, "reasoning": str?}
Gold's score keys (initial, calibrated, final), when present, are ints in -1..3; other gold keys are free.

Reading reports every bad line with file, line number and reason (up to 20, then a count) and raises; nothing
is silently dropped or coerced (an int label written as 2.0 or "2" is an error, as is a bool). Writing is atomic:
a temporary file in the same folder, then a rename, so a crash never leaves a truncated file.
"""

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

LABELS = (-1, 0, 1, 2, 3)
_TOP_KEYS = {"id", "query", "note", "label", "query_extra", "note_extra", "gold", "reasoning"}
_GOLD_SCORES = ("initial", "calibrated", "final")


class RecordError(ValueError):
    """One or more bad records; the message lists `file:line: reason` for each."""


@dataclass
class Record:
    id: str
    query: str
    note: dict  # title, content, tags, and optional extra string fields
    label: int
    query_extra: dict = field(default_factory=dict)
    note_extra: dict = field(default_factory=dict)
    gold: dict | None = None
    reasoning: str | None = None

    def to_json(self) -> dict:
        out = asdict(self)
        return {k: v for k, v in out.items() if v is not None}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate(obj) -> Record:
    """A Record from a decoded JSON value, or ValueError with the reason."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}")
    for key in ("id", "query", "note", "label"):
        if key not in obj:
            raise ValueError(f"missing field {key!r}")
    if not isinstance(obj["id"], str) or not obj["id"]:
        raise ValueError("'id' must be a non-empty string")
    if not isinstance(obj["query"], str) or not obj["query"].strip():
        raise ValueError("'query' must be a non-empty string")
    note = obj["note"]
    if not isinstance(note, dict):
        raise ValueError("'note' must be an object")
    for key in ("title", "content"):
        if not isinstance(note.get(key), str):
            raise ValueError(f"'note.{key}' must be a string")
    if not isinstance(note.get("tags"), list) or not all(isinstance(t, str) for t in note["tags"]):
        raise ValueError("'note.tags' must be a list of strings")
    for key, value in note.items():
        if key not in ("title", "content", "tags") and not isinstance(value, str):
            raise ValueError(f"'note.{key}' must be a string (extra note fields are strings)")
    if not _is_int(obj["label"]) or obj["label"] not in LABELS:
        raise ValueError(f"'label' must be an integer in -1..3, got {obj['label']!r}")
    for key in ("query_extra", "note_extra"):
        if key in obj and not isinstance(obj[key], dict):
            raise ValueError(f"'{key}' must be an object")
    gold = obj.get("gold")
    if gold is not None:
        if not isinstance(gold, dict):
            raise ValueError("'gold' must be an object")
        for key in _GOLD_SCORES:
            if key in gold and (not _is_int(gold[key]) or gold[key] not in LABELS):
                raise ValueError(f"'gold.{key}' must be an integer in -1..3, got {gold[key]!r}")
    if "reasoning" in obj and not isinstance(obj["reasoning"], str):
        raise ValueError("'reasoning' must be a string")
    return Record(
        id=obj["id"],
        query=obj["query"],
        note=note,
        label=obj["label"],
        query_extra=obj.get("query_extra", {}),
        note_extra=obj.get("note_extra", {}),
        gold=gold,
        reasoning=obj.get("reasoning"),
    )


def read_jsonl(path: str | Path) -> list[Record]:
    """All records of a JSONL file; RecordError listing every bad line (file:line: reason) if any is bad."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordError(f"{path}: cannot read: {exc}") from None
    records, errors, seen = [], [], {}
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it is not an empty record
    for lineno, line in enumerate(lines, 1):
        try:
            if not line.strip():
                raise ValueError("empty line")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
            record = validate(obj)
            if record.id in seen:
                raise ValueError(f"duplicate id {record.id!r} (first on line {seen[record.id]})")
            seen[record.id] = lineno
            records.append(record)
        except ValueError as exc:
            errors.append(f"{path}:{lineno}: {exc}")
    if errors:
        shown = errors[:20] + ([f"... and {len(errors) - 20} more bad lines"] if len(errors) > 20 else [])
        raise RecordError("\n".join(shown))
    return records


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: str | Path, records: list[Record]) -> None:
    """Validate every record, then write them atomically, one JSON object per line."""
    lines = []
    for i, record in enumerate(records):
        obj = record.to_json()
        try:
            validate(obj)
        except ValueError as exc:
            raise RecordError(f"record {i} ({obj.get('id')!r}) is invalid: {exc}") from None
        lines.append(json.dumps(obj, ensure_ascii=False, sort_keys=True))
    write_text_atomic(path, "".join(line + "\n" for line in lines))
