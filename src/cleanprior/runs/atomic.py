"""Atomic file writes: a reader sees the old file or the whole new one, never half of it.

Every file a run writes (checkpoints, observation files, figures, JSON, caches) goes through
:func:`atomic_path`: the content is written to a temporary file in the destination's folder (so
that the final ``os.replace`` stays within one file system, where it is atomic), flushed to disk,
and moved over the destination only when writing succeeded. On any failure, an interruption
included, the temporary file is removed and an existing destination is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets
from collections.abc import Iterator
from typing import Any

__all__ = ["atomic_path", "write_json"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[pathlib.Path]:
    """Yield a temporary path to write; on success it replaces ``path``.

    The temporary name keeps ``path``'s suffix (NumPy and Pillow choose formats by it) and starts
    with a dot. Missing parent folders are created.

    Arguments:
        path: The destination.

    Yields:
        The temporary path, beside ``path``, that does not exist yet.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(6)}.tmp{path.suffix}")
    try:
        yield tmp
        # fsync before the rename: after a crash the new name never points at unwritten blocks
        with open(tmp, "rb") as file:
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike[str], payload: Any) -> pathlib.Path:
    """Write ``payload`` as indented JSON, atomically (values JSON lacks are written as strings)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str))
    return pathlib.Path(path)
