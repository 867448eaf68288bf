"""Bundle writer: stage every artifact in a temporary folder, checksum it,
write the manifest, then move the folder into place in one rename."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from coformer.runtime.files import public_mode, replace_dir, sha256_file
from coformer.runtime.errors import CoFormerError
from coformer.runtime.manifest import MANIFEST_NAME, Manifest, load_manifest, write_manifest
from coformer.runtime.security import local_operator, sign_bundle


def check_target(out_dir: Path) -> None:
    """Refuse to replace a folder that holds something other than a bundle."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).exists())):
        raise CoFormerError(f"{out_dir} exists and is not a CoFormer bundle; choose another --out or remove it")


def write_bundle(out_dir: Path, build: Callable[[Path], dict[str, Any]]) -> Manifest:
    """Call ``build(staging_dir)`` to write the artifacts and return the manifest's
    fields but ``files``, which is filled with the SHA-256 of every file written;
    then sign the manifest with this user's operator key (made on first use:
    :func:`coformer.runtime.security.local_operator`; ``coformer serve`` without ``--keys``
    checks it), publish the folder at ``out_dir`` atomically and verify it."""
    out_dir = Path(out_dir)
    check_target(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        public_mode(staging, directory=True)
        fields = build(staging)
        files = {
            p.relative_to(staging).as_posix(): sha256_file(p)
            for p in sorted(staging.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME
        }
        manifest = Manifest(**fields, files=files)
        write_manifest(staging, manifest)
        sign_bundle(staging, local_operator(create=True)[0])
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load_manifest(out_dir, verify=True)
