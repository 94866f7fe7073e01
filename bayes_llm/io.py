"""Atomic writes: an artifact is either whole or absent, never half-written."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path` (same suffix, so writers that infer the format still work);
    it replaces `path` when the block succeeds and is deleted when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _usual_mode(tmp, 0o666)  # after the writer: some (safetensors) replace the temp file with their own
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# Read once, at import: reading the umask means setting it, and a thread creating a file meanwhile would
# get the value set in between.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _usual_mode(path: Path, mode: int) -> None:
    """mkstemp makes a file 0600 and mkdtemp a dir 0700 (and writers with temp files of their own do the
    same): the result should look like any file or dir made under the umask (a bundle another user
    reads). A file its writer made executable stays executable."""
    with contextlib.suppress(OSError):  # a filesystem without modes: the write itself still counts
        path.chmod((0o777 if path.stat().st_mode & 0o111 else mode) & ~_UMASK)


def write_json(path: str | Path, payload: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path, error: type[Exception], hint: str) -> dict:
    """The JSON object at `path`; `error` naming the file and `hint` (what to run) when it is
    missing, unreadable or not an object, never a bare decoder traceback."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} not found: {hint}")
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as problem:
        raise error(f"{path}: not valid JSON ({problem}): {hint}") from None
    if not isinstance(payload, dict):
        raise error(f"{path}: not a JSON object: {hint}")
    return payload


def write_csv(path: str | Path, header: list[str], rows: Iterable[Iterable[Any]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


@contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty sibling temp dir; on success it replaces `final`, on error it is deleted."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        yield staging
        _usual_mode(staging, 0o777)
        for inside in staging.rglob("*"):
            if inside.is_file() and not inside.is_symlink():
                _usual_mode(inside, 0o666)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def sha256(path: Path) -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
