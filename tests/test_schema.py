"""data/schema.py: validation with file and line, atomic writes."""

import json

import pytest

from data.schema import Record, RecordError, read_jsonl, write_jsonl


def good(**over):
    obj = {"id": "r1", "query": "vegan ramen", "note": {"title": "t", "content": "c", "tags": ["food"]}, "label": 2}
    obj.update(over)
    return obj


def write_lines(path, objs):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs), encoding="utf-8")


def test_round_trip(tmp_path):
    records = [
        Record("a", "q", {"title": "t", "content": "c", "tags": [], "ocr": "text"}, -1),
        Record(
            "b",
            "q2",
            {"title": "", "content": "c", "tags": ["x"]},
            3,
            {"category": "food"},
            {"author": "A"},
            {"initial": 3, "calibrated": 2, "hits": ["q2"]},
            "Step 1: ...",
        ),
    ]
    write_jsonl(tmp_path / "x.jsonl", records)
    assert read_jsonl(tmp_path / "x.jsonl") == records


TWICE = '{"id": "a", "id": "b", "query": "q", "note": {"title": "t", "content": "c"}, "label": 1}'


@pytest.mark.parametrize(
    "line,reason",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (good(label=4), "'label' must be an integer in -1..3"),
        (good(label=2.0), "'label' must be an integer"),
        (good(label="2"), "'label' must be an integer"),
        (good(label=True), "'label' must be an integer"),
        ({k: v for k, v in good().items() if k != "query"}, "missing field 'query'"),
        (good(note={"title": "t", "content": "c", "tags": "food"}), "note.tags"),
        (TWICE, "duplicate key 'id'"),
        (good(note={"title": "t", "content": 3, "tags": []}), "note.content"),
        (good(note={"title": "t", "content": "c", "tags": [], "ocr": 5}), "note.ocr"),
        (good(gold={"initial": 7}), "gold.initial"),
        (good(extra=1), "unknown field"),
        (good(id=""), "'id' must be"),
        ("", "empty line"),
    ],
)
def test_bad_line_names_file_line_and_reason(tmp_path, line, reason):
    path = tmp_path / "bad.jsonl"
    write_lines(path, [good(id="ok1"), line, good(id="ok2")])
    with pytest.raises(RecordError) as exc:
        read_jsonl(path)
    message = str(exc.value)
    assert f"{path}:2:" in message and reason in message
    assert "ok1" not in message  # only the bad line is reported


def test_duplicate_ids_and_every_bad_line_counted_in_one_line(tmp_path):
    path = tmp_path / "dup.jsonl"
    write_lines(path, [good(), good(), good(id="x", label=9)])
    message = str(pytest.raises(RecordError, read_jsonl, path).value)
    assert (
        message
        == f"{path}: 2 bad line(s); the first: {path}:2: duplicate id 'r1' (first on line 1); other bad lines: 3"
    )


def test_many_bad_lines_are_one_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    write_lines(path, [good(id="ok")] + ["{oops"] * 32)
    message = str(pytest.raises(RecordError, read_jsonl, path).value)
    assert "\n" not in message and message.startswith(f"{path}: 32 bad line(s); the first: {path}:2: not valid JSON")
    assert message.endswith("other bad lines: 3, 4, 5, 6, 7, 8, 9, 10, 11, 12 and 21 more")


def test_line_endings(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes((json.dumps(good(id="a")) + "\r\n" + json.dumps(good(id="b"))).encode())  # CRLF, no final one
    assert [r.id for r in read_jsonl(path)] == ["a", "b"]
    path.write_bytes((json.dumps(good(id="a")) + "\r" + json.dumps(good(id="b")) + "\r").encode())  # old Mac: CR only
    message = str(pytest.raises(RecordError, read_jsonl, path).value)
    assert "bare carriage return" in message


def test_tags_are_optional(tmp_path):
    path = tmp_path / "x.jsonl"
    write_lines(path, [good(note={"title": "t", "content": "c"})])
    assert read_jsonl(path)[0].note == {"title": "t", "content": "c", "tags": []}


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(
        json.dumps(good(id="a")).encode() + b"\n" + json.dumps(good(id="b")).encode()[:20] + b"\xff\xfe}\n"
    )
    message = str(pytest.raises(RecordError, read_jsonl, path).value)
    assert f"{path}:2: not valid UTF-8 (byte 21 of the line" in message


def test_a_huge_line_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    import data.schema as schema

    monkeypatch.setattr(schema, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "x.jsonl"
    huge = json.dumps(good(id="big", query="q" * 5000))
    write_lines(path, [good(id="a"), huge, good(id="c")])
    message = str(pytest.raises(RecordError, read_jsonl, path).value)
    assert message.startswith(f"{path}: 1 bad line(s); the first: {path}:2: line longer than")
    write_lines(path, [good(id="a"), good(id="c")])  # a line just under the limit is read
    assert [r.id for r in read_jsonl(path)] == ["a", "c"]


def test_written_files_follow_the_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        write_jsonl(tmp_path / "out.jsonl", [Record("a", "q", {"title": "t", "content": "c", "tags": []}, 1)])
    finally:
        os.umask(old)
    assert (tmp_path / "out.jsonl").stat().st_mode & 0o777 == 0o644  # mkstemp alone gives 0o600


def test_write_is_atomic_and_validates(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [Record("a", "q", {"title": "t", "content": "c", "tags": []}, 1)])
    before = path.read_bytes()
    with pytest.raises(RecordError, match="record 1"):
        write_jsonl(
            path,
            [
                Record("a", "q", {"title": "t", "content": "c", "tags": []}, 1),
                Record("b", "q", {"title": "t", "content": "c", "tags": []}, 5),
            ],
        )
    assert path.read_bytes() == before  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temporary left behind


def test_missing_file(tmp_path):
    with pytest.raises(RecordError, match="cannot read"):
        read_jsonl(tmp_path / "nope.jsonl")
