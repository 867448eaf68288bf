"""TensorRT engine backend (issue 22, item 2): a serialized engine run on the device's GPU.

The same small interface as :class:`coformer.runtime.onnxruntime_backend.OnnxRuntimeEngine`
(``load``, ``infer``, ``close``, ``last_compute_ms``), written against TensorRT 10's
name-based I/O (``num_io_tensors``, ``get_tensor_name``, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``) and cuda-python, as TensorRT's own Python
samples (``samples/python/common_runtime.py``) use them; never pycuda.

* **Buffers allocated once**, at ``load``: for every I/O tensor a page-locked host buffer
  (``cudaMallocHost``, so copies are truly asynchronous) and a device buffer
  (``cudaMalloc``), each sized for the optimisation profile's largest shape. An output's
  largest shape is TensorRT's answer once every input is set to its largest. Tensor
  addresses are bound to the context once; a request only sets the input shapes.
* **One CUDA stream** for copies and compute, and four CUDA events around them, so an
  inference reports the three phases trtexec reports: ``last_h2d_ms`` (H2D Latency),
  ``last_compute_ms`` (GPU Compute Time) and ``last_d2h_ms`` (D2H Latency), from
  ``cudaEventElapsedTime``. ``last_enqueue_ms`` is the host time of
  ``execute_async_v3`` (trtexec's Enqueue Time).
* Inputs are taken by name, cast to the engine's dtype (a text engine's int64 ids may be
  int32 inside TensorRT: the cast is checked to lose nothing) and refused when their rank
  or size does not fit the profile, naming the tensor and both shapes.

Not yet run on a GPU: CI and the development machines have neither a GPU nor TensorRT.
"""

from __future__ import annotations

import ctypes
import functools
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from coformer.runtime.errors import CoFormerError

TENSORRT_MISSING = ("TensorRT's Python bindings, which are not installed: on a Jetson, JetPack's "
                    "python3-libnvinfer; on x86, pip install tensorrt")


def import_tensorrt():
    """``tensorrt``, or one line naming what is missing."""
    try:
        import tensorrt
    except ImportError:
        raise CoFormerError(f"the TensorRT backend needs {TENSORRT_MISSING}") from None
    return tensorrt


def cudart():
    """cuda-python's runtime module (``cuda.bindings.runtime`` from 12.8; ``cuda.cudart`` before),
    once checked against the device's driver (:func:`driver_mismatch`)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise CoFormerError("the TensorRT backend needs cuda-python, which is not installed: "
                                "pip install 'coformer[tensorrt]'") from None
    _check_driver(runtime)
    return runtime


@functools.lru_cache(maxsize=None)
def _check_driver(runtime) -> None:
    """Refuse cuda-python newer than the driver, once a process (a refusal is not cached)."""
    err, driver = runtime.cudaDriverGetVersion()[:2]
    bad = driver_mismatch(bindings_version(), int(driver)) if err == runtime.cudaError_t.cudaSuccess else None
    if bad:
        raise CoFormerError(bad)


def bindings_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("cuda-bindings", "cuda-python"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "0"


def driver_mismatch(bindings_version: str, driver_version: int) -> Optional[str]:
    """Why cuda-python ``bindings_version`` cannot run on a driver of ``driver_version``
    (``cudaDriverGetVersion``: 1000 * major + 10 * minor), or None.

    cuda-python N.x binds the CUDA N runtime, which needs a driver of CUDA N or later: on JetPack
    6 (a CUDA 12 driver) cuda-python 13 fails at its first call. Choice written down: no upper
    bound in ``setup.cfg`` (JetPack 7 and current x86 drivers are CUDA 13, and a pin by platform
    would be wrong for one of them); the mismatch is refused here, with the install that fits.
    A driver version of 0 (no driver) is left to the first CUDA call to report."""
    try:
        major = int(str(bindings_version).split(".")[0])
    except ValueError:
        return None
    d_major, d_minor = driver_version // 1000, (driver_version % 1000) // 10
    if driver_version <= 0 or major <= d_major:
        return None
    return (f"cuda-python {bindings_version} needs a CUDA {major} driver, and this device's driver is CUDA "
            f"{d_major}.{d_minor}: pip install 'cuda-python>={d_major},<{d_major + 1}' (JetPack 6 is CUDA 12)")


def cuda_call(rt, result):
    """Unpack a cuda-python call's ``(err, *values)``; raise on an error, naming it."""
    if not isinstance(result, tuple):
        result = (result,)
    err, values = result[0], result[1:]
    if err != rt.cudaError_t.cudaSuccess:
        raise CoFormerError(f"CUDA call failed: {err}")
    return values[0] if len(values) == 1 else (values or None)


