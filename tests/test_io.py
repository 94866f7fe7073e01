"""Atomic writes: whole or absent, and made with the modes any file or dir gets."""

from __future__ import annotations

import os
import stat

import pytest

from bayes_llm.io import staged_dir, write_json


def test_atomic_writes_leave_the_modes_the_umask_gives(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    write_json(tmp_path / "report.json", {"a": 1})  # mkstemp alone would leave it 0600, unreadable to others
    with staged_dir(tmp_path / "bundle") as staging:
        (staging / "x").write_text("x")
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "bundle").stat().st_mode) == 0o777 & ~umask


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    write_json(tmp_path / "report.json", {"a": 1})
    with pytest.raises(TypeError):
        write_json(tmp_path / "report.json", {"a": object()})  # not JSON: fails mid-write
    assert (tmp_path / "report.json").read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
