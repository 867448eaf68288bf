"""Choose an engine backend by name; heavy packages are imported only when used.

* ``onnxruntime``: ONNX Runtime on the CPU (``pip install 'coformer[cpu]'``).
* ``onnxruntime-cuda``: ONNX Runtime's CUDA execution provider (``onnxruntime-gpu``,
  ``pip install 'coformer[gpu]'``); ``onnxruntime-tensorrt``: its TensorRT provider, with
  CUDA after it for what TensorRT does not take. Either refuses in one line where this
  onnxruntime does not offer the provider, and where a session falls back to the CPU.
  Choice written down: on these backends ``last_compute_ms`` is the whole ``session.run``,
  host-device copies included (trtexec's Latency, not its GPU Compute Time).
* ``tensorrt``: a TensorRT engine built on the device. Not in this release: it refuses in
  one line, naming what is missing (TensorRT's Python bindings) where they are missing.
"""

from __future__ import annotations

from pathlib import Path

from coformer.runtime.errors import CoFormerError

BACKENDS = ("onnxruntime", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt")
ORT_PROVIDERS = {
    "onnxruntime": ["CPUExecutionProvider"],
    "onnxruntime-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "onnxruntime-tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def check_backend(backend: str) -> None:
    """Refuse an unknown backend, or one this device cannot run, in one line naming what is missing."""
    if backend not in BACKENDS:
        raise CoFormerError(f"backend {backend!r} is not one of {list(BACKENDS)}")
    if backend == "tensorrt":
        import importlib

        try:
            importlib.import_module("tensorrt")  # only whether it imports
        except ImportError:
            raise CoFormerError("backend tensorrt needs TensorRT's Python bindings, which are not installed: on a "
                                "Jetson, JetPack's python3-libnvinfer; on x86, pip install tensorrt") from None
        raise CoFormerError("backend tensorrt: TensorRT engines are not part of this release yet; use "
                            "--backend onnxruntime-tensorrt (ONNX Runtime's TensorRT provider) meanwhile")
    if backend in ("onnxruntime-cuda", "onnxruntime-tensorrt"):
        try:
            import onnxruntime as ort
        except ImportError:
            raise CoFormerError(f"backend {backend} needs onnxruntime-gpu, which is not installed: "
                                "pip install 'coformer[gpu]'") from None
        wanted = ORT_PROVIDERS[backend][0]
        offered = ort.get_available_providers()
        if wanted not in offered:
            raise CoFormerError(f"backend {backend} needs ONNX Runtime's {wanted}, which this onnxruntime "
                                f"{ort.__version__} does not offer ({', '.join(offered)}): install onnxruntime-gpu "
                                "(pip install 'coformer[gpu]', never beside onnxruntime) with CUDA on a GPU")


def open_engine(path: Path, backend: str = "onnxruntime", threads: int = 1):
    """Return a loaded engine for ``path`` on ``backend`` (module doc)."""
    check_backend(backend)
    from coformer.runtime.onnxruntime_backend import OnnxRuntimeEngine

    engine = OnnxRuntimeEngine(path, threads=threads, providers=ORT_PROVIDERS[backend])
    engine.backend = backend
    return engine.load()
