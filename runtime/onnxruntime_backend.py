"""ONNX Runtime engine backend: the embedded default (CPU, or CUDA with [gpu])."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from coformer.runtime.errors import CoFormerError, first_line, missing_package

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
               "tensor(int32)": np.int32}


class OnnxRuntimeEngine:
    """Runs one ONNX model with ONNX Runtime.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads; one by default, so an engine uses one core as
            a small device would and never fights its neighbours for the CPU.
        providers: execution providers in order of preference; CPU by default.

        bind_device: run through an IOBinding on this device (``"cuda"`` for the CUDA and
            TensorRT providers), so the three phases are timed apart, as trtexec reports
            them: ``last_h2d_ms`` copies the inputs to the device (``OrtValue``),
            ``last_compute_ms`` is ``run_with_iobinding`` with outputs left on the device,
            ``last_d2h_ms`` copies them back (``copy_outputs_to_cpu``). Each is a host
            timer around a call ONNX Runtime synchronises itself. None (the CPU default):
            a plain ``session.run``.

    Without ``bind_device``, ``last_compute_ms`` holds the wall time of the last
    ``session.run`` (on CPU there is no separate host-device transfer, and
    ``last_h2d_ms`` and ``last_d2h_ms`` stay 0); ``last_cpu_ms`` is the CPU time the
    process spent in the inference.
    """

    backend = "onnxruntime"

    def __init__(self, path: Path, threads: int = 1, providers: Optional[Sequence[str]] = None,
                 bind_device: Optional[str] = None) -> None:
        self.path = Path(path)
        self.threads = int(threads)
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.bind_device = bind_device
        self.session = None
        self._names: Optional[tuple] = None  # (inputs, outputs, the session they were read from)
        self.precision = "fp32"
        self.last_compute_ms = self.last_h2d_ms = self.last_d2h_ms = self.last_enqueue_ms = 0.0
        self.last_cpu_ms = 0.0

    def load(self) -> "OnnxRuntimeEngine":
        try:
            import onnxruntime as ort
        except ImportError:
            raise missing_package("onnxruntime", "cpu", "the ONNX Runtime backend") from None
        if not self.path.is_file():
            raise CoFormerError(f"ONNX model {self.path} does not exist")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise CoFormerError(f"ONNX Runtime cannot load {self.path}: {e}") from None
        wanted = self.provider
        if wanted not in self.session.get_providers():
            raise CoFormerError(
                f"ONNX Runtime fell back to {self.session.get_providers()} instead of {wanted} for {self.path}"
            )
        return self

    @property
    def provider(self) -> str:
        """The first provider's name (a provider is a name or ``(name, options)``)."""
        first = self.providers[0]
        return first[0] if isinstance(first, tuple) else first

    @property
    def input_names(self) -> list[str]:
        return list(self._io_names()[0])

    @property
    def output_names(self) -> list[str]:
        return list(self._io_names()[1])

    def _io_names(self) -> tuple[list[str], list[str]]:
        """The session's input and output names, read once: each ``get_inputs()`` builds new
        Python objects, and the serving loop asked twice a request (issue 39's profile)."""
        session = self._session
        if self._names is None or self._names[2] is not session:
            self._names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()], session)
        return self._names[0], self._names[1]

    def input_specs(self) -> list[tuple[str, tuple, np.dtype]]:
        """(name, shape with None for a symbolic axis, dtype) of every input, as the benchmark reads them."""
        out = []
        for spec in self._session.get_inputs():
            dtype = _ORT_DTYPES.get(spec.type)
            if dtype is None:
                raise CoFormerError(f"input {spec.name} has type {spec.type}, which CoFormer does not feed")
            out.append((spec.name, tuple(d if isinstance(d, int) and d > 0 else None for d in spec.shape), dtype))
        return out

    @property
    def _session(self):
        if self.session is None:
            raise RuntimeError("engine used before load()")
        return self.session

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.bind_device is not None:
            return self._infer_bound(inputs)
        start, cpu = time.perf_counter(), time.process_time()
        outputs = self._session.run(None, dict(inputs))
        self.last_compute_ms = self.last_enqueue_ms = (time.perf_counter() - start) * 1e3
        self.last_cpu_ms = (time.process_time() - cpu) * 1e3
        return dict(zip(self._io_names()[1], outputs))

    def _infer_bound(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One inference through an IOBinding on ``bind_device`` (class doc)."""
        import onnxruntime as ort

        session, device = self._session, self.bind_device
        cpu, t0 = time.process_time(), time.perf_counter()
        binding = session.io_binding()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), device, 0))
        for name in self.output_names:
            binding.bind_output(name, device)
        t1 = time.perf_counter()
        try:
            session.run_with_iobinding(binding)
        except Exception as e:  # a provider listed and loaded can still fail at its first run (no kernel, OOM)
            raise CoFormerError(f"ONNX Runtime's {self.provider} failed running {self.path}: {first_line(e)}") from None
        t2 = time.perf_counter()
        outputs = binding.copy_outputs_to_cpu()
        t3 = time.perf_counter()
        self.last_h2d_ms, self.last_compute_ms, self.last_d2h_ms = (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3
        self.last_enqueue_ms = self.last_compute_ms
        self.last_cpu_ms = (time.process_time() - cpu) * 1e3
        return dict(zip(self.output_names, outputs))

    def close(self) -> None:
        self.session = None

    def __enter__(self) -> "OnnxRuntimeEngine":
        return self.load() if self.session is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def version() -> str:
        import onnxruntime as ort

        return ort.__version__
