"""ONNX Runtime engine backend: the embedded default (CPU, or CUDA with [gpu])."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from coformer.runtime.errors import CoFormerError, missing_package


class OnnxRuntimeEngine:
    """Runs one ONNX model with ONNX Runtime.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads; one by default, so an engine uses one core as
            a small device would and never fights its neighbours for the CPU.
        providers: execution providers in order of preference; CPU by default.

    ``last_compute_ms`` holds the wall time of the last ``session.run`` (the
    engine's own compute; on CPU there is no separate host-device transfer)
    and ``last_cpu_ms`` the CPU time the process spent in it.
    """

    backend = "onnxruntime"

    def __init__(self, path: Path, threads: int = 1, providers: Optional[Sequence[str]] = None) -> None:
        self.path = Path(path)
        self.threads = int(threads)
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.session = None
        self.last_compute_ms = 0.0
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
        wanted = self.providers[0]
        if wanted not in self.session.get_providers():
            raise CoFormerError(
                f"ONNX Runtime fell back to {self.session.get_providers()} instead of {wanted} for {self.path}"
            )
        return self

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self._session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self._session.get_outputs()]

    @property
    def _session(self):
        if self.session is None:
            raise RuntimeError("engine used before load()")
        return self.session

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        start, cpu = time.perf_counter(), time.process_time()
        outputs = self._session.run(None, dict(inputs))
        self.last_compute_ms = (time.perf_counter() - start) * 1e3
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
