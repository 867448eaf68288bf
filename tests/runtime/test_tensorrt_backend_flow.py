"""The TensorRT backend's own control flow, with stand-ins for ``tensorrt`` and cuda-python.

**This is not evidence that TensorRT works.** CI has neither TensorRT nor a GPU. The stand-ins
keep "device" memory in host memory and run an "engine" with ONNX Runtime on its ONNX file.
What this checks is CoFormer's side: buffers sized for the profile's largest shapes, inputs
staged by name and copied byte for byte, output shapes read from the context, the phases
timed by four events in order, the refusals, and every buffer freed. The real engine path is
``tests/tools/test_backends.py::test_engines_built_on_the_device_match_onnx_runtime_and_are_reused``
(``gpu`` marker).
"""

import ctypes
import sys
import time
import types

import numpy as np
import pytest

from coformer.runtime.errors import CoFormerError

MAX_BATCH = 8


def _fake_cudart():
    rt = types.SimpleNamespace()
    ok = "cudaSuccess"
    rt.cudaError_t = types.SimpleNamespace(cudaSuccess=ok)
    rt.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice="h2d", cudaMemcpyDeviceToHost="d2h")
    rt.live, rt.copies, rt.events = {}, [], []

    def alloc(n):
        buf = (ctypes.c_uint8 * n)()
        rt.live[ctypes.addressof(buf)] = buf
        return ok, ctypes.addressof(buf)

    def free(ptr):
        del rt.live[ptr]
        rt.calls.append("free")
        return (ok,)

    def memcpy(dst, src, n, kind, stream):
        assert dst in rt.live and src in rt.live and n <= len(rt.live[dst])
        ctypes.memmove(dst, src, n)
        rt.copies.append((kind, n))
        return (ok,)

    def record(event, stream):
        event["t"] = time.perf_counter()
        rt.events.append(event["i"])
        return (ok,)

    rt.cudaMallocHost = rt.cudaMalloc = alloc
    rt.cudaFreeHost = rt.cudaFree = free
    rt.cudaMemcpyAsync = memcpy
    rt.cudaSetDevice = lambda i: (ok,)
    rt.cudaStreamCreate = lambda: (ok, 7)
    rt.cudaStreamDestroy = lambda s: (ok,)
    counter = iter(range(1000))
    rt.cudaEventCreate = lambda: (ok, {"i": next(counter)})
    rt.cudaEventDestroy = lambda e: (ok,)
    rt.cudaEventRecord = record
    rt.cudaEventSynchronize = lambda e: (ok,)
    rt.calls = []  # the order of stream synchronisation and frees

    def sync(stream):
        rt.calls.append("sync")
        return (ok,)

    rt.cudaStreamSynchronize = sync
    rt.cudaEventElapsedTime = lambda a, b: (ok, (b["t"] - a["t"]) * 1e3)
    return rt


def _fake_tensorrt():
    import onnxruntime as ort

    trt = types.SimpleNamespace(__version__="10.3.0")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.nptype = lambda dtype: dtype
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr
            return True

        def get_tensor_shape(self, name):
            if name in self.shapes:
                return self.shapes[name]
            batch = next(iter(self.shapes.values()))[0]
            return (batch, *self.engine.static[name][1:])

        def execute_async_v3(self, stream):
            feeds = {}
            for spec in self.engine.session.get_inputs():
                shape, n = self.shapes[spec.name], int(np.prod(self.shapes[spec.name]))
                raw = (ctypes.c_float * n).from_address(self.addresses[spec.name])
                feeds[spec.name] = np.frombuffer(raw, dtype=np.float32).reshape(shape).copy()
            for spec, value in zip(self.engine.session.get_outputs(), self.engine.session.run(None, feeds)):
                value = np.ascontiguousarray(value, dtype=np.float32)
                ctypes.memmove(self.addresses[spec.name], value.ctypes.data, value.nbytes)
            return True

    class Engine:
        def __init__(self, onnx_path):
            self.session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
            self.io = [(i.name, "in") for i in self.session.get_inputs()] + \
                      [(o.name, "out") for o in self.session.get_outputs()]
            self.static = {x.name: [d if isinstance(d, int) else -1 for d in x.shape]
                           for x in [*self.session.get_inputs(), *self.session.get_outputs()]}
            self.num_io_tensors = len(self.io)

        def get_tensor_name(self, i):
            return self.io[i][0]

        def get_tensor_mode(self, name):
            return dict(self.io)[name]

        def get_tensor_dtype(self, name):
            return np.float32

        def get_tensor_shape(self, name):
            return self.static[name]

        def get_tensor_profile_shape(self, name, profile):
            s = self.static[name]
            return [1, *s[1:]], [1, *s[1:]], [MAX_BATCH, *s[1:]]

        def create_execution_context(self):
            return Context(self)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine(data.decode()) if data.startswith(b"/") else None  # a "plan" names its ONNX file

    trt.Runtime = Runtime
    return trt