class _Buffer:
    """A page-locked host buffer and a device buffer of the same size, for one I/O tensor."""

    def __init__(self, rt, count: int, dtype: np.dtype) -> None:
        self.dtype = np.dtype(dtype)
        self.nbytes = max(1, int(count)) * self.dtype.itemsize
        self.host_ptr = cuda_call(rt, rt.cudaMallocHost(self.nbytes))
        try:
            self.device_ptr = cuda_call(rt, rt.cudaMalloc(self.nbytes))
        except CoFormerError:
            rt.cudaFreeHost(self.host_ptr)
            raise
        raw = (ctypes.c_uint8 * self.nbytes).from_address(int(self.host_ptr))
        self.host = np.frombuffer(raw, dtype=self.dtype)  # a view of the pinned memory

    def free(self, rt) -> None:
        rt.cudaFree(self.device_ptr)
        rt.cudaFreeHost(self.host_ptr)


class TensorRTEngine:
    """Runs one serialized TensorRT engine (a ``.plan``) on GPU ``device`` (module doc)."""

    backend = "tensorrt"

    def __init__(self, path: Path, device: int = 0) -> None:
        self.path = Path(path)
        self.device = int(device)
        self.engine = self.context = self.stream = None
        self._rt = None
        self._buffers: dict[str, _Buffer] = {}
        self._events: list[Any] = []
        self._inputs: dict[str, dict[str, Any]] = {}
        self._outputs: dict[str, dict[str, Any]] = {}
        self.precision = "unknown"  # the builder's choice, which the engine does not say: set from its sidecar
        self.last_compute_ms = self.last_h2d_ms = self.last_d2h_ms = self.last_enqueue_ms = 0.0
        self.last_cpu_ms = 0.0

    # -- loading -----------------------------------------------------------------------------
    def load(self) -> "TensorRTEngine":
        trt = import_tensorrt()
        rt = self._rt = cudart()
        if not self.path.is_file():
            raise CoFormerError(f"TensorRT engine {self.path} does not exist")
        cuda_call(rt, rt.cudaSetDevice(self.device))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise CoFormerError(f"TensorRT {trt.__version__} cannot load {self.path}: an engine runs only on the "
                                "TensorRT version and GPU it was built with (coformer-runtime build-engines)")
        try:
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise CoFormerError(f"TensorRT cannot create an execution context for {self.path} (GPU memory?)")
            self.stream = cuda_call(rt, rt.cudaStreamCreate())
            self._events = [cuda_call(rt, rt.cudaEventCreate()) for _ in range(4)]
            self._allocate(trt)
        except BaseException:
            self.close()
            raise
        return self

    def _allocate(self, trt) -> None:
        engine, context = self.engine, self.context
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        for name in names:
            spec = {"dtype": np.dtype(trt.nptype(engine.get_tensor_dtype(name))),
                    "shape": tuple(int(d) for d in engine.get_tensor_shape(name))}
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                if any(d < 0 for d in spec["shape"]):
                    lo, _, hi = engine.get_tensor_profile_shape(name, 0)
                    spec["min"], spec["max"] = tuple(int(d) for d in lo), tuple(int(d) for d in hi)
                else:
                    spec["min"] = spec["max"] = spec["shape"]
                self._inputs[name] = spec
                context.set_input_shape(name, spec["max"])
            else:
                self._outputs[name] = spec
        for name, spec in self._outputs.items():  # the largest output follows from the largest inputs
            spec["max"] = tuple(int(d) for d in context.get_tensor_shape(name))
            if any(d < 0 for d in spec["max"]):
                raise CoFormerError(f"TensorRT engine {self.path}: output {name} has no bounded shape "
                                    f"({list(spec['max'])}); CoFormer's models have none of that kind")
        for name, spec in {**self._inputs, **self._outputs}.items():
            buf = self._buffers[name] = _Buffer(self._rt, int(np.prod(spec["max"])), spec["dtype"])
            if not context.set_tensor_address(name, int(buf.device_ptr)):
                raise CoFormerError(f"TensorRT refused the device address of tensor {name} in {self.path}")

    # -- what the engine takes -----------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    def input_specs(self) -> list[tuple[str, tuple[Any, ...], np.dtype]]:
        """(name, shape with None for a dynamic axis, dtype) of every input, as the benchmark reads them."""
        return [(n, tuple(None if d < 0 else d for d in s["shape"]), s["dtype"]) for n, s in self._inputs.items()]

    def _stage(self, name: str, value: np.ndarray) -> np.ndarray:
        spec = self._inputs.get(name)
        if spec is None:
            raise CoFormerError(f"TensorRT engine {self.path.name} has no input {name!r}; it takes "
                                f"{list(self._inputs)}")
        arr = np.asarray(value)
        if arr.ndim != len(spec["shape"]) or any(
                not lo <= d <= hi for d, lo, hi in zip(arr.shape, spec["min"], spec["max"])):
            raise CoFormerError(f"input {name} of shape {list(arr.shape)} is outside the engine's profile "
                                f"(min {list(spec['min'])}, max {list(spec['max'])})")
        cast = arr.astype(spec["dtype"], copy=False)
        if cast.dtype != arr.dtype and arr.dtype.kind in "iu" and not np.array_equal(cast, arr):
            raise CoFormerError(f"input {name}: values do not fit the engine's {spec['dtype']}")
        host = self._buffers[name].host[:cast.size]
        host[...] = cast.reshape(-1)
        if not self.context.set_input_shape(name, tuple(arr.shape)):
            raise CoFormerError(f"TensorRT refused shape {list(arr.shape)} for input {name}")
        return cast

    # -- running -------------------------------------------------------------------------------
    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.context is None:
            raise RuntimeError("engine used before load()")
        missing = sorted(set(self._inputs) - set(inputs))
        if missing:
            raise CoFormerError(f"TensorRT engine {self.path.name} needs inputs {missing}")
        rt, stream, ev = self._rt, self.stream, self._events
        cpu = time.process_time()
        staged = {name: self._stage(name, inputs[name]) for name in self._inputs}
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_call(rt, rt.cudaEventRecord(ev[0], stream))
        for name, arr in staged.items():
            buf = self._buffers[name]
            cuda_call(rt, rt.cudaMemcpyAsync(buf.device_ptr, buf.host_ptr, arr.nbytes, h2d, stream))
        cuda_call(rt, rt.cudaEventRecord(ev[1], stream))
        t0 = time.perf_counter()
        ok = self.context.execute_async_v3(int(stream))
        self.last_enqueue_ms = (time.perf_counter() - t0) * 1e3
        if not ok:
            raise CoFormerError(f"TensorRT could not enqueue {self.path.name} (see TensorRT's log above)")
        cuda_call(rt, rt.cudaEventRecord(ev[2], stream))
        shapes = {}
        for name, spec in self._outputs.items():
            shapes[name] = tuple(int(d) for d in self.context.get_tensor_shape(name))
            buf = self._buffers[name]
            nbytes = int(np.prod(shapes[name])) * spec["dtype"].itemsize
            cuda_call(rt, rt.cudaMemcpyAsync(buf.host_ptr, buf.device_ptr, nbytes, d2h, stream))
        cuda_call(rt, rt.cudaEventRecord(ev[3], stream))
        cuda_call(rt, rt.cudaEventSynchronize(ev[3]))
        self.last_h2d_ms = float(cuda_call(rt, rt.cudaEventElapsedTime(ev[0], ev[1])))
        self.last_compute_ms = float(cuda_call(rt, rt.cudaEventElapsedTime(ev[1], ev[2])))
        self.last_d2h_ms = float(cuda_call(rt, rt.cudaEventElapsedTime(ev[2], ev[3])))
        self.last_cpu_ms = (time.process_time() - cpu) * 1e3
        # copies: the pinned buffers are reused by the next request
        return {name: self._buffers[name].host[:int(np.prod(s))].reshape(s).copy() for name, s in shapes.items()}

    def close(self) -> None:
        """Free the buffers, events and stream, after the stream's work is done: copies and the
        engine may still be running on it (an inference that raised mid-way), and freeing memory
        they use is undefined."""
        rt = self._rt
        if rt is not None:
            if self.stream is not None:
                rt.cudaStreamSynchronize(self.stream)  # best effort: close() must free even after an error
            for buf in self._buffers.values():
                buf.free(rt)
            for event in self._events:
                rt.cudaEventDestroy(event)
            if self.stream is not None:
                rt.cudaStreamDestroy(self.stream)
        self._buffers, self._events, self.stream = {}, [], None
        self.context = self.engine = None

    def __enter__(self) -> "TensorRTEngine":
        return self.load() if self.context is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def version() -> str:
        return str(import_tensorrt().__version__)
