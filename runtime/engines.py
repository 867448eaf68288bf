"""Choose an engine backend by name; heavy packages are imported only when used.

* ``onnxruntime``: ONNX Runtime on the CPU (``pip install 'coformer[cpu]'``).
* ``onnxruntime-cuda``: ONNX Runtime's CUDA execution provider (``onnxruntime-gpu``,
  ``pip install 'coformer[gpu]'``); ``onnxruntime-tensorrt``: its TensorRT provider, with
  CUDA after it for what TensorRT does not take. Either refuses in one line where this
  onnxruntime does not offer the provider, and where a session falls back to the CPU.
  These run through an IOBinding, so host-to-device copies, compute and device-to-host
  copies are timed apart (``last_h2d_ms``, ``last_compute_ms``, ``last_d2h_ms``).
* ``tensorrt``: a TensorRT engine built on the device (``coformer.runtime.tensorrt_engines``)
  and run by ``coformer.runtime.tensorrt_backend``. Given an ``.onnx`` file, the engine is
  built beside it on first use and reused while it matches (:func:`open_engine`); given a
  bundle's device, every model of the device is (:func:`open_device_engines`). A device
  without TensorRT's Python bindings or cuda-python is refused in one line naming them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

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

        from coformer.runtime.tensorrt_backend import TENSORRT_MISSING, cudart

        try:
            importlib.import_module("tensorrt")  # only whether it imports
        except ImportError:
            raise CoFormerError(f"backend tensorrt needs {TENSORRT_MISSING}") from None
        cudart()  # cuda-python, or one line naming it
    if backend in ("onnxruntime-cuda", "onnxruntime-tensorrt"):
        try:
            import onnxruntime as ort
        except ImportError:
            raise CoFormerError(f"backend {backend} needs ONNX Runtime with CUDA, which is not installed: "
                                f"{gpu_onnxruntime_install()}") from None
        wanted = ORT_PROVIDERS[backend][0]
        offered = ort.get_available_providers()
        if wanted not in offered:
            raise CoFormerError(f"backend {backend} needs ONNX Runtime's {wanted}, which this onnxruntime "
                                f"{ort.__version__} does not offer ({', '.join(offered)}): "
                                f"{gpu_onnxruntime_install()}")


def gpu_onnxruntime_install(machine: Optional[str] = None) -> str:
    """How this machine gets ONNX Runtime with CUDA. PyPI has no aarch64 onnxruntime-gpu wheel, so
    ``coformer[gpu]`` cannot install on a Jetson: there it is NVIDIA's Jetson build of ONNX Runtime
    (the wheel for the device's JetPack, from NVIDIA's Jetson pip index), installed in place of
    onnxruntime. Elsewhere the ``[gpu]`` extra; never both packages, they own the same folder."""
    import platform

    if (machine or platform.machine()).lower() in ("aarch64", "arm64"):
        return ("on a Jetson, PyPI has no onnxruntime-gpu: pip uninstall onnxruntime, then install NVIDIA's "
                "Jetson build of onnxruntime-gpu for your JetPack (NVIDIA's Jetson pip index; see docs/usage.md)")
    return "pip uninstall onnxruntime, then pip install 'coformer[gpu]' (onnxruntime-gpu), on a machine with CUDA"


def open_engine(path: Path, backend: str = "onnxruntime", threads: int = 1, precision: str = "fp16",
                shapes: Optional[Mapping[str, Sequence[int]]] = None, batch: int = 1):
    """Return a loaded engine for ``path`` on ``backend`` (module doc).

    On ``tensorrt``, ``path`` is an engine (``.plan``/``.engine``) or an ONNX file whose engine
    is built at ``precision`` beside it when none matches; ``shapes`` (input name -> shape) fix
    the ONNX's dynamic axes for that build, and any left over are built at ``batch`` (a first
    axis) or 1.
    """
    check_backend(backend)
    if backend == "tensorrt":
        from coformer.runtime.tensorrt_backend import TensorRTEngine

        path = Path(path)
        if path.suffix in (".plan", ".engine"):
            return TensorRTEngine(path).load()
        from coformer.runtime.tensorrt_engines import engine_for_onnx

        record = engine_for_onnx(path, precision, shapes, batch)
        engine = TensorRTEngine(Path(record["engine"]))
        engine.precision = precision
        return engine.load()
    from coformer.runtime.onnxruntime_backend import OnnxRuntimeEngine

    providers = ort_providers(backend, Path(path).parent, precision, shapes)
    engine = OnnxRuntimeEngine(path, threads=threads, providers=providers,
                               bind_device=None if backend == "onnxruntime" else "cuda")
    engine.backend = backend
    return engine.load()


ORT_TRT_CACHE = "engines/onnxruntime-tensorrt"  # beside the model: ONNX Runtime's TensorRT engines and timing cache


def ort_providers(backend: str, model_dir: Path, precision: str = "fp16",
                  shapes: Optional[Mapping[str, Sequence[int]]] = None) -> list:
    """ONNX Runtime's providers for ``backend``. ``onnxruntime-tensorrt`` gets its options, where
    ONNX Runtime's defaults rebuild every engine at every start, in fp32, and again at every new
    input shape: the engine and timing caches on (``trt_engine_cache_enable``,
    ``trt_timing_cache_enable``) in ``ORT_TRT_CACHE`` beside the model, ``trt_fp16_enable`` at
    ``precision="fp16"``, and, where ``shapes`` are given, one optimisation profile of exactly
    those shapes (``trt_profile_min/opt/max_shapes``, ``name:1x3x224x224,...``)."""
    names = ORT_PROVIDERS[backend]
    if backend != "onnxruntime-tensorrt":
        return list(names)
    cache = str(Path(model_dir) / ORT_TRT_CACHE)
    options: dict[str, Any] = {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                               "trt_timing_cache_enable": True, "trt_timing_cache_path": cache,
                               "trt_fp16_enable": precision == "fp16"}
    if shapes:
        profile = ",".join(f"{name}:{'x'.join(str(int(d)) for d in shape)}" for name, shape in shapes.items())
        options.update(trt_profile_min_shapes=profile, trt_profile_opt_shapes=profile, trt_profile_max_shapes=profile)
    return [(names[0], options), *names[1:]]


def open_device_engines(bundle_dir: Path, device: str, files: Mapping[str, str], backend: str, threads: int,
                        precision: str = "fp16") -> dict[str, Any]:
    """The loaded engines of a bundle device's models (``files``: model name -> the ONNX's path
    in the bundle). On ``tensorrt``, the device's engines are first built where none matches
    (``coformer-runtime build-engines``, with its parity check) and then loaded."""
    if backend != "tensorrt":
        return {name: open_engine(Path(bundle_dir) / rel, backend, threads) for name, rel in files.items()}
    check_backend(backend)
    from coformer.runtime.tensorrt_backend import TensorRTEngine
    from coformer.runtime.tensorrt_engines import build_engines

    records = {r["model"]: r for r in build_engines(bundle_dir, device, precision)}
    engines = {}
    try:
        for name, rel in files.items():
            engines[name] = TensorRTEngine(Path(records[rel]["engine"]))
            engines[name].precision = precision
            engines[name].load()
    except BaseException:
        for e in engines.values():
            e.close()
        raise
    return engines