@pytest.fixture
def stand_ins(monkeypatch, tmp_path):
    torch = pytest.importorskip("torch")
    from coformer.compiler.lower import export_onnx

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 5), torch.nn.Tanh())
    onnx = export_onnx(model, [torch.zeros(1, 12)], tmp_path / "m.onnx", ["x"], ["y"])
    plan = tmp_path / "m.plan"
    plan.write_bytes(str(onnx).encode())
    rt, trt = _fake_cudart(), _fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    from coformer.runtime import tensorrt_backend

    monkeypatch.setattr(tensorrt_backend, "cudart", lambda: rt)
    return rt, plan, onnx


def test_our_engine_wrapper_stages_runs_and_times_by_name(stand_ins):
    from coformer.runtime.onnxruntime_backend import OnnxRuntimeEngine
    from coformer.runtime.tensorrt_backend import TensorRTEngine

    rt, plan, onnx = stand_ins
    engine = TensorRTEngine(plan).load()
    assert len(rt.live) == 4  # a pinned and a device buffer per tensor, allocated once
    assert engine.input_specs() == [("x", (None, 12), np.float32)]
    x = np.random.default_rng(0).standard_normal((3, 12)).astype(np.float32)
    with OnnxRuntimeEngine(onnx) as ref:
        want = ref.infer({"x": x})["y"]
    got = engine.infer({"x": x})["y"]
    np.testing.assert_array_equal(got, want)
    assert rt.copies == [("h2d", 3 * 12 * 4), ("d2h", 3 * 5 * 4)]  # only the request's bytes cross
    assert rt.events == [0, 1, 2, 3]  # before H2D, after H2D, after compute, after D2H
    assert engine.last_compute_ms >= 0 and engine.last_h2d_ms >= 0 and engine.last_d2h_ms >= 0
    again = engine.infer({"x": x[:1]})["y"]  # the buffers are reused; the answer is a copy
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(again, want[:1])
    with pytest.raises(CoFormerError, match=r"input x of shape \[9, 12\] is outside the engine's profile"):
        engine.infer({"x": np.zeros((MAX_BATCH + 1, 12), np.float32)})
    with pytest.raises(CoFormerError, match=r"needs inputs \['x'\]"):
        engine.infer({"pixels": x})
    engine.close()
    assert rt.live == {}  # everything freed
    assert rt.calls[:2] == ["sync", "free"]  # after the stream's work, never under it


def test_an_engine_from_elsewhere_is_refused_naming_where_engines_come_from(stand_ins, tmp_path):
    from coformer.runtime.tensorrt_backend import TensorRTEngine

    bad = tmp_path / "other.plan"
    bad.write_bytes(b"built for another GPU")
    with pytest.raises(CoFormerError, match="runs only on the TensorRT version and GPU it was built with"):
        TensorRTEngine(bad).load()
    with pytest.raises(CoFormerError, match="does not exist"):
        TensorRTEngine(tmp_path / "missing.plan").load()


def test_the_benchmark_reports_an_engines_three_phases(stand_ins):
    from coformer.runtime.timing import benchmark_engine

    _, plan, _ = stand_ins
    t = benchmark_engine(plan, "tensorrt", warmup_ms=0, iterations=5, duration_s=0, keep_trace=True)
    s = t.trtexec
    assert t.environment["backend"] == "tensorrt" and t.environment["backend_version"] == "10.3.0"
    assert s["H2D Latency"]["median"] > 0 and s["D2H Latency"]["median"] > 0
    assert s["Latency"]["median"] == pytest.approx(s["H2D Latency"]["median"] + s["GPU Compute Time"]["median"]
                                                   + s["D2H Latency"]["median"], rel=0.5)


def test_cuda_python_newer_than_the_driver_is_refused_with_the_install_that_fits(monkeypatch):
    """cuda-python 13 binds the CUDA 13 runtime, which JetPack 6's CUDA 12 driver cannot run:
    refused at the first use, naming the versions and the pip line that fits."""
    from coformer.runtime import tensorrt_backend as tb

    assert tb.driver_mismatch("12.6.2", 12060) is None
    assert tb.driver_mismatch("12.6.2", 13000) is None  # an older runtime on a newer driver runs
    assert tb.driver_mismatch("13.0.1", 0) is None  # no driver: left to the first CUDA call
    msg = tb.driver_mismatch("13.0.1", 12060)
    assert "cuda-python 13.0.1 needs a CUDA 13 driver" in msg and "driver is CUDA 12.6" in msg
    assert "pip install 'cuda-python>=12,<13'" in msg
    ok = "cudaSuccess"
    runtime = types.ModuleType("cuda.bindings.runtime")
    runtime.cudaError_t = types.SimpleNamespace(cudaSuccess=ok)
    runtime.cudaDriverGetVersion = lambda: (ok, 12060)
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    cuda.bindings, bindings.runtime = bindings, runtime
    for name, mod in (("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", runtime)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(tb, "bindings_version", lambda: "13.0.1")
    with pytest.raises(CoFormerError, match="cuda-python 13.0.1 needs a CUDA 13 driver"):
        tb.cudart()
    monkeypatch.setattr(tb, "bindings_version", lambda: "12.6.2")
    assert tb.cudart() is runtime
