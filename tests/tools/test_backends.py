"""Engine backends as a device sees them: the worker, the central node and the benchmark refuse a
backend this device cannot run in one line naming what is missing, before anything connects; and,
where ONNX Runtime offers CUDA, a bundle served on it answers as on the CPU."""

import subprocess
import sys

import numpy as np
import pytest

from coformer.runtime.errors import CoFormerError

from tests.tools.test_serving import compiled  # noqa: F401  (the module's bundle)

pytestmark = pytest.mark.slow


def _rt(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "coformer.runtime.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def _cuda_offered() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _tensorrt_bindings() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def _tensorrt_imports() -> bool:
    """TensorRT's bindings and cuda-python both import (either missing: the gpu tests skip)."""
    if not _tensorrt_bindings():
        return False
    try:
        from cuda.bindings import runtime  # noqa: F401
    except ImportError:
        try:
            from cuda import cudart  # noqa: F401
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


@pytest.mark.skipif(_tensorrt_bindings(), reason="TensorRT's Python bindings are installed here")
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


def test_a_bundle_carries_check_inputs_that_its_models_take(compiled):  # noqa: F811
    from coformer.runtime.engines import open_engine
    from coformer.runtime.tensorrt_engines import CHECK_INPUTS, check_inputs

    result, data = compiled
    feeds, source = check_inputs(result.bundle_dir, result.manifest)
    assert source == CHECK_INPUTS and CHECK_INPUTS in result.manifest.files  # checksummed with the rest
    name = result.manifest.input.name
    np.testing.assert_array_equal(feeds[name], data.val.head(3).numpy())  # the validation split's first three
    with open_engine(result.bundle_dir / result.manifest.central.artifact) as engine:
        assert next(iter(engine.infer(feeds).values())).shape[0] == 3


def test_an_iobinding_splits_copies_from_compute_and_answers_as_a_plain_run(compiled):  # noqa: F811
    # the onnxruntime-cuda path binds on "cuda"; the same calls on "cpu" run here, for real
    from coformer.runtime.onnxruntime_backend import OnnxRuntimeEngine

    result, data = compiled
    path = result.bundle_dir / result.manifest.central.artifact
    feeds = {result.manifest.input.name: data.test.head(4).numpy()}
    with OnnxRuntimeEngine(path) as plain, OnnxRuntimeEngine(path, bind_device="cpu") as bound:
        want, got = plain.infer(feeds), bound.infer(feeds)
        assert plain.last_h2d_ms == plain.last_d2h_ms == 0.0
        assert bound.last_compute_ms > 0 and bound.last_h2d_ms > 0 and bound.last_d2h_ms > 0
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_an_fp16_onnx_keeps_float32_inputs_and_outputs_and_stays_close(compiled, tmp_path):  # noqa: F811
    import onnx

    from coformer.compiler.lower import write_fp16_onnx
    from coformer.runtime.engines import open_engine
    from coformer.runtime.tensorrt_engines import check_inputs, fp16_name

    result, _ = compiled
    rel = result.manifest.central.artifact
    feeds, _ = check_inputs(result.bundle_dir, result.manifest)
    half = tmp_path / fp16_name(rel).split("/")[-1]
    diff = write_fp16_onnx(result.bundle_dir / rel, half, feeds)
    assert 0 < diff < 5e-2  # rounded, not identical, and close
    model = onnx.load(str(half))
    assert {i.type.tensor_type.elem_type for i in model.graph.input} == {onnx.TensorProto.FLOAT}
    weights = [t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in weights) > len(weights) / 2
    with open_engine(half) as engine:  # the runtime feeds it as it feeds the float32 model
        assert next(iter(engine.infer(feeds).values())).dtype == np.float32


@pytest.mark.gpu
@pytest.mark.skipif(not _tensorrt_imports(), reason="needs TensorRT's Python bindings, cuda-python and a GPU")
def test_engines_built_on_the_device_match_onnx_runtime_and_are_reused(compiled, tmp_path):  # noqa: F811
    import shutil

    from coformer.runtime.engines import open_device_engines
    from coformer.runtime.tensorrt_engines import build_engines, check_inputs

    result, _ = compiled
    bundle = tmp_path / "bundle"
    shutil.copytree(result.bundle_dir, bundle)
    worker = next(d for d in result.manifest.devices if d.role == "worker")
    first = build_engines(bundle, worker.device, "fp32")
    assert [e["built"] for e in first] == [True]
    assert first[0]["parity"]["inputs"] == "checks/inputs.npz" and first[0]["parity"]["max_abs_diff"] < 1e-3
    assert [e["built"] for e in build_engines(bundle, worker.device, "fp32")] == [False]  # reused
    import tensorrt

    if int(tensorrt.__version__.split(".")[0]) >= 11:  # strongly typed: fp16 needs an fp16 ONNX, which
        with pytest.raises(CoFormerError, match="no fp16 ONNX"):  # this fp32 bundle does not carry
            build_engines(bundle, worker.device, "fp16")
        precision = "fp32"
    else:
        assert [e["built"] for e in build_engines(bundle, worker.device, "fp16")] == [True]  # other settings
        precision = "fp16"
    feeds, _ = check_inputs(bundle, result.manifest)
    engines = open_device_engines(bundle, worker.device, worker.model_files(), "tensorrt", 1, precision)
    try:
        (engine,) = engines.values()
        out = engine.infer({k: v[:1] for k, v in feeds.items()})
        assert engine.last_compute_ms > 0 and engine.last_h2d_ms > 0 and engine.last_d2h_ms > 0
        assert next(iter(out.values())).shape[0] == 1
    finally:
        for e in engines.values():
            e.close()


def test_doctor_says_what_this_device_has_and_times_a_bundle_on_the_backend_it_chooses(compiled, tmp_path):  # noqa: F811
    import json

    result, _ = compiled
    done = _rt("doctor", result.bundle_dir, "--json", tmp_path / "doctor.json", timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    rows = {r["what"]: r for r in json.loads((tmp_path / "doctor.json").read_text())}
    assert rows["onnxruntime"]["status"] == rows["CPUExecutionProvider"]["status"] == "ok"
    if not _tensorrt_bindings():
        assert rows["tensorrt"]["status"] == "no" and "python3-libnvinfer" in rows["tensorrt"]["fix"]
        assert "python3-libnvinfer" in done.stdout  # the fix is printed under the line
    if rows["GPU"]["status"] != "ok":  # this machine: every GPU line says so, and the CPU serves
        assert "no GPU" in rows["GPU"]["detail"] and "would serve on onnxruntime" in rows["bundle"]["detail"]
        assert rows["parity"]["detail"].startswith("max |difference| 0.00e+00")  # the CPU against itself
    assert rows["parity"]["status"] == rows["timed"]["status"] == "ok" and "median" in rows["timed"]["detail"]


def test_doctor_fails_a_provider_that_is_listed_but_does_not_run_and_chooses_around_it(monkeypatch):
    import onnxruntime as ort

    from coformer.runtime.doctor import Check, choose_backend, onnxruntime_checks

    listed = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *listed])
    rows = {c.what.strip(): c for c in onnxruntime_checks()}
    if "CUDAExecutionProvider" not in listed:  # listed here, but this onnxruntime cannot run it
        assert rows["CUDAExecutionProvider"].status == "fail" and rows["CUDAExecutionProvider"].fix
        assert choose_backend(list(rows.values())) == "onnxruntime"
    every = [Check(n, "ok", "") for n in ("tensorrt", "polygraphy", "cuda-python", "GPU", "CUDAExecutionProvider")]
    assert choose_backend(every) == "tensorrt"
    assert choose_backend([c for c in every if c.what != "GPU"]) == "onnxruntime-cuda"


def test_a_corrupt_model_is_one_line_from_benchmark_and_build_engines(compiled, tmp_path):  # noqa: F811
    """ONNX Runtime's and Polygraphy's exceptions never reach the user as a traceback."""
    import shutil

    result, _ = compiled
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07 not a model")
    done = _rt("benchmark", bad, "--duration", "0.05")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "ONNX Runtime cannot load" in lines[0], done.stderr
    bundle = tmp_path / "bundle"  # a bundle whose worker model was overwritten: refused before any build
    shutil.copytree(result.bundle_dir, bundle)
    worker = next(d for d in result.manifest.devices if d.role == "worker")
    (bundle / worker.artifact).write_bytes(b"corrupt")
    for args in (["build-engines", bundle, "--device", worker.device],
                 ["worker", bundle, "--device", worker.device, "--central", "tcp://127.0.0.1:59999"]):
        done = _rt(*args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, (args[0], done.stderr)
