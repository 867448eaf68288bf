"""Engine backends as a device sees them: the worker, the central node and the benchmark refuse a
backend this device cannot run in one line naming what is missing, before anything connects; and,
where ONNX Runtime offers CUDA, a bundle served on it answers as on the CPU."""

import subprocess
import sys

import numpy as np
import pytest

from tests.tools.test_serving import compiled  # noqa: F401  (the module's bundle)

pytestmark = pytest.mark.slow


def _rt(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "coformer.runtime.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def _cuda_offered() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _tensorrt_imports() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_cuda_offered(), reason="this onnxruntime offers CUDA: nothing to refuse")
def test_onnxruntime_cuda_is_refused_in_one_line_naming_the_package(compiled):  # noqa: F811
    result, _ = compiled
    bundle = result.bundle_dir
    worker = next(d.device for d in result.manifest.devices if d.role == "worker")
    for args in (["worker", bundle, "--device", worker, "--central", "tcp://127.0.0.1:59999"],
                 ["central", bundle, "--front", "tcp://127.0.0.1:0", "--back", "tcp://127.0.0.1:0"],
                 ["benchmark", bundle / result.manifest.central.artifact, "--duration", "0.05"]):
        for backend in ("onnxruntime-cuda", "onnxruntime-tensorrt"):
            done = _rt(*args, "--backend", backend)
            lines = done.stderr.strip().splitlines()
            assert done.returncode == 2 and len(lines) == 1, (args[0], backend, done.stderr)
            assert f"backend {backend} needs ONNX Runtime's" in lines[0] and "coformer[gpu]" in lines[0]


@pytest.mark.skipif(_tensorrt_imports(), reason="TensorRT's Python bindings are installed here")
def test_tensorrt_is_refused_in_one_line_naming_how_to_get_it(compiled):  # noqa: F811
    result, _ = compiled
    worker = next(d.device for d in result.manifest.devices if d.role == "worker")
    for args in (["worker", result.bundle_dir, "--device", worker, "--central", "tcp://127.0.0.1:59999"],
                 ["central", result.bundle_dir, "--front", "tcp://127.0.0.1:0", "--back", "tcp://127.0.0.1:0"]):
        done = _rt(*args, "--backend", "tensorrt")
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert "python3-libnvinfer" in lines[0] and "pip install tensorrt" in lines[0]
    done = _rt("build-engines", result.bundle_dir, "--device", worker)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "python3-libnvinfer" in lines[0], done.stderr
    assert not (result.bundle_dir / "engines").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_offered(), reason="needs onnxruntime-gpu offering CUDAExecutionProvider, and a GPU")
def test_a_bundle_served_on_onnxruntime_cuda_answers_as_on_the_cpu(compiled):  # noqa: F811
    from coformer.runtime.engines import open_engine

    result, data = compiled
    path = result.bundle_dir / result.manifest.central.artifact
    x = data.test.head(8).numpy()
    name = open_engine(path, "onnxruntime").input_names[0]
    cpu = open_engine(path, "onnxruntime").infer({name: x})
    gpu = open_engine(path, "onnxruntime-cuda").infer({name: x})
    for k in cpu:
        np.testing.assert_allclose(gpu[k], cpu[k], atol=1e-3)
