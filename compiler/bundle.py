"""Bundle writer: stage every artifact in a temporary folder, checksum it, write and sign
the manifest, then move the folder into place in one rename (:class:`StagedBundle`)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from coformer.runtime.files import public_mode, replace_dir, sha256_file
from coformer.runtime.errors import CoFormerError
from coformer.runtime.manifest import MANIFEST_NAME, Manifest, load_manifest, write_manifest
from coformer.runtime.security import local_operator, sign_bundle


def check_target(out_dir: Path) -> None:
    """Refuse to replace a folder that holds something other than a bundle."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).exists())):
        raise CoFormerError(f"{out_dir} exists and is not a CoFormer bundle; choose another --out or remove it")


class StagedBundle:
    """A bundle being written, as a context manager: the builder writes its artifacts under
    :attr:`dir` (a temporary folder beside ``out_dir``), then hands its manifest's fields but
    ``files`` to :meth:`publish`, the one place a :class:`Manifest` is made: it fills ``files``
    with the SHA-256 of every file written, signs the manifest with this user's operator key
    (made on first use: :func:`coformer.runtime.security.local_operator`; ``coformer serve``
    without ``--keys`` checks it), publishes the folder at ``out_dir`` in one rename and
    verifies it. Leaving the block without publishing (an error) removes the staging folder:
    nothing half-written is left, and a bundle already at ``out_dir`` stays as it was.

    ::

        with StagedBundle(out_dir) as staged:
            ...write models under staged.dir...
            manifest = staged.publish(fields)
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.dir: Path = Path()
        self.published = False

    def __enter__(self) -> "StagedBundle":
        check_target(self.out_dir)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.staging-", dir=self.out_dir.parent))
        public_mode(self.dir, directory=True)
        return self

    def publish(self, fields: dict[str, Any]) -> Manifest:
        files = {
            p.relative_to(self.dir).as_posix(): sha256_file(p)
            for p in sorted(self.dir.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME
        }
        manifest = Manifest(**fields, files=files)
        write_manifest(self.dir, manifest)
        sign_bundle(self.dir, local_operator(create=True)[0])
        replace_dir(self.dir, self.out_dir)
        self.published = True
        return load_manifest(self.out_dir, verify=True)

    def __exit__(self, *exc) -> None:
        if not self.published:
            shutil.rmtree(self.dir, ignore_errors=True)
