"""The manifest of finished units: an append-only log that survives crashes and stays cheap per unit."""

from __future__ import annotations

import json

from minemap.manifest import COMPACT_SLACK, Manifest


def test_marks_persist_and_last_fingerprint_wins(tmp_path):
    m = Manifest(tmp_path / "m.jsonl")
    m.mark("2019/a", "f1")
    m.mark("2019/b", "f1")
    m.mark("2019/a", "f2")
    again = Manifest(tmp_path / "m.jsonl")
    assert again.done("2019/a", "f2") and not again.done("2019/a", "f1")
    assert again.done("2019/b", "f1") and len(again) == 2
    # one line per mark: recording a unit appends, it never rewrites what is there
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 3


def test_torn_last_line_loses_only_that_unit(tmp_path):
    path = tmp_path / "m.jsonl"
    m = Manifest(path)
    m.mark("2019/a", "f")
    m.mark("2019/b", "f")
    with open(path, "ab") as f:  # a run killed while writing its third record
        f.write(b'{"key":"2019/c","f')
    resumed = Manifest(path)
    assert resumed.done("2019/a", "f") and resumed.done("2019/b", "f") and not resumed.done("2019/c", "f")
    resumed.mark("2019/c", "f")  # starts a fresh line, so the torn one does not swallow it
    assert Manifest(path).done("2019/c", "f")
    assert json.loads(path.read_text().splitlines()[-1]) == {"key": "2019/c", "fp": "f"}


def test_forget_a_prefix_or_everything(tmp_path):
    path = tmp_path / "m.jsonl"
    m = Manifest(path)
    for k in ("stage:a", "stage:b", "started:a"):
        m.mark(k, "f")
    m.forget("stage:")
    assert not Manifest(path).done("stage:a", "f") and Manifest(path).done("started:a", "f")
    m.mark("stage:a", "g")  # a key forgotten then marked again is finished again
    assert Manifest(path).done("stage:a", "g")
    m.forget()
    assert len(Manifest(path)) == 0 and path.read_text() == ""


def test_a_long_log_is_compacted_on_opening(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [json.dumps({"key": f"k{i % 10}", "fp": str(i)}) for i in range(COMPACT_SLACK + 100)]
    path.write_text("\n".join(lines) + "\n")
    m = Manifest(path)
    assert len(m) == 10 and m.done("k9", str(COMPACT_SLACK + 99))
    assert len(path.read_text().splitlines()) == 10  # rewritten to one line per key
    assert Manifest(path).done("k9", str(COMPACT_SLACK + 99))
