"""Atomic writes: whole or absent, and made with the modes any file or dir gets."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from bayes_llm.io import atomic_path, staged_dir, write_json


def test_atomic_writes_leave_the_modes_the_umask_gives(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    write_json(tmp_path / "report.json", {"a": 1})  # mkstemp alone would leave it 0600, unreadable to others
    with atomic_path(tmp_path / "z.safetensors") as tmp:  # safetensors writes a temp file of its own, 0600
        save_file({"z": torch.ones(2)}, str(tmp))
    with staged_dir(tmp_path / "bundle") as staging:
        save_file({"z": torch.ones(2)}, str(staging / "z.safetensors"))
        (staging / "run.sh").write_text("true\n")
        (staging / "run.sh").chmod(0o700)
    for path, mode in [("report.json", 0o666), ("z.safetensors", 0o666), ("bundle", 0o777),
                       ("bundle/z.safetensors", 0o666), ("bundle/run.sh", 0o777)]:  # fmt: skip
        assert stat.S_IMODE((tmp_path / path).stat().st_mode) == mode & ~umask, path


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    write_json(tmp_path / "report.json", {"a": 1})
    with pytest.raises(TypeError):
        write_json(tmp_path / "report.json", {"a": object()})  # not JSON: fails mid-write
    assert (tmp_path / "report.json").read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
