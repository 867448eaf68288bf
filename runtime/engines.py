"""Choose an engine backend by name; heavy packages are imported only when used."""

from __future__ import annotations

from pathlib import Path

from coformer.runtime.errors import CoFormerError

BACKENDS = ("onnxruntime",)


def open_engine(path: Path, backend: str = "onnxruntime", threads: int = 1):
    """Return a loaded engine for ``path``.

    TensorRT engines are not part of this release: a bundle carries ONNX, and
    ONNX Runtime (CPU, or CUDA with the [gpu] extra) runs it.
    """
    if backend == "onnxruntime":
        from coformer.runtime.onnxruntime_backend import OnnxRuntimeEngine

        return OnnxRuntimeEngine(path, threads=threads).load()
    raise CoFormerError(f"backend {backend!r} is not available; this runtime offers {list(BACKENDS)}")
