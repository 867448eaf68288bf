"""Atomic file writes and checksums: nothing a user owns is ever half-written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from coformer.runtime.errors import CoFormerError

MANIFEST_NAME = "manifest.json"  # a bundle's manifest (coformer.runtime.manifest), signed by coformer.runtime.security


def read_json(path: Path, missing: str) -> Any:
    """The JSON in ``path``; :class:`CoFormerError` with ``missing`` when there is no such
    file, and one naming the file when it is not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise CoFormerError(missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CoFormerError(f"{path} is not valid JSON: {e}") from None


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def public_mode(path: Path, directory: bool = False) -> None:
    """Give a temp file or folder the mode a plain open()/mkdir() would (mkstemp makes it private)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        public_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def replace_dir(staging: Path, target: Path) -> None:
    """Move a fully written ``staging`` folder to ``target``, replacing an old one.

    The old folder is renamed aside first and deleted only once the new one is in
    place, so a crash at any point leaves either the old or the new folder whole.
    """
    staging, target = Path(staging), Path(target)
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, backup)
    try:
        os.replace(staging, target)
    except BaseException:
        if backup is not None:
            os.replace(backup, target)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
