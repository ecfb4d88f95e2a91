"""Atomic writes: strict JSON, orphaned temporary files removed."""

from __future__ import annotations

import json

from gigapatch.core.files import remove_orphans, write_json


def test_json_is_strict_with_non_finite_numbers_as_null(tmp_path):
    path = tmp_path / "s.json"
    write_json(path, {"a": float("nan"), "b": [1.5, float("inf")], "c": {"d": -float("inf")}})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.5, None], "c": {"d": None}}


def test_orphaned_temporary_files_are_removed(tmp_path):
    (tmp_path / ".last.pt.123.abc.tmp").write_bytes(b"half")
    (tmp_path / "last.pt").write_bytes(b"whole")
    assert [p.name for p in remove_orphans(tmp_path)] == [".last.pt.123.abc.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
