"""Records (DESIGN.md, "Records") and their JSONL reading and writing, with validation.

One JSON object per line:
    {"id": str, "query": str, "note": {"title": str, "content": str, "tags": [str]?, <other str fields>},
     "label": int in -1..3, "query_extra": {...}?, "note_extra": {...}?, "gold": {...}?, "reasoning": str?}
Gold's score keys (initial, calibrated, final), when present, are ints in -1..3; other gold keys are free.

Reading checks every line and raises one RecordError whose message is one line: how many lines are bad, the first
one's file, line number and reason, and the numbers of the others. Nothing is silently dropped or coerced (an int
label written as 2.0 or "2" is an error, as is a bool, a duplicate key in an object, or bytes that are not UTF-8).
Lines are read one at a time and refused past MAX_LINE_BYTES, so a huge line costs neither the memory nor the time
of parsing it. `note.tags` may be left out (it reads as an empty list). Writing is atomic: a temporary file in the
same folder, then a rename, so a crash never leaves a truncated file; the file gets the permissions a plain `open`
would give it (the process umask), so results on a shared file system stay readable to the team.
"""

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sam.prompt import LABELS

_TOP_KEYS = {"id", "query", "note", "label", "query_extra", "note_extra", "gold", "reasoning"}
_GOLD_SCORES = ("initial", "calibrated", "final")
MAX_LINE_BYTES = 8 << 20  # one record; a note is text, 8 MiB is far beyond any real one


class RecordError(ValueError):
    """One or more bad records; the message lists `file:line: reason` for each."""


@dataclass
class Record:
    id: str
    query: str
    note: dict  # title, content, tags (optional in the file, [] when absent), and optional extra string fields
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
    if "tags" in note and (not isinstance(note["tags"], list) or not all(isinstance(t, str) for t in note["tags"])):
        raise ValueError("'note.tags', when present, must be a list of strings")
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
        note=note if "tags" in note else {**note, "tags": []},
        label=obj["label"],
        query_extra=obj.get("query_extra", {}),
        note_extra=obj.get("note_extra", {}),
        gold=gold,
        reasoning=obj.get("reasoning"),
    )


def _unique_keys(pairs: list) -> dict:
    """json's object hook: a key given twice in one object is an error (json itself keeps the last value)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r} in one object")
        out[key] = value
    return out


def _lines(f, limit: int):
    """(line number, bytes without the newline, or None when the line is longer than `limit` bytes) of a binary
    file, reading at most `limit` + 1 bytes at a time: an over-long line is skipped without being held in memory."""
    lineno = 0
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # the rest of the line, one bounded piece at a time
                raw = f.readline(limit + 1)
            yield lineno, None
            continue
        yield lineno, raw[:-1] if raw.endswith(b"\n") else raw


def _decode(raw: bytes | None) -> str:
    if raw is None:
        raise ValueError(f"line longer than {MAX_LINE_BYTES >> 20} MiB (MAX_LINE_BYTES); not read")
    if b"\r" in raw.rstrip(b"\r"):  # JSON escapes a carriage return inside strings: a raw one is a line break
        raise ValueError("lines end with a bare carriage return (CR); convert the file to LF or CRLF line endings")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"not valid UTF-8 (byte {exc.start + 1} of the line: {raw[exc.start : exc.start + 1]!r})"
        ) from None


def read_jsonl(path: str | Path) -> list[Record]:
    """All records of a JSONL file; RecordError (one line: the count, the first bad line's file:line: reason, the
    other bad line numbers) if any line is bad."""
    path = Path(path)
    records, errors, seen = [], [], {}
    try:
        with path.open("rb") as f:
            for lineno, raw in _lines(f, MAX_LINE_BYTES):
                try:
                    line = _decode(raw)
                    if not line.strip():
                        raise ValueError("empty line")
                    try:
                        obj = json.loads(line, object_pairs_hook=_unique_keys)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
                    record = validate(obj)
                    if record.id in seen:
                        raise ValueError(f"duplicate id {record.id!r} (first on line {seen[record.id]})")
                    seen[record.id] = lineno
                    records.append(record)
                except ValueError as exc:
                    errors.append((lineno, str(exc)))
    except OSError as exc:
        raise RecordError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if errors:
        (lineno, reason), rest = errors[0], [n for n, _ in errors[1:]]
        others = ""
        if rest:
            shown = ", ".join(map(str, rest[:10])) + (f" and {len(rest) - 10} more" if len(rest) > 10 else "")
            others = f"; other bad lines: {shown}"
        raise RecordError(f"{path}: {len(errors)} bad line(s); the first: {path}:{lineno}: {reason}{others}")
    return records


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes the file private (0600); give it what open() would
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_mode() -> int:
    """The permissions `open()` gives a new file in this process (0o666 less the umask)."""
    try:  # Linux reports the umask without changing it
        with open("/proc/self/status", encoding="ascii") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)  # elsewhere the only way to read it is to set it; put it back at once
        os.umask(mask)
    return 0o666 & ~mask


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
